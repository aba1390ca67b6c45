"""conf/: every documented command line composes, to the callbacks it says; every config exposes
every argument of what it instantiates."""

from __future__ import annotations

import inspect
import re
import shlex
from pathlib import Path

import hydra
import pytest
import yaml
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from omegaconf import OmegaConf

from lightning_distill.callbacks import CoverageSlices, TeacherCache, TemperatureSchedule
from lightning_distill.cli import CONFIG_DIR

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = {"checkpoint": ModelCheckpoint, "lr_monitor": LearningRateMonitor, "coverage": CoverageSlices}


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="distill", overrides=[*overrides, "output_dir=/tmp/ld-compose"])


def _callbacks(overrides: list[str]) -> dict:
    node = _compose(overrides).get("callbacks") or {}
    return {name: hydra.utils.instantiate(c) for name, c in node.items() if c is not None}


def _documented_lines() -> list[str]:
    """Every ``lightning-distill ...`` command in README.md, docs/ and the comments in conf/."""
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted(CONFIG_DIR.rglob("*.yaml"))]
    lines = []
    for path in files:
        text = path.read_text()
        if path.suffix == ".yaml":
            text = "\n".join(line.lstrip("#") for line in text.splitlines() if line.lstrip().startswith("#"))
        text = re.sub(r"\\\n\s*", " ", text)  # shell line continuations
        for match in re.finditer(r"^\s*lightning-distill( [^\n`]*)?$", text, flags=re.M):
            command = (match.group(1) or "").split(" #")[0].strip()
            if "<" not in command and "..." not in command:
                lines.append(command)
    return sorted(set(lines))


DOCUMENTED = _documented_lines()


def _overrides(command: str) -> list[str]:
    words, out, skip = shlex.split(command), [], False
    for word in words:
        if skip or word in ("-m", "--help", "--multirun"):
            skip = False
            continue
        if word == "--cfg":
            skip = True
            continue
        out.append(word.split(",")[0] if word.startswith("loss.kd.temperature=") else word)  # a sweep: its first job
    return out


def test_the_documented_lines_were_found():
    assert len(DOCUMENTED) > 30
    assert any("callbacks=[temperature_cosine,teacher_cache_topk]" in c for c in DOCUMENTED)


@pytest.mark.parametrize("command", DOCUMENTED)
def test_every_documented_command_line_composes(command):
    if command.startswith("generate"):  # `lightning-distill generate ...` composes conf/generate.yaml
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            compose(config_name="generate", overrides=_overrides(command[len("generate"):]))
        return
    cfg = _compose(_overrides(command))
    for node in (cfg.get("callbacks") or {}).values():  # and its callbacks build
        if node is not None:
            hydra.utils.instantiate(node)


# Command line -> {callback name: (type, {attribute: value})}; the default three come with each
# composition unless named otherwise.
CASES = {
    "": {},
    "callbacks=default": {},
    "callbacks=coverage": {},
    "experiment=demo": {},
    "callbacks=coverage_strict": {"coverage": (CoverageSlices, {"on_gap": "error", "min_retention": 0.3})},
    "callbacks=teacher_cache_topk": {"teacher_cache": (TeacherCache, {"kind": "topk", "k": 32})},
    "callbacks=teacher_cache_topk callbacks.teacher_cache.k=64": {"teacher_cache": (TeacherCache, {"kind": "topk",
                                                                                                   "k": 64})},
    "callbacks=teacher_cache_sampled": {"teacher_cache": (TeacherCache, {"kind": "sampled", "num_samples": 50})},
    "callbacks=teacher_cache_dense": {"teacher_cache": (TeacherCache, {"kind": "dense"})},
    "experiment=demo_cached": {"teacher_cache": (TeacherCache, {"kind": "sampled", "num_samples": 50})},
    "experiment=demo_cached callbacks=teacher_cache_topk": {"teacher_cache": (TeacherCache, {"kind": "topk"})},
    "callbacks=[temperature_cosine,teacher_cache_topk]": {
        "teacher_cache": (TeacherCache, {"kind": "topk", "k": 32}),
        "temperature": (TemperatureSchedule, {"interval": "step"})},
    "callbacks=temperature_cosine callbacks.temperature.temperature.end=2": {
        "temperature": (TemperatureSchedule, {"interval": "step"})},
    "callbacks=temperature_warmup_cosine": {"temperature": (TemperatureSchedule, {"interval": "step"})},
    "callbacks=temperature_step": {"temperature": (TemperatureSchedule, {"interval": "step"})},
    "~callbacks.lr_monitor": {"lr_monitor": None},
    "~callbacks.coverage": {"coverage": None},
}


@pytest.mark.parametrize("command", list(CASES))
def test_compositions_give_the_documented_callbacks(command):
    got = _callbacks(shlex.split(command))
    want = {name: (cls, {}) for name, cls in DEFAULT.items()}
    want.update(CASES[command])
    want = {name: spec for name, spec in want.items() if spec is not None}
    assert {n: type(c) for n, c in got.items()} == {n: cls for n, (cls, _) in want.items()}
    for name, (_, attrs) in want.items():
        for attr, value in attrs.items():
            assert getattr(got[name], attr) == value, (name, attr)
    checkpoint = got["checkpoint"]
    assert (checkpoint.save_last, checkpoint.save_top_k, checkpoint.filename) == ("link", 1, "step{step}")


