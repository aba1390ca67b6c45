"""``lightning-distill generate``: have a teacher answer prompts and write the records, with lineage.

Composes ``conf/generate.yaml``: a ``source`` (a :class:`~lightning_distill.blackbox.TeacherSource`:
``local``, ``demo``, ``openai``), ``prompts`` (a callable returning ``list[Prompt]``, e.g.
``from_run``), ``out``, ``n``, ``seed``, ``shard_size`` and ``terms``. Writes the records with
:func:`~lightning_distill.blackbox.write_records` (a rerun resumes) and ``generation.json``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning_distill.blackbox.loop import LINEAGE_NAME, generated_lineage, load_run_config
from lightning_distill.blackbox.prompts import Prompt
from lightning_distill.blackbox.sources import LocalHFTeacher
from lightning_distill.blackbox.summary import write_summary
from lightning_distill.blackbox.writer import write_records
from lightning_distill.validation import check_int

__all__ = ["local_source", "run_generate", "run_teacher_source"]

#: Config keys that would hold a credential; a key is only ever read from the environment.
_SECRET_KEYS = ("api_key", "apikey", "key", "token", "password", "secret", "authorization")


def local_source(
    path: str,
    *,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    top_p: float = 1.0,
    do_sample: bool = True,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
    dtype: str | None = None,
    device: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> LocalHFTeacher:
    """A Hugging Face causal LM folder (``save_pretrained`` + its tokenizer) as a teacher source.

    Args:
        path: the model folder (or a hub id where the network allows).
        max_new_tokens, temperature, top_p, do_sample, batch_size, seed, progress: as
            :class:`~lightning_distill.blackbox.LocalHFTeacher`.
        dtype: parameter dtype (``bfloat16``, ...; ``None``: the checkpoint's).
        device: ``cpu``, ``cuda``, ``cuda:1``...; ``None``: CUDA when there is one.
        revision: a hub revision.
        trust_remote_code: run the checkpoint's own code (off: only for code you have read).

    Raises:
        FileNotFoundError: a local path that does not exist.
        TypeError, ValueError: as ``load_pretrained`` and ``LocalHFTeacher``.
    """
    import torch
    from transformers import AutoTokenizer

    from lightning_distill.models.hf import load_pretrained

    model = load_pretrained(
        path, revision=revision, dtype=dtype, trust_remote_code=trust_remote_code
    )
    tokenizer = AutoTokenizer.from_pretrained(
        path, revision=revision, trust_remote_code=trust_remote_code
    )
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return LocalHFTeacher(
        model.to(device).eval(),
        tokenizer,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        do_sample=do_sample,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
    )


def _demo_config(seed: int) -> dict[str, Any]:
    from omegaconf import OmegaConf

    from lightning_distill.cli import CONFIG_DIR

    cfg = OmegaConf.create(
        {
            "seed": seed,
            "data": OmegaConf.load(CONFIG_DIR / "data" / "demo.yaml"),
            "teacher": OmegaConf.load(CONFIG_DIR / "teacher" / "demo.yaml"),
        }
    )
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def run_teacher_source(
    run_dir: str | None = None,
    *,
    max_new_tokens: int = 96,
    temperature: float = 1.0,
    top_p: float = 1.0,
    do_sample: bool = True,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> LocalHFTeacher:
    """The teacher of a ``lightning-distill`` run (by default the demo's) with its data's tokenizer.

    The teacher and data configs come from the run's saved config (see
    :func:`~lightning_distill.blackbox.loop.load_run_config`), or, with ``run_dir=None``, from
    ``conf/data/demo.yaml`` and ``conf/teacher/demo.yaml``: the demo teacher, loaded from the cache
    (trained there once, offline). Whatever teacher the run had (demo, ``hf_config``,
    ``hf_pretrained``) is built the same way the run built it.

    Args:
        run_dir: the run; ``None``: the demo defaults.
        max_new_tokens, temperature, top_p, do_sample, batch_size, seed, progress: as
            :class:`~lightning_distill.blackbox.LocalHFTeacher` (the demo teacher saw 128-token
            blocks: keep prompt + completion within that).

    Raises:
        FileNotFoundError: a run without a saved config.
        ValueError: a run with no teacher (``teacher=none``).
    """
    from lightning_distill.cli import _instantiate

    config = load_run_config(run_dir) if run_dir is not None else _demo_config(seed)
    if not config.get("teacher"):
        raise ValueError(
            f"the run {run_dir} has no teacher (teacher=none); use source=local source.path=<model>."
        )
    data = (
        {**config["data"], "generated": None}
        if "generated" in config["data"]
        else dict(config["data"])
    )
    datamodule = _instantiate(data)
    datamodule.prepare_data()
    teacher = _instantiate(config["teacher"], datamodule=datamodule)
    return LocalHFTeacher(
        teacher.eval(),
        datamodule.tokenizer,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        do_sample=do_sample,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
    )


def _refuse_secrets(node: Any, where: str = "source") -> None:
    if isinstance(node, Mapping):
        for key, value in node.items():
            name = str(key).lower()
            if (
                value is not None
                and name != "api_key_env"
                and any(name == s or name.endswith("_" + s) for s in _SECRET_KEYS)
            ):
                raise ValueError(
                    f"{where}.{key} holds a credential in the config, where it would be saved; put it in "
                    f"an environment variable and name that variable in source.api_key_env."
                )
            _refuse_secrets(value, f"{where}.{key}")


def _check_prompts(prompts: Any) -> list[Prompt]:
    if isinstance(prompts, Prompt):
        prompts = [prompts]
    if not isinstance(prompts, list | tuple) or not all(isinstance(p, Prompt) for p in prompts):
        raise TypeError(f"cfg.prompts must build a list of Prompt, got {type(prompts).__name__}.")
    if not prompts:
        raise ValueError("the prompts config gave no prompts; check its settings (prompts.*).")
    return list(prompts)


def _source_run(prompts_cfg: Mapping[str, Any]) -> dict[str, Any] | None:
    run_dir = prompts_cfg.get("run_dir")
    if not run_dir:
        return None
    entry: dict[str, Any] = {"path": str(Path(run_dir).resolve())}
    coverage = Path(run_dir) / "coverage.json"
    if coverage.is_file():
        report = json.loads(coverage.read_text())
        entry.update(
            gaps=report.get("gaps"),
            metric=report.get("metric"),
            thresholds=report.get("thresholds"),
            retention={r["slice"]: r.get("retention") for r in report.get("slices") or []},
        )
    return entry


def run_generate(cfg: Any) -> dict[str, Any]:
    """Run ``lightning-distill generate`` for a composed ``conf/generate.yaml``; returns its lineage.

    Raises:
        ValueError: a credential in the config; bad settings; no prompts.
        TypeError: prompts that are not ``Prompt`` s.
    """
    from omegaconf import OmegaConf

    from lightning_distill.cli import _instantiate

    plain = OmegaConf.to_container(cfg, resolve=True)
    _refuse_secrets(plain.get("source"))
    n = check_int("n", plain.get("n"), low=1)
    seed = check_int("seed", plain.get("seed"))
    shard_size = check_int("shard_size", plain.get("shard_size"), low=1)
    terms = plain.get("terms")
    if terms is not None and not isinstance(terms, str):
        raise TypeError(
            f"terms must be a string (the provider's usage terms or their URL), got {terms!r}."
        )
    out = Path(plain["out"])
    prompts = _check_prompts(_instantiate(cfg.prompts))
    # a RationaleTemplate (the teacher sees the templated prompt; records get answer/accepted) or None
    rationale = _instantiate(cfg.rationale) if cfg.get("rationale") is not None else None
    source = _instantiate(cfg.source)
    result = write_records(
        source,
        prompts,  # Prompt objects: their slice and reference go into the records
        out,
        n=n,
        seed=seed,
        shard_size=shard_size,
        rationale=rationale,
    )
    summary = write_summary(out)  # summary.json / summary.md: per-slice counts and acceptance
    identity = dict(source.identity())
    settings = {
        **dict(identity.pop("generation", None) or {}),
        "n": n,
        "seed": seed,
        "shard_size": shard_size,
    }
    lineage_path = out / LINEAGE_NAME
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    previous = json.loads(lineage_path.read_text()) if lineage_path.is_file() else {}
    folder = generated_lineage(out)[0]
    lineage = {
        "format_version": 1,
        "created_at": previous.get("created_at", now),
        "updated_at": now,
        "teacher": identity,
        "generation": settings,
        "prompts": {k: v for k, v in (plain.get("prompts") or {}).items()},
        "source_run": _source_run(plain.get("prompts") or {}),
        "terms": terms,
        "records": folder["records"],
        "slices": folder["slices"],
        "last_call": result,
    }
    tmp = lineage_path.with_name(LINEAGE_NAME + ".tmp")
    tmp.write_text(json.dumps(lineage, indent=2, default=str))
    os.replace(tmp, lineage_path)
    counts = ", ".join(f"{name} {v['records']}" for name, v in folder["slices"].items())
    print(
        f"\nWrote {result['written']} records ({result['skipped']} already there) to {out}: {counts}."
    )
    accepted = summary.get("total", {}).get("acceptance_rate")
    if accepted is not None:
        print(f"Rationale filter: {accepted:.0%} of the scored records match their reference ({out}/summary.md).")
    print(f"Lineage in {lineage_path}. Train on them with data.generated={out}")
    return lineage


def _drop_dumps(output_dir: str | None) -> None:
    """Delete Hydra's config dumps of this job (after a refused credential)."""
    if output_dir:
        shutil.rmtree(Path(output_dir) / ".hydra", ignore_errors=True)
