"""Faults that are not a bad value: unwritable folders, writes cut off midway, a teacher handed over trainable.

A full disk is not simulated by filling one: a real file-size limit (``RLIMIT_FSIZE``, with
``SIGXFSZ`` ignored) makes the kernel refuse a write past the limit with ``EFBIG``, the same way
``ENOSPC`` refuses it on a full disk, part way through the file. Each writer must then leave no
file under its final name (a temporary file, if any, never counts as complete).
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import warnings
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_distill import DistillationModule
from lightning_distill.losses import LogitKD, TaskLoss
from lightning_distill.paths import NotWritableError, check_writable

ROOT = os.geteuid() == 0
as_user = pytest.mark.skipif(
    ROOT, reason="root ignores file permissions; the read-only folder is writable to it"
)
LIMIT = 64 * 1024  # bytes a file may grow to while a write is made to fail


@contextlib.contextmanager
def file_size_limit(limit: int = LIMIT) -> Iterator[None]:
    """Writes that would grow a file past ``limit`` bytes fail with OSError (EFBIG), as on a full disk."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(
        signal.SIGXFSZ, signal.SIG_IGN
    )  # an error for the writer, not a killed process
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_the_limit_cuts_a_plain_write_midway(tmp_path):
    """The fault itself: a plain write stops at the limit, leaving a half-written file (what must not be trusted)."""
    with file_size_limit(), pytest.raises(OSError), open(tmp_path / "plain.bin", "wb") as handle:
        handle.write(b"x" * (4 * LIMIT))
    assert (tmp_path / "plain.bin").stat().st_size == LIMIT


# ----------------------------------------------------------------------------- unwritable folders
def _readonly(folder: Path) -> Path:
    folder.mkdir()
    folder.chmod(0o500)
    return folder


@as_user
def test_read_only_output_dir_fails_before_anything_loads(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir

    from lightning_distill.cli import CONFIG_DIR, _user_error, run

    locked = _readonly(tmp_path / "locked")
    monkeypatch.setenv("LIGHTNING_DISTILL_CACHE", str(tmp_path / "cache"))
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("distill", overrides=["experiment=tiny", f"output_dir={locked / 'run'}"])
    with pytest.raises(
        NotWritableError,
        match=r"^output_dir='.*locked/run' is not writable \(Permission denied\); "
        r"pass output_dir=<a folder you can write>, or fix its permissions\.$",
    ) as info:
        run(cfg)
    assert _user_error(info.value)
    assert not (tmp_path / "cache").exists()  # failed before the data was prepared


@as_user
def test_read_only_cache_folder_fails_before_the_teacher_runs(tmp_path):
    from lightning_distill.callbacks import TeacherCache
    from lightning_distill.models import causal_lm_from_config, freeze

    locked = _readonly(tmp_path / "locked")
    calls = []
    lm = {
        "vocab_size": 32,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "max_position_embeddings": 16,
    }
    teacher = freeze(causal_lm_from_config("llama", **lm, seed=1))
    teacher.register_forward_hook(lambda *_: calls.append(1))
    module = DistillationModule(causal_lm_from_config("llama", **lm), teacher)
    ids = torch.randint(0, 32, (4, 8))
    rows = [{"input_ids": i, "labels": i, "sample_id": n} for n, i in enumerate(ids)]
    cache = TeacherCache(str(locked), kind="topk", k=2, splits=["train"], progress=False)
    with pytest.raises(
        NotWritableError,
        match=r"TeacherCache\(dirpath\)='.*locked' is not writable \(Permission "
        r"denied\); the cache writes its lock and targets there",
    ):
        cache.prepare(module, loaders={"train": DataLoader(rows, batch_size=2)})
    assert not calls


def test_check_writable_names_the_folder_under_a_file(tmp_path):
    """What root also gets: a folder that cannot be made (a file in the way)."""
    (tmp_path / "a_file").write_text("")
    with pytest.raises(
        NotWritableError, match=r"^data='.*a_file/x' is not writable \(Not a directory\); fix it\.$"
    ):
        check_writable(tmp_path / "a_file" / "x", "data", "fix it.")
    made = check_writable(tmp_path / "new" / "folder", "data", "fix it.")
    assert made.is_dir() and not list(made.iterdir())  # created, the probe file removed


# ----------------------------------------------------------------------------- writes cut off midway
def test_cache_write_cut_off_leaves_no_file_and_keeps_the_old_one(tmp_path):
    from lightning_distill.cache import CacheStorage

    storage = CacheStorage(str(tmp_path / "cache"))
    storage.write_bytes(b"old index", "train", "index.json")
    with file_size_limit(), pytest.raises(OSError):
        storage.write_bytes(os.urandom(4 * LIMIT), "train", "shards", "a.safetensors")
    with file_size_limit(), pytest.raises(OSError):
        storage.write_bytes(os.urandom(4 * LIMIT), "train", "index.json")
    assert sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()) == ["index.json"]
    assert (
        storage.read_bytes("train", "index.json") == b"old index"
    )  # the complete old file, untouched