def test_schedule_shapes_and_weights_reach_the_callback():
    """The temperature_* compositions keep their shapes; the warm-up one also schedules the KD weight."""
    cases = {"temperature_cosine": (4.0, 1.0), "temperature_linear": (4.0, 1.0), "temperature_exponential": (4.0, 1.0),
             "temperature_constant": (1.0, 1.0)}
    for name, (first, last) in cases.items():
        cb = _callbacks([f"callbacks={name}"])["temperature"]
        assert cb.temperature.shape == name.split("_")[1]
        assert (cb.temperature.value(0, 10), cb.temperature.value(9, 10)) == pytest.approx((first, last)), name
        assert cb.weights == {}
    warm = _callbacks(["callbacks=temperature_warmup_cosine"])["temperature"]
    assert set(warm.weights) == {"kd"} and warm.weights["kd"].value(0, 100) == 0.0
    step = _callbacks(["callbacks=temperature_step"])["temperature"]
    assert [step.temperature.value(t, 300) for t in (0, 100, 200)] == [4.0, 2.0, 1.0]
    assert _callbacks(["callbacks=none"]) == {}


def test_teacher_cache_is_one_definition():
    """Every teacher_cache_* composition reads callbacks/teacher_cache.yaml; only the kind differs."""
    base = OmegaConf.to_container(_compose(["callbacks=[default,teacher_cache]"]).callbacks.teacher_cache)
    for kind in ("sampled", "topk", "dense"):
        node = OmegaConf.to_container(_compose([f"callbacks=teacher_cache_{kind}"]).callbacks.teacher_cache)
        assert {k: v for k, v in node.items() if node[k] != base[k]} == ({} if kind == "sampled" else {"kind": kind})
    assert _compose(["callbacks=teacher_cache_topk", "callbacks.teacher_cache.progress=false"]).callbacks.teacher_cache[
        "progress"] is False


# Arguments a config does not carry, on purpose: objects the CLI passes at run time, and callables
# (Python API only). Targets outside lightning_distill and Lightning's callbacks (the Trainer, the
# loggers, torch's optimizers, transformers' schedulers) have long signatures documented upstream:
# set any of their other arguments with `+key=value`.
INJECTED = {
    ("lightning_distill.models.student_from_teacher", "teacher"),  # the CLI passes the teacher
    ("lightning_distill.demo.demo_teacher", "datamodule"),  # the CLI passes the prepared datamodule
    ("lightning_distill.demo_embedding.demo_encoder_teacher", "datamodule"),  # the same
    ("lightning_distill.callbacks.CoverageSlices", "slice_fn"),  # a Python callable
}
CHECKED = ("lightning_distill.", "lightning.pytorch.callbacks.")


def _targets(node, where):
    if isinstance(node, dict):
        if "_target_" in node:
            yield where, node
        for key, value in node.items():
            yield from _targets(value, f"{where}.{key}")


def _nodes_with_targets():
    for path in sorted(CONFIG_DIR.rglob("*.yaml")):
        tree = yaml.safe_load(path.read_text()) or {}
        for where, node in _targets(tree, ""):
            if node["_target_"].startswith(CHECKED):
                yield pytest.param(node, id=f"{path.relative_to(CONFIG_DIR)}{where}")


@pytest.mark.parametrize("node", list(_nodes_with_targets()))
def test_configs_expose_every_argument_of_their_target(node):
    target = node["_target_"]
    params = inspect.signature(hydra.utils.get_object(target)).parameters.values()
    named = [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    missing = [n for n in named if n not in node and (target, n) not in INJECTED]
    assert not missing, f"{target}: add {missing} to the config (with the signature's default)"


def test_the_module_block_has_every_setting_of_the_module():
    """``module:`` in distill.yaml: DistillationModule's arguments besides what the CLI builds."""
    from lightning_distill.module import DistillationModule

    built = {"student", "teacher", "losses", "optimizer", "lr_scheduler",  # from the other groups
             "student_logits_fn", "teacher_logits_fn"}  # the pooling group (embedding runs)
    params = set(inspect.signature(DistillationModule).parameters) - built
    assert params == set(yaml.safe_load((CONFIG_DIR / "distill.yaml").read_text())["module"])


def test_every_option_of_the_main_groups_is_in_the_readme_table():
    """Each file of the `lightning-distill` config groups is named in README's group table (its row)."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    rows: dict[str, str] = {}
    for line in readme.splitlines():
        found = re.match(r"\| `(\w+)` \| (.*?) \|", line)
        if found:
            # `name_{a,b}` in a cell names name_a and name_b
            cell = re.sub(r"`(\w*)\{([\w,]+)\}`", lambda m: " ".join(f"`{m.group(1)}{o}`" for o in
                                                                     m.group(2).split(",")), found.group(2))
            rows[found.group(1)] = rows.get(found.group(1), "") + cell
    missing = []
    for group in ("data", "teacher", "student", "loss", "trainer", "callbacks", "logger", "pooling", "experiment"):
        for option in sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml")):
            if option in ("lr_monitor", "model_checkpoint", "coverage_slices", "temperature", "teacher_cache"):
                continue  # the named callbacks the options compose (listed under "what it builds")
            if not re.search(rf"`[^`]*\b{re.escape(option)}\b[^`]*`", rows.get(group, "")):
                missing.append(f"{group}={option}")
    assert not missing, f"README's config-group table does not name {missing}"
