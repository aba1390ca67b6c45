"""Files users share are never unpickled: a real pickle payload is refused wherever one could be planted.

The payload's ``__reduce__`` runs ``os.system("touch <marker>")``: unpickling it creates the
marker file. ``test_the_payload_is_real`` shows that it does when unpickled the unsafe way; every
other test puts it where the library reads a file (a cache shard or index, a checkpoint, an
exported student's weights) and checks that the read is refused with a clear error and that the
marker does not exist. The last tests hold the code to the rule: ``trust_remote_code`` is off by
default, and the package never calls ``pickle.load``/``torch.load`` without ``weights_only=True``.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_distill import DistillationModule
from lightning_distill.cache import CacheCorruptedError
from lightning_distill.checkpoint import CheckpointError
from lightning_distill.models import causal_lm_from_config, freeze, load_pretrained

PACKAGE = Path(__file__).resolve().parent.parent / "lightning_distill"
CONF = PACKAGE.parent / "conf"
VOCAB, SEQ = 48, 8


class Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def evil(marker: Path) -> bytes:
    return pickle.dumps({"weight": Payload(marker)})


@pytest.fixture
def marker(tmp_path) -> Path:
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "a refused file ran its code"


def lm(seed: int = 0) -> torch.nn.Module:
    return causal_lm_from_config(
        "llama",
        vocab_size=VOCAB,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
        seed=seed,
    )


def test_the_payload_is_real(tmp_path):
    """Unpickled unsafely, the payload creates its marker (so the other tests can fail)."""
    path = tmp_path / "PWNED"
    pickle.loads(evil(path))  # noqa: S301 - the point of this test
    assert path.exists()


# ----------------------------------------------------------------------------- teacher cache
def _cache(tmp_path: Path, compression: str | None):
    from lightning_distill.callbacks import TeacherCache

    ids = torch.randint(0, VOCAB, (4, SEQ), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": i, "labels": i, "sample_id": n} for n, i in enumerate(ids)]
    loaders = {"train": DataLoader(rows, batch_size=2)}
    module = DistillationModule(lm(0), freeze(lm(1)))
    folder = tmp_path / "cache"

    def open_cache():
        cache = TeacherCache(
            str(folder), kind="topk", k=2, splits=["train"], progress=False, compression=compression
        )
        cache.prepare(module, loaders=loaders)
        return cache

    open_cache()
    return folder, open_cache


@pytest.mark.parametrize("compression", ["zlib", None])
def test_pickle_as_a_cache_shard_is_refused_unread(tmp_path, marker, compression):
    """The shard replaced by a pickle and the index's sha256 forged to match it, as an attacker with
    write access to the folder would: the shard is read by safetensors only, which refuses it."""
    from lightning_distill.cache.storage import sha256_bytes

    folder, open_cache = _cache(tmp_path, compression)
    index_path = folder / "train" / "index.json"
    index = json.loads(index_path.read_text())
    shard = folder / "train" / "shards" / index["shards"][0]["file"]
    shard.write_bytes(evil(marker))
    index["shards"][0]["sha256"] = sha256_bytes(shard.read_bytes())
    index_path.write_text(json.dumps(index))
    with pytest.raises(
        CacheCorruptedError,
        match=r"^cache shard .*\.safetensors cannot be read \(.*\)\. Delete "
        r"that file \(and nothing else\)",
    ):
        open_cache().readers["train"].read(torch.tensor([0]), (1, SEQ), "cpu")


def test_pickle_as_the_cache_sample_index_is_refused_unread(tmp_path, marker):
    folder, open_cache = _cache(tmp_path, "zlib")
    (folder / "train" / "sample_index.safetensors").write_bytes(evil(marker))
    with pytest.raises(
        CacheCorruptedError,
        match=r"^the index of split 'train' in the cache at .* cannot be read "
        r"\(SafetensorError: .*\); it is damaged or not a cache file\.",
    ):
        open_cache()


# ----------------------------------------------------------------------------- checkpoints
def _evil_checkpoint(tmp_path: Path, marker: Path) -> Path:
    path = tmp_path / "evil.ckpt"
    torch.save(
        {"state_dict": {}, "epoch": 0, "payload": Payload(marker)}, path
    )  # a real torch zip file
    return path


CHECKPOINT_REFUSED = (
    r"evil\.ckpt is not a checkpoint this library wrote, or it is damaged: it holds Python "
    r"objects other than tensors and plain values, which the safe loader refuses to run\."
)


def test_pickle_as_a_checkpoint_is_refused_by_load_from_checkpoint(tmp_path, marker):
    path = _evil_checkpoint(tmp_path, marker)
    with pytest.raises(CheckpointError, match=CHECKPOINT_REFUSED) as info:
        DistillationModule.load_from_checkpoint(path, student=lm(0), teacher=freeze(lm(1)))
    assert "weights_only=False" not in str(info.value)  # never advise the unsafe load


def test_pickle_as_a_checkpoint_is_refused_by_fit_resume(tmp_path, marker):
    import lightning as L

    path = _evil_checkpoint(tmp_path, marker)
    ids = torch.randint(0, VOCAB, (4, SEQ))
    rows = [{"input_ids": i, "labels": i} for i in ids]
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(CheckpointError, match=CHECKPOINT_REFUSED):
        trainer.fit(
            DistillationModule(lm(0), freeze(lm(1))), DataLoader(rows, batch_size=2), ckpt_path=path
        )


def test_pickle_as_a_checkpoint_is_refused_by_the_command(tmp_path, marker, monkeypatch):
    from hydra import compose, initialize_config_dir

    from lightning_distill.cli import CONFIG_DIR, _user_error, run

    path = _evil_checkpoint(tmp_path, marker)
    monkeypatch.setenv("LIGHTNING_DISTILL_CACHE", str(tmp_path / "cache"))
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            "distill",
            overrides=[
                "experiment=tiny",
                "baseline=false",
                f"output_dir={tmp_path / 'run'}",
                f"ckpt_path={path}",
            ],
        )
    with pytest.raises(CheckpointError, match=CHECKPOINT_REFUSED) as info:
        run(cfg)
    assert _user_error(info.value)  # printed as its message, exit status 2


# ----------------------------------------------------------------------------- an exported student
def _exported(tmp_path: Path) -> Path:
    from lightning_distill.export import export_student

    return export_student(lm(0), tmp_path / "student")


def test_pickle_as_the_exported_students_safetensors_is_refused_unread(tmp_path, marker):
    folder = _exported(tmp_path)
    (folder / "model.safetensors").write_bytes(evil(marker))
    with pytest.raises(
        ValueError,
        match=r"^the safetensors weights at '.*student' cannot be read \(.*\): the file "
        r"is damaged or is not safetensors \(nothing in it was run\)",
    ):
        load_pretrained(str(folder))


def test_pickled_weights_in_place_of_the_exported_students_are_refused_unread(tmp_path, marker):
    """``pytorch_model.bin`` (a torch zip holding the payload) instead of safetensors: torch's safe
    loader refuses it, and the message does not advise ``weights_only=False``."""
    folder = _exported(tmp_path)
    (folder / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": Payload(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(
        ValueError,
        match=r"^the weights at '.*student' are a pickle holding Python objects besides "
        r"tensors, so they were not loaded \(unpickling them could run code\)",
    ) as info:
        load_pretrained(str(folder))
    assert "weights_only=False" not in str(info.value)


def test_the_exported_student_is_safetensors_and_json_only(tmp_path):
    folder = _exported(tmp_path)
    assert sorted(p.suffix for p in folder.iterdir()) == [".json", ".json", ".json", ".safetensors"]
    for path in folder.iterdir():
        assert not path.read_bytes().startswith(b"\x80"), (
            f"{path.name} is a pickle"
        )  # pickle protocol 2+
        assert not path.read_bytes().startswith(b"PK"), (
            f"{path.name} is a torch zip (pickle inside)"
        )


# ----------------------------------------------------------------------------- the code itself
def test_trust_remote_code_is_off_by_default():
    from lightning_distill.data import TextDataModule

    for fn in (load_pretrained, TextDataModule.__init__):
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False, (
            fn.__qualname__
        )
    for name in (
        "teacher/hf_pretrained.yaml",
        "student/hf_pretrained.yaml",
        "data/files.yaml",
        "data/hf_dataset.yaml",
        "data/instruct.yaml",
    ):
        text = (CONF / name).read_text()
        values = re.findall(r"^\s*trust_remote_code:\s*(\S+)", text, flags=re.M)
        assert all(v in ("false", "${teacher.trust_remote_code}") for v in values), (name, values)
    for path in PACKAGE.rglob("*.py"):
        assert "trust_remote_code=True" not in path.read_text(), path


def unsafe_loads(source: str) -> list[str]:
    """Calls in ``source`` that could unpickle: ``pickle``/``dill``/``joblib`` loads, ``torch.load``
    without ``weights_only=True``, ``numpy.load(allow_pickle=True)``, any ``weights_only=False``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = ast.unparse(node.func)
        keywords = {k.arg: k.value for k in node.keywords}
        flag = keywords.get("weights_only")
        if re.fullmatch(r"(c?pickle|dill|joblib|cloudpickle)\.(load|loads|Unpickler)", func):
            found.append(f"{func} at line {node.lineno}")
        elif func.endswith("torch.load") or func == "load" and "weights_only" in keywords:
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                found.append(f"{func} without weights_only=True at line {node.lineno}")
        elif isinstance(flag, ast.Constant) and flag.value is False:
            found.append(f"{func}(weights_only=False) at line {node.lineno}")
        allow = keywords.get("allow_pickle")
        if isinstance(allow, ast.Constant) and allow.value is True:
            found.append(f"{func}(allow_pickle=True) at line {node.lineno}")
    return found


def test_the_scan_finds_each_unsafe_load():
    bad = (
        "import pickle, torch, numpy as np\npickle.load(f)\npickle.loads(b)\ntorch.load(p)\n"
        "torch.load(p, weights_only=False)\nnp.load(p, allow_pickle=True)\nx.fit(ckpt, weights_only=False)\n"
    )
    assert len(unsafe_loads(bad)) == 6
    assert (
        unsafe_loads("import torch\ntorch.load(p, map_location='cpu', weights_only=True)\n") == []
    )


def test_the_package_never_unpickles():
    found = {
        str(p.relative_to(PACKAGE)): unsafe_loads(p.read_text())
        for p in sorted(PACKAGE.rglob("*.py"))
    }
    assert not {k: v for k, v in found.items() if v}
