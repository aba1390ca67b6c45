"""The cache apart from Lightning: it imports alone, a resumed fit restores it, hidden states round-trip."""

from __future__ import annotations

import functools
import subprocess
import sys

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_distill import DistillationModule
from lightning_distill.cache import CacheBuilder
from lightning_distill.callbacks import TeacherCache
from lightning_distill.models import causal_lm_from_config

VOCAB, SEQ = 64, 10


def lm(seed: int, hidden: int = 16) -> torch.nn.Module:
    return causal_lm_from_config("llama", vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                 num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                 max_position_embeddings=32, seed=seed)


class Blocks(Dataset):
    """Right-padded token blocks of different lengths, with stable ids that are not their positions."""

    def __init__(self, n: int = 12) -> None:
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(0))
        self.sample_ids = torch.arange(n) * 7 + 500
        self.lengths = [SEQ - (i % 3) for i in range(n)]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        mask = (torch.arange(SEQ) < self.lengths[i]).long()
        return {"input_ids": self.ids[i], "attention_mask": mask, "labels": self.ids[i].masked_fill(mask == 0, -100),
                "sample_id": int(self.sample_ids[i])}


class Data(L.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        self.train, self.val = Blocks(), Blocks(n=4)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=4)


def module(teacher: bool = True) -> DistillationModule:
    return DistillationModule(lm(0), lm(1, hidden=24) if teacher else None,
                              optimizer=functools.partial(torch.optim.SGD, lr=0.0), metrics_every_n_steps=1)


def _trainer(cache: TeacherCache, max_steps: int) -> L.Trainer:
    return L.Trainer(callbacks=[cache], max_steps=max_steps, limit_val_batches=1, num_sanity_val_steps=0,
                     logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


def test_the_cache_package_imports_without_lightning_or_the_module():
    code = ("import sys, lightning_distill.cache\n"
            "bad = sorted(m for m in sys.modules if m == 'lightning' or m.startswith(('lightning.', "
            "'lightning_distill.module', 'lightning_distill.callbacks', 'lightning_distill.data')))\n"
            "print(bad)\n"
            "sys.exit(1 if bad else 0)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "[]"


def test_the_builder_runs_without_a_trainer_and_the_callback_is_one(tmp_path):
    builder = CacheBuilder(str(tmp_path / "c"), kind="topk", k=4, progress=False)
    data = Data()
    info = builder.build(module(), {"train": data.train_dataloader()})
    assert info["train"]["samples"] == 12 and info["train"]["built"] == 12
    assert info["train"]["positions"] == sum(data.train.lengths)
    again = TeacherCache(str(tmp_path / "c"), kind="topk", k=4, progress=False)
    assert isinstance(again, CacheBuilder)
    assert again.prepare(module(), data, splits=["train"])["train"]["built"] == 0  # the builder's cache, reused


def test_a_resumed_fit_restores_the_cache_it_read(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_DISTILL_CACHE", str(tmp_path / "root"))
    first = TeacherCache(kind="topk", k=4, progress=False)  # dirpath=None: a folder named by the fingerprint
    trainer = _trainer(first, max_steps=2)
    mod = module()
    trainer.fit(mod, Data())
    assert mod.teacher is None  # both splits cached: released, so the checkpoint holds no teacher
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    saved = first.state_dict()
    assert saved["dirpath"].startswith(str(tmp_path / "root" / "teacher_targets"))

    # Without the checkpoint, a teacher-less run cannot name the folder.
    with pytest.raises(ValueError, match="needs the teacher"):
        _trainer(TeacherCache(kind="topk", k=4, progress=False), max_steps=3).fit(module(teacher=False), Data())

    resumed = TeacherCache(kind="topk", k=4, progress=False)
    trainer = _trainer(resumed, max_steps=4)
    student = module(teacher=False)
    with pytest.warns(UserWarning, match="trusted to be of teacher"):
        trainer.fit(student, Data(), ckpt_path=tmp_path / "run.ckpt")
    assert trainer.global_step == 4
    assert resumed.state_dict() == saved  # same folder, same fingerprint
    assert resumed.built == {"train": 0, "val": 0}  # read, nothing built
    assert float(trainer.callback_metrics["train/kd"]) > 0  # the restored cache's targets were used


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_hidden_states_round_trip_within_the_stored_precision(tmp_path, dtype):
    layers = [0, 1, -1]
    cache = TeacherCache(str(tmp_path / "c"), kind="sampled", num_samples=4, dtype=dtype, hidden_layers=layers,
                         splits=["train"], progress=False)
    mod = module()
    data = Data()
    cache.prepare(mod, data)
    batch = next(iter(DataLoader(data.train, batch_size=5)))
    cache.attach("train", mod, batch)  # the callback's per-batch read
    hidden = batch["teacher_targets"].hidden_states
    with torch.no_grad():
        out = mod.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          output_hidden_states=True)
    stored = getattr(torch, dtype)
    assert len(hidden) == len(layers)
    valid = batch["attention_mask"].bool()
    for got, layer in zip(hidden, layers, strict=True):
        want = out.hidden_states[layer]
        assert got.shape == want.shape and got.dtype == torch.float32
        assert bool((got[~valid] == 0).all())  # nothing is stored past a sample's length
        # Equal up to one rounding to the stored dtype (half a unit in the last place, relative).
        torch.testing.assert_close(got[valid], want[valid], rtol=torch.finfo(stored).eps, atol=1e-6)
        assert not torch.equal(got[valid], want[valid])  # it was rounded: the stored dtype is the one asked for