def test_cache_build_cut_off_leaves_no_shard_and_the_next_build_completes(tmp_path):
    """A real build whose shard write fails: no shard counts, and a later build builds every sample."""
    from lightning_distill.callbacks import TeacherCache
    from lightning_distill.models import causal_lm_from_config, freeze

    lm = {
        "vocab_size": 512,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
    }
    module = DistillationModule(
        causal_lm_from_config("llama", **lm), freeze(causal_lm_from_config("llama", **lm, seed=1))
    )
    ids = torch.randint(0, 512, (8, 64), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": i, "labels": i, "sample_id": n} for n, i in enumerate(ids)]
    loaders = {"train": DataLoader(rows, batch_size=4)}

    def cache():  # dense fp32-ish targets, uncompressed: 8 x 64 x 512 x 2 bytes, far past the limit
        return TeacherCache(
            str(tmp_path / "cache"),
            kind="dense",
            splits=["train"],
            progress=False,
            compression=None,
        )

    with file_size_limit(), pytest.raises(OSError):
        cache().prepare(module, loaders=loaders)
    written = sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file())
    assert "cache.json" in written  # the build had started: the shard write was what failed
    assert not [n for n in written if n.endswith(".safetensors") or ".tmp-" in n], written
    info = cache().prepare(module, loaders=loaders)
    assert info["train"]["built"] == 8 and info["train"]["samples"] == 8


def test_checkpoint_write_cut_off_leaves_no_checkpoint(tmp_path):
    from lightning.fabric.plugins import TorchCheckpointIO

    from lightning_distill.checkpoint import CheckedCheckpointIO

    io = CheckedCheckpointIO(TorchCheckpointIO())
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.zeros(10)}}, path)
    before = path.read_bytes()
    with file_size_limit(), pytest.raises(OSError):
        io.save_checkpoint({"state_dict": {"w": torch.randn(4 * LIMIT // 4)}}, path)
    assert path.read_bytes() == before  # the complete earlier checkpoint, not half of the new one
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]
    with file_size_limit(), pytest.raises(OSError):
        io.save_checkpoint(
            {"state_dict": {"w": torch.randn(4 * LIMIT // 4)}},
            tmp_path / "checkpoints" / "new.ckpt",
        )
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


def test_record_shard_write_cut_off_is_not_read_and_the_rerun_completes(tmp_path):
    from lightning_distill.blackbox.sources import FunctionTeacher
    from lightning_distill.blackbox.writer import read_records, shard_paths, write_records

    source = FunctionTeacher(
        lambda prompts, n, seed: [["answer " * 4000] * n for _ in prompts], name="t"
    )
    prompts = [f"question {i}" for i in range(8)]
    with file_size_limit(), pytest.raises(OSError):
        write_records(source, prompts, tmp_path / "records", shard_size=8)
    assert shard_paths(tmp_path / "records") == [] and read_records(tmp_path / "records") == []
    write_records(source, prompts, tmp_path / "records", shard_size=8)
    assert len(read_records(tmp_path / "records")) == 8
    assert not list((tmp_path / "records").glob("*.tmp"))


# ----------------------------------------------------------------------------- a trainable teacher
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _fit(teacher: nn.Module, tmp_path: Path) -> DistillationModule:
    g = torch.Generator().manual_seed(0)
    rows = [{"x": torch.randn(4, generator=g), "labels": torch.tensor(i % 3)} for i in range(16)]
    module = DistillationModule(
        Net(), teacher, {"kd": LogitKD(weight=0.5), "task": TaskLoss(weight=0.5)}
    )
    L.Trainer(
        max_steps=6,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    ).fit(module, DataLoader(rows, batch_size=4))
    return module


def _teacher_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "the teacher was handed over" in str(w.message)]


def test_a_trainable_teacher_is_frozen_with_one_warning(tmp_path):
    teacher = Net().train()  # train mode, 15 trainable parameters
    weights = {k: v.clone() for k, v in teacher.state_dict().items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = _fit(teacher, tmp_path)  # construction and 6 training steps
    assert _teacher_warnings(caught) == [
        "the teacher was handed over in train mode and with 15 trainable parameters; DistillationModule freezes "
        "it (eval mode, requires_grad=False) and never trains it. Pass lightning_distill.models.freeze(teacher) "
        "to make that explicit and drop this warning."
    ]
    assert module.teacher is teacher and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(weights[k], v) for k, v in teacher.state_dict().items())


@pytest.mark.parametrize("state", ["eval, trainable", "train mode, frozen"])
def test_either_fault_alone_is_named(state):
    teacher = Net()
    if state.startswith("eval"):
        teacher.eval()
    else:
        teacher.requires_grad_(False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        DistillationModule(Net(), teacher)
    expected = "with 15 trainable parameters;" if state.startswith("eval") else "in train mode;"
    assert len(_teacher_warnings(caught)) == 1 and expected in _teacher_warnings(caught)[0]


def test_a_frozen_teacher_gets_no_warning(tmp_path):
    from lightning_distill.models import freeze

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(freeze(Net()), tmp_path)
    assert _teacher_warnings(caught) == []
