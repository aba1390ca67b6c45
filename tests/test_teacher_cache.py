"""TeacherCache: what is stored round-trips, identity is enforced, builds resume, damage is caught."""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_distill import DistillationModule
from lightning_distill.cache import (
    CacheCorruptedError,
    CacheMismatchError,
    CacheSpec,
    CacheStorage,
    SplitReader,
    cache_fingerprint,
    check_fingerprint,
    token_hash,
)
from lightning_distill.callbacks import TeacherCache
from lightning_distill.losses import LogitKD, TaskLoss
from lightning_distill.models import causal_lm_from_config

VOCAB, SEQ = 96, 12


def lm(seed: int, hidden: int = 16, vocab: int = VOCAB) -> torch.nn.Module:
    return causal_lm_from_config("llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                 num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                 max_position_embeddings=32, seed=seed)


class Blocks(Dataset):
    """Token blocks with stable ids that are not their positions (ids start at 1000, step 3)."""

    def __init__(self, n: int = 24, seed: int = 0, lengths: list[int] | None = None) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
        self.sample_ids = torch.arange(n) * 3 + 1000
        self.lengths = lengths or [SEQ] * n

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        n = self.lengths[i]
        mask = (torch.arange(SEQ) < n).long()
        labels = self.ids[i].masked_fill(mask == 0, -100)
        return {"input_ids": self.ids[i], "attention_mask": mask, "labels": labels,
                "sample_id": int(self.sample_ids[i]), "slice": "a"}


class Data(L.LightningDataModule):
    def __init__(self, train: Dataset, val: Dataset | None = None, batch_size: int = 4) -> None:
        super().__init__()
        self.train, self.val, self.batch_size = train, val, batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(0))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val if self.val is not None else self.train, batch_size=self.batch_size)


def module(teacher_seed: int = 1, kd: LogitKD | None = None, **kwargs) -> DistillationModule:
    return DistillationModule(lm(0), lm(teacher_seed, hidden=24),
                              {"kd": kd or LogitKD(weight=0.5), "task": TaskLoss(weight=0.5)},
                              optimizer=functools.partial(torch.optim.SGD, lr=0.0), **kwargs)


def prepare(tmp_path, kind: str, data: Data | None = None, mod: DistillationModule | None = None, **kwargs):
    cache = TeacherCache(str(tmp_path / "cache"), kind=kind, splits=["train"], progress=False, **kwargs)
    mod = mod or module()
    info = cache.prepare(mod, data or Data(Blocks()))
    return cache, mod, info


def teacher_logits(mod: DistillationModule, ds: Blocks, index: list[int]) -> torch.Tensor:
    ids = ds.ids[index]
    with torch.no_grad():
        return mod.teacher(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()


def shifted(ds: Blocks, index: list[int]) -> torch.Tensor:
    labels = torch.stack([ds[i]["labels"] for i in index])
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)


# ----------------------------------------------------------------------------- round trips
def test_dense_round_trip_is_the_fp16_logits_in_any_order(tmp_path):
    cache, mod, info = prepare(tmp_path, "dense", compression=None)
    ds = cache.readers["train"]
    data = Blocks()
    order = [5, 0, 17, 3]
    targets = ds.read(data.sample_ids[order], (4, SEQ), "cpu", input_ids=data.ids[order])
    expected = teacher_logits(mod, data, order).half().float()
    assert torch.equal(targets.logits, expected)
    assert info["train"]["samples"] == 24 and info["train"]["positions"] == 24 * SEQ
    assert info["train"]["bytes_per_token"] > 2 * VOCAB  # logits plus a little per sample


def test_topk_round_trip_and_tail_mass(tmp_path):
    cache, mod, _ = prepare(tmp_path, "topk", k=5)
    data = Blocks()
    order = [7, 2]
    t = cache.readers["train"].read(data.sample_ids[order], (2, SEQ), "cpu", input_ids=data.ids[order])
    logits = teacher_logits(mod, data, order).double()
    log_p = logits.log_softmax(-1)
    top = log_p.topk(5, -1)
    assert torch.equal(t.sparse.ids, top.indices)
    assert torch.equal(t.sparse.logprobs, top.values.half().float())
    tail = torch.log1p(-top.values.exp().sum(-1))
    assert torch.allclose(t.sparse.tail_logprob, tail.float(), atol=2e-3, rtol=1e-3)
    assert torch.equal(t.top1, log_p.argmax(-1))
    labels = shifted(data, order)
    valid = labels != -100
    want = torch.where(valid, log_p.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1), 0.0)
    assert torch.equal(t.label_logprobs, want.half().float())


def test_sampled_round_trip_counts_ids_logprobs(tmp_path):
    cache, mod, _ = prepare(tmp_path, "sampled", num_samples=20, store_logprobs=True)
    data = Blocks()
    order = [1, 9, 4]
    t = cache.readers["train"].read(data.sample_ids[order], (3, SEQ), "cpu", input_ids=data.ids[order])
    s = t.sparse
    valid = s.ids >= 0
    assert torch.equal(s.counts.sum(-1), torch.full((3, SEQ), 20.0))
    assert bool((s.counts[valid] >= 1).all()) and bool((s.counts[~valid] == 0).all())
    for row_ids, row_valid in zip(s.ids.reshape(-1, s.ids.shape[-1]), valid.reshape(-1, s.ids.shape[-1])):
        real = row_ids[row_valid]
        assert real.unique().numel() == real.numel()  # distinct ids
    log_p = teacher_logits(mod, data, order).log_softmax(-1)
    gathered = log_p.gather(-1, s.ids.clamp_min(0))
    assert torch.equal(s.logprobs[valid], gathered[valid].half().float())
    assert torch.equal(t.top1, log_p.argmax(-1))
    assert s.num_samples == 20 and s.vocab_size == VOCAB


def test_sampled_draws_follow_the_teacher_distribution(tmp_path):
    """Counts / N over many positions match the teacher's probabilities (chi-square style bound)."""
    cache, mod, _ = prepare(tmp_path, "sampled", num_samples=200)
    data = Blocks()
    order = list(range(24))
    t = cache.readers["train"].read(data.sample_ids[order], (24, SEQ), "cpu")
    p = teacher_logits(mod, data, order).softmax(-1)
    est = torch.zeros_like(p).scatter_add_(-1, t.sparse.ids.clamp_min(0), t.sparse.counts / 200)
    # Standard error of a frequency at n=200 is sqrt(p(1-p)/200) <= 0.036; allow 5 sigma.
    assert (est - p).abs().max() < 5 * 0.036
    assert (est - p).mean().abs() < 1e-3  # unbiased on average


def test_variable_lengths_pad_past_each_sample(tmp_path):
    lengths = [SEQ - (i % 4) for i in range(24)]
    data = Blocks(lengths=lengths)
    cache, mod, info = prepare(tmp_path, "topk", data=Data(data), k=3)
    assert info["train"]["positions"] == sum(lengths)
    order = [3, 0]
    t = cache.readers["train"].read(data.sample_ids[order], (2, SEQ), "cpu")
    assert bool((t.sparse.ids[0, lengths[3]:] == -1).all()) and bool((t.sparse.ids[0, : lengths[3]] >= 0).all())
    assert bool((t.sparse.ids[1] >= 0).all())


def test_hidden_states_are_stored(tmp_path):
    cache, mod, _ = prepare(tmp_path, "topk", k=2, hidden_layers=[-1, 0])
    data = Blocks()
    t = cache.readers["train"].read(data.sample_ids[[2]], (1, SEQ), "cpu")
    with torch.no_grad():
        out = mod.teacher(input_ids=data.ids[[2]], output_hidden_states=True)
    assert len(t.hidden_states) == 2
    assert torch.equal(t.hidden_states[0], out.hidden_states[-1].half().float())
    assert torch.equal(t.hidden_states[1], out.hidden_states[0].half().float())


def test_sampled_without_logprobs_and_uncompressed_shards(tmp_path):
    small, _, a = prepare(tmp_path / "a", "sampled", num_samples=20)
    plain, _, b = prepare(tmp_path / "b", "sampled", num_samples=20, store_logprobs=True, compression=None)
    assert small.spec.store_logprobs is False and a["train"]["bytes"] < b["train"]["bytes"]
    data = Blocks()
    x = small.readers["train"].read(data.sample_ids[:3], (3, SEQ), "cpu")
    y = plain.readers["train"].read(data.sample_ids[:3], (3, SEQ), "cpu")
    assert x.sparse.logprobs is None and y.sparse.logprobs is not None
    assert torch.equal(x.sparse.ids, y.sparse.ids) and torch.equal(x.sparse.counts, y.sparse.counts)
    from safetensors.torch import load_file

    shard = next((tmp_path / "b" / "cache" / "train" / "shards").glob("*.safetensors"))
    assert "ent.logprobs" in load_file(shard)  # uncompressed shards are plain safetensors files


def test_ids_use_the_smallest_integer_type():
    assert CacheSpec("topk", vocab_size=256, k=1).id_dtype == torch.uint8
    assert CacheSpec("topk", vocab_size=50_000, k=1).id_dtype == torch.uint16
    assert CacheSpec("topk", vocab_size=151_936, k=1).id_dtype == torch.int32
    assert CacheSpec("sampled", vocab_size=10, num_samples=50).count_dtype == torch.uint8


def test_fsspec_memory_url(tmp_path):
    url = f"memory://ld-test-{os.getpid()}/cache"
    cache = TeacherCache(url, kind="sampled", num_samples=8, splits=["train"], progress=False)
    mod = module()
    cache.prepare(mod, Data(Blocks()))
    storage = CacheStorage(url)
    assert storage.exists("cache.json") and storage.exists("train", "index.json")
    again = TeacherCache(url, kind="sampled", num_samples=8, splits=["train"], progress=False)
    info = again.prepare(module(), Data(Blocks()))
    assert info["train"]["built"] == 0 and info["train"]["samples"] == 24
    storage.fs.rm(storage.root, recursive=True)


# ----------------------------------------------------------------------------- identity
def _fp(**over):
    base = dict(teacher={"class": "T", "weights_sha256": "aa"}, tokenizer="tok", data="data", kind="topk",
                params={"k": 8})
    return cache_fingerprint(**{**base, **over})


@pytest.mark.parametrize("component, change", [
    ("teacher", {"teacher": {"class": "T", "weights_sha256": "bb"}}),
    ("tokenizer", {"tokenizer": "other"}),
    ("data", {"data": "other"}),
    ("kind", {"kind": "sampled"}),
    ("params", {"params": {"k": 16}}),
])
def test_fingerprint_refuses_each_component(component, change):
    with pytest.raises(CacheMismatchError) as err:
        check_fingerprint(_fp(), _fp(**change), where="/c")
    message = str(err.value)
    assert f"- {component}:" in message and "Rebuild" in message and "on_mismatch='rebuild'" in message
    others = [c for c in ("teacher", "tokenizer", "data", "kind", "params", "format") if c != component]
    assert not any(f"- {c}:" in message for c in others)


def test_fingerprint_refuses_another_format_version():
    old = {**_fp(), "format": 0}
    with pytest.raises(CacheMismatchError, match="- format: cache has 0"):
        check_fingerprint(old, _fp(), where="/c")


def test_callback_refuses_a_cache_of_another_teacher_then_rebuilds_on_request(tmp_path):
    prepare(tmp_path, "topk", k=4)
    with pytest.raises(CacheMismatchError, match="- teacher:"):
        prepare(tmp_path, "topk", k=4, mod=module(teacher_seed=7))
    with pytest.raises(CacheMismatchError, match="- params:.*\"k\": 4.*\"k\": 8"):
        prepare(tmp_path, "topk", k=8)
    with pytest.raises(CacheMismatchError, match="- kind:"):
        prepare(tmp_path, "sampled")
    _, _, info = prepare(tmp_path, "topk", k=8, on_mismatch="rebuild")
    assert info["train"]["built"] == 24


def test_callback_refuses_other_tokenizer_and_data(tmp_path):
    from lightning_distill.data.tokenizer import train_bpe_tokenizer

    texts = ["def f(x):\n    return x + 1\n" * 20, "The quick brown fox jumps over the lazy dog. " * 20]
    data = Data(Blocks())
    data.tokenizer = train_bpe_tokenizer(texts, 300, tmp_path / "tok1")
    data.data_fingerprint = "blocks-v1"
    prepare(tmp_path, "topk", data=data, k=2)
    data.tokenizer = train_bpe_tokenizer(texts[:1], 280, tmp_path / "tok2")
    with pytest.raises(CacheMismatchError, match="- tokenizer:"):
        prepare(tmp_path, "topk", data=data, k=2)
    data.tokenizer = train_bpe_tokenizer(texts, 300, tmp_path / "tok1")
    data.data_fingerprint = "blocks-v2"
    with pytest.raises(CacheMismatchError, match="- data:") as err:
        prepare(tmp_path, "topk", data=data, k=2)
    assert "- tokenizer:" not in str(err.value)


def test_changed_tokens_under_the_same_id_are_caught_on_read(tmp_path):
    cache, _, _ = prepare(tmp_path, "topk", k=2)
    data = Blocks()
    ids = data.ids[[4, 5]].clone()
    ids[1, 3] = (ids[1, 3] + 1) % VOCAB
    with pytest.raises(CacheMismatchError, match=r"sample ids \[1015\].*other tokens"):
        cache.readers["train"].read(data.sample_ids[[4, 5]], (2, SEQ), "cpu", input_ids=ids)


def test_token_hash_sees_every_token_and_the_length():
    ids = torch.randint(0, 1000, (3, 10), generator=torch.Generator().manual_seed(0))
    full = torch.full((3,), 10)
    base = token_hash(ids, full)
    for pos in range(10):
        changed = ids.clone()
        changed[0, pos] += 1
        assert token_hash(changed, full)[0] != base[0]
    assert token_hash(ids, torch.tensor([9, 10, 10]))[0] != base[0]
    assert torch.equal(token_hash(ids, full), base)


def test_token_hash_matches_its_definition():
    """The stored hash is part of the cache format: h1 << 31 | h2 with h_i = sum_t (x_t + 1) w_i[t]
    mod (2^31 - 1) over the first L tokens (h2 + L), weights from torch.randint(seed i).
    Checked against Python integers (no overflow anywhere)."""
    prime = 2**31 - 1
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 60_000, (4, 37), generator=g)
    lengths = torch.tensor([37, 1, 20, 36])

    def weights(seed):
        return torch.randint(1, prime, (37,), generator=torch.Generator().manual_seed(seed), dtype=torch.int64).tolist()

    w1, w2 = weights(1), weights(2)
    expected = []
    for row, n in zip(ids.tolist(), lengths.tolist()):
        h1 = sum((x + 1) * w for x, w in zip(row[:n], w1)) % prime
        h2 = (sum((x + 1) * w for x, w in zip(row[:n], w2)) % prime + n) % prime
        expected.append(h1 << 31 | h2)
    assert token_hash(ids, lengths).tolist() == expected


def test_unknown_sample_id_is_an_error(tmp_path):
    cache, _, _ = prepare(tmp_path, "topk", k=2)
    with pytest.raises(CacheMismatchError, match=r"no targets for sample ids \[7\]"):
        cache.readers["train"].read(torch.tensor([1000, 7]), (2, SEQ), "cpu")


# ----------------------------------------------------------------------------- safety
class FailingTeacher(torch.nn.Module):
    """Wraps a teacher; raises on call number ``fail_at`` (a killed build), counts samples seen."""

    def __init__(self, inner: torch.nn.Module, fail_at: int | None) -> None:
        super().__init__()
        self.inner, self.fail_at, self.calls, self.samples = inner, fail_at, 0, 0

    def forward(self, input_ids, attention_mask=None):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise KeyboardInterrupt("killed")
        self.samples += input_ids.shape[0]
        return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits


def _sampled_module(fail_at: int | None) -> tuple[DistillationModule, FailingTeacher]:
    teacher = FailingTeacher(lm(1, hidden=24), fail_at)
    mod = DistillationModule(lm(0), teacher, {"kd": LogitKD(weight=0.5), "task": TaskLoss(weight=0.5)},
                             shift_labels=True)
    return mod, teacher


def _vocab_cache(tmp_path, name: str, **kw) -> TeacherCache:
    cache = TeacherCache(str(tmp_path / name), kind="sampled", num_samples=16, splits=["train"], progress=False,
                         shard_mb=1e-4, **kw)  # a shard per batch
    return cache


def test_interrupted_build_resumes_and_equals_a_clean_build(tmp_path):
    data = Data(Blocks())
    mod, teacher = _sampled_module(fail_at=5)  # call 1 probes the vocabulary
    with pytest.raises(KeyboardInterrupt):
        _vocab_cache(tmp_path, "c").prepare(mod, data)
    assert teacher.samples == 4 + 12  # three batches of 4 finished, each in its own shard
    storage = CacheStorage(str(tmp_path / "c"))
    assert not storage.exists("train", "index.json")
    mod2, teacher2 = _sampled_module(fail_at=None)
    resumed = _vocab_cache(tmp_path, "c")
    info = resumed.prepare(mod2, data)
    assert teacher2.samples == 4 + 12 and info["train"]["built"] == 12 and info["train"]["samples"] == 24
    mod3, _ = _sampled_module(fail_at=None)
    clean = _vocab_cache(tmp_path, "clean")
    clean.prepare(mod3, data)
    ids = Blocks().sample_ids[torch.randperm(24, generator=torch.Generator().manual_seed(1))]
    a = resumed.readers["train"].read(ids, (24, SEQ), "cpu").sparse
    b = clean.readers["train"].read(ids, (24, SEQ), "cpu").sparse
    assert torch.equal(a.ids, b.ids) and torch.equal(a.counts, b.counts) and a.logprobs is None


def test_leftover_temporary_and_unlisted_shards_are_never_read(tmp_path):
    data = Data(Blocks())
    mod, _ = _sampled_module(fail_at=4)
    with pytest.raises(KeyboardInterrupt):
        _vocab_cache(tmp_path, "c").prepare(mod, data)
    shards = tmp_path / "c" / "train" / "shards"
    # A shard written but never recorded (killed between the shard and its sidecar) and a partial temp file.
    (shards / "19990101000000-dead00-r000-00000.safetensors").write_bytes(b"partial garbage")
    (shards / "x.safetensors.tmp-1234").write_bytes(b"half")
    mod2, teacher2 = _sampled_module(fail_at=None)
    _vocab_cache(tmp_path, "c").prepare(mod2, data)
    assert teacher2.samples == 4 + 16
    names = os.listdir(shards)
    assert not any("dead00" in n or ".tmp-" in n for n in names)


def test_flipped_byte_is_detected_and_deleting_the_shard_rebuilds_it(tmp_path):
    cache, _, _ = prepare(tmp_path, "topk", k=4, shard_mb=1e-4)
    index = json.loads((tmp_path / "cache" / "train" / "index.json").read_text())
    victim = index["shards"][2]["file"]
    path = tmp_path / "cache" / "train" / "shards" / victim
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    reader = SplitReader(CacheStorage(str(tmp_path / "cache")), "train", cache.spec)
    data = Blocks()
    with pytest.raises(CacheCorruptedError, match=f"{victim}.*corrupted.*Delete that file"):
        reader.read(data.sample_ids, (24, SEQ), "cpu")
    path.unlink()
    _, _, info = prepare(tmp_path, "topk", k=4, shard_mb=1e-4)
    assert info["train"]["built"] == index["shards"][2]["samples"]
    cache = TeacherCache(str(tmp_path / "cache"), kind="topk", k=4, splits=["train"], progress=False)
    cache.prepare(module(), Data(Blocks()))
    cache.readers["train"].read(data.sample_ids, (24, SEQ), "cpu")  # every shard verifies


def test_folder_with_other_files_is_not_overwritten(tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds files but no cache.json"):
        prepare(tmp_path, "topk")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["notes.txt"]  # not even a lock file


def test_a_dirpath_that_is_a_file_is_named_as_a_file(tmp_path):
    (tmp_path / "cache").write_text("not a folder")
    with pytest.raises(ValueError, match=r"dirpath='.*cache'\) is a file, not a folder; pass a folder path"):
        prepare(tmp_path, "topk")
    assert (tmp_path / "cache").read_text() == "not a folder"


@pytest.mark.parametrize("kwargs, match", [
    ({"kind": "logits"}, "kind='logits' is not a cache kind"),
    ({"k": 0}, "k must be >= 1, got 0"),
    ({"num_samples": 0}, r"num_samples must be an int in \[1, 65535\], got 0"),
    ({"sample_temperature": 0.0}, "sample_temperature must be a finite number > 0, got 0.0"),
    ({"dtype": "float32"}, "dtype='float32' is invalid"),
    ({"splits": ["training"]}, "splits=\\['training'\\] is invalid"),
    ({"on_mismatch": "ignore"}, "on_mismatch='ignore' is invalid"),
    ({"shard_mb": 0}, "shard_mb must be a finite number > 0, got 0.0"),
])
def test_bad_arguments_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TeacherCache("/tmp/x", **kwargs)


def test_dense_warns_for_large_vocabularies(tmp_path):
    big = 9000
    mod = DistillationModule(lm(0, vocab=big), lm(1, vocab=big), optimizer=functools.partial(torch.optim.SGD, lr=0.0))
    g = torch.Generator().manual_seed(0)

    class Big(Blocks):
        def __init__(self):
            super().__init__(n=2)
            self.ids = torch.randint(0, big, (2, SEQ), generator=g)

    with pytest.warns(UserWarning, match="dense teacher cache stores 2 x 9000"):
        TeacherCache(str(tmp_path / "c"), kind="dense", splits=["train"], progress=False).prepare(mod, Data(Big(), batch_size=2))


# ----------------------------------------------------------------------------- ranks
DDP_SCRIPT = Path(__file__).resolve().parent / "scripts" / "ddp_cache.py"


def _run_script(tmp_path: Path, cache_dir: Path, devices: int) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(DDP_SCRIPT), str(cache_dir), str(devices)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.slow
def test_two_rank_build_is_read_by_one_rank_and_equals_a_one_rank_build(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("ddp_cache", DDP_SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    two = tmp_path / "two"
    _run_script(tmp_path, two, devices=2)
    ranks = [json.loads((tmp_path / f"two.rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["built"] for r in ranks] == [10, 10]  # each rank built half
    assert all(r["teacher_released"] and r["loss_finite"] for r in ranks)
    index = json.loads((two / "train" / "index.json").read_text())
    assert {s["file"].split("-")[2] for s in index["shards"]} == {"r000", "r001"} and index["samples"] == 20

    # One process (this one) reads the 2-rank cache (nothing to build) and trains from it.
    script.main(str(two), 1)
    assert json.loads((tmp_path / "two.rank0.json").read_text())["built"] == 0

    # Same targets as a cache built by one process: draws depend on the sample id only.
    reread = script.cache(str(two))
    reread.prepare(script.module(), script.Data())
    one = script.cache(str(tmp_path / "one"))
    one.prepare(script.module(), script.Data())
    ids = script.Blocks().sample_ids.flip(0)
    a = reread.readers["train"].read(ids, (20, script.SEQ), "cpu", input_ids=script.Blocks().ids.flip(0))
    b = one.readers["train"].read(ids, (20, script.SEQ), "cpu")
    assert torch.equal(a.sparse.ids, b.sparse.ids) and torch.equal(a.sparse.counts, b.sparse.counts)
    assert torch.equal(a.label_logprobs, b.label_logprobs)


# ----------------------------------------------------------------------------- the command
SAMPLED = ("callbacks=teacher_cache_sampled", "callbacks.teacher_cache.num_samples=16")


def _cli(tmp_path: Path, *args: str, cache: tuple[str, ...] = SAMPLED) -> subprocess.CompletedProcess:
    env = {**os.environ, "LIGHTNING_DISTILL_CACHE": str(tmp_path / "root"), "TOKENIZERS_PARALLELISM": "false",
           "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "lightning_distill", "experiment=tiny", "baseline=false",
                             *cache, *args],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


@pytest.mark.slow
def test_cached_demo_builds_alone_then_trains_then_reuses(tmp_path):
    built = _cli(tmp_path, "+build_cache_only=true", f"output_dir={tmp_path / 'build'}")
    assert "Teacher cache (sampled)" in built.stdout and "| train |" in built.stdout
    assert not (tmp_path / "build" / "report.json").exists()  # nothing trained

    out = tmp_path / "run1"
    trained = _cli(tmp_path, f"output_dir={out}")
    assert "student ppl" in trained.stdout
    record = json.loads((out / "student" / "distillation.json").read_text())
    cache = record["teacher_cache"]
    assert cache["kind"] == "sampled" and set(cache["splits"]) == {"train", "val", "test"}
    assert all(s["built_now"] == 0 for s in cache["splits"].values())  # the build-only run did it
    assert cache["splits"]["train"]["bytes_per_token"] > 0
    report = json.loads((out / "report.json").read_text())
    for stats in report["slices"].values():  # teacher perplexity from the cached label log-probs
        assert stats["teacher_perplexity"] > 1 and math.isfinite(stats["mean_kl"])
    card = json.loads((out / "student" / "distillation_card.json").read_text())
    assert card["cache"]["kind"] == "sampled"

    # A different kind in the same default location is a different cache (folder per fingerprint).
    topk = _cli(tmp_path, "+build_cache_only=true", f"output_dir={tmp_path / 'build2'}",
                cache=("callbacks=teacher_cache_topk", "callbacks.teacher_cache.k=4"))
    assert "Teacher cache (topk)" in topk.stdout
    assert len(os.listdir(tmp_path / "root" / "teacher_targets")) == 2


# ----------------------------------------------------------------------------- the module on cached targets
def _batch(data: Blocks, index: list[int]) -> dict:
    items = [data[i] for i in index]
    return {k: (torch.stack([it[k] for it in items]) if isinstance(items[0][k], torch.Tensor)
                else torch.tensor([it[k] for it in items]) if k == "sample_id" else [it[k] for it in items])
            for k in items[0]}


def _loss_and_grad(mod: DistillationModule, batch: dict) -> tuple[dict, torch.Tensor]:
    mod.student.zero_grad(set_to_none=True)
    out = mod._shared_step(batch, "train")
    (out["weighted"] / out["count"]).backward()
    head = mod.student.get_output_embeddings().weight.grad.clone()
    return {k: float(v.detach()) / float(out["count"]) for k, v in out["sums"].items()}, head


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_cache_with_k_equal_v_trains_like_the_live_teacher(tmp_path, temperature):
    """Full top-k (k = V) from disk gives the live teacher's loss and gradient (fp16 rounding aside)."""
    kd = LogitKD(temperature=temperature, weight=0.5)
    cache, mod, _ = prepare(tmp_path, "topk", k=VOCAB, mod=module(kd=kd))
    data = Blocks()
    batch = _batch(data, [3, 8, 1])
    live_values, live_grad = _loss_and_grad(mod, dict(batch))
    cached = dict(batch)
    cache.attach("train", mod, cached)
    assert cached["teacher_targets"].sparse is not None
    values, grad = _loss_and_grad(mod, cached)
    for name in ("kd", "task"):
        assert values[name] == pytest.approx(live_values[name], rel=2e-3, abs=2e-4)
    torch.testing.assert_close(grad, live_grad, rtol=5e-3, atol=5e-5)


@pytest.mark.parametrize("kind", ["dense", "topk", "sampled"])
def test_fused_kd_and_task_equal_the_terms_apart(tmp_path, kind):
    """At T=1 the module computes forward KL and the task loss in one pass: same numbers as apart."""

    class SeparateKD(LogitKD):  # a subclass is never fused
        pass

    cache, fused_mod, _ = prepare(tmp_path / "a", kind, k=6, num_samples=10)
    separate = DistillationModule(fused_mod.student, fused_mod.teacher,
                                  {"kd": SeparateKD(weight=0.5), "task": TaskLoss(weight=0.5)})
    data = Blocks()
    batch = _batch(data, [0, 5, 9, 2])
    cache.attach("train", fused_mod, batch)
    a, grad_a = _loss_and_grad(fused_mod, dict(batch))
    b, grad_b = _loss_and_grad(separate, dict(batch))
    assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grad_a, grad_b, rtol=1e-4, atol=1e-7)


def test_evaluation_on_cached_targets_reports_the_teacher(tmp_path):
    cache, mod, _ = prepare(tmp_path, "sampled", num_samples=30)
    data = Blocks()
    batch = _batch(data, [4, 6])
    live = mod.evaluate_batch(dict(batch))
    cached = dict(batch)
    cache.attach("train", mod, cached)
    got = mod.evaluate_batch(cached)
    torch.testing.assert_close(got["teacher_nll"], live["teacher_nll"].float(), rtol=1e-3, atol=1e-2)
    assert torch.equal(got["agreement"], live["agreement"]) and torch.equal(got["teacher_correct"],
                                                                             live["teacher_correct"])
    assert torch.equal(got["student_nll"], live["student_nll"])
    assert bool((got["kl"] > 0).all())  # the sampled estimate of a positive KL


def test_fit_from_cache_releases_the_teacher_and_follows_a_schedule(tmp_path):
    from lightning_distill.callbacks import TemperatureSchedule

    data = Data(Blocks(), Blocks(n=8, seed=5))
    mod = module(kd=LogitKD(temperature=2.0, weight=0.5))
    mod.optimizer_factory = functools.partial(torch.optim.SGD, lr=0.1)
    cache = TeacherCache(str(tmp_path / "c"), kind="topk", k=8, splits=["train", "val"], progress=False)
    seen = []

    class Watch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((pl_module.losses["kd"].temperature, batch.get("teacher_targets") is not None))

    schedule = TemperatureSchedule(temperature={"shape": "linear", "start": 3.0, "end": 1.0}, total_steps=6)
    trainer = L.Trainer(max_steps=6, callbacks=[cache, schedule, Watch()], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, val_check_interval=3,
                        limit_val_batches=2, num_sanity_val_steps=1)
    trainer.fit(mod, data)
    assert mod.teacher is None and mod.teacher_identity["weights_sha256"]
    assert [t for t, _ in seen] == pytest.approx([3.0, 2.6, 2.2, 1.8, 1.4, 1.0])
    assert all(has for _, has in seen)  # the targets were attached (Watch runs after the cache)
    assert math.isfinite(float(trainer.callback_metrics["val/kd"]))


def test_sampled_without_logprobs_refuses_another_temperature_before_building(tmp_path):
    from lightning_distill.callbacks import TemperatureSchedule

    for extra, mod in (([], module(kd=LogitKD(temperature=2.0))),
                       ([TemperatureSchedule(temperature={"shape": "linear", "start": 2.0, "end": 1.0})], module())):
        cache = TeacherCache(str(tmp_path / "c"), kind="sampled", splits=["train"], progress=False)
        trainer = L.Trainer(max_steps=1, callbacks=[cache, *extra], logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
        with pytest.raises(ValueError, match="exact only at sample_temperature=1.*store_logprobs=True"):
            trainer.fit(mod, Data(Blocks()))
        assert not (tmp_path / "c").exists()  # refused before any work


def test_fast_path_for_cached_samples_equals_the_general_rule(tmp_path):
    import dataclasses

    from lightning_distill.losses import functional as LF

    cache, _, _ = prepare(tmp_path, "sampled", num_samples=20, store_logprobs=True)
    data = Blocks()
    sparse = cache.readers["train"].read(data.sample_ids[[0, 7]], (2, SEQ), "cpu").sparse
    assert sparse.verified
    fast = LF.sparse_target_logprobs(sparse, 1.0)
    general = LF.sparse_target_logprobs(dataclasses.replace(sparse, verified=False), 1.0)
    valid = fast[3]
    assert torch.equal(valid, general[3])
    assert torch.equal(fast[0][valid], general[0][valid])
    torch.testing.assert_close(fast[1], general[1])
    torch.testing.assert_close(fast[2], general[2])


def test_a_cache_built_for_another_student_vocabulary_is_refused(tmp_path):
    prepare(tmp_path, "topk", k=4)  # built for a student as large as the teacher: nothing folded
    trainer = functools.partial(L.Trainer, max_steps=1, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    cache = TeacherCache(str(tmp_path / "cache"), kind="topk", k=4, splits=["train"], progress=False)
    # With the teacher: the fold is part of the identity, so the unfolded cache is another cache.
    small = DistillationModule(lm(0, vocab=VOCAB - 8), lm(1, hidden=24), vocab_mismatch="slice")
    with pytest.raises(CacheMismatchError, match='params: cache has .*this run has \\{"fold_vocab": 88'):
        trainer(callbacks=[cache]).fit(small, Data(Blocks()))
    # Without the teacher: refused at fit start, with the fix.
    cache = TeacherCache(str(tmp_path / "cache"), kind="topk", k=4, splits=["train"], progress=False)
    alone = DistillationModule(lm(0, vocab=VOCAB - 8), None, vocab_mismatch="slice")
    with pytest.warns(UserWarning, match="trusted"), pytest.raises(
            ValueError, match="student vocabulary \\(88\\) and teacher vocabulary \\(96\\).*index 96 ids, more "
                              "than the student has: build the cache with this student and the teacher attached"):
        trainer(callbacks=[cache]).fit(alone, Data(Blocks()))


EXTRA = 8  # padding rows past the student's vocabulary, as Qwen2.5's 152,064 teacher vs 151,936 student


def _padded_teacher_module(**kwargs) -> DistillationModule:
    return DistillationModule(lm(0), lm(1, hidden=24, vocab=VOCAB + EXTRA), optimizer=functools.partial(
        torch.optim.SGD, lr=0.1), **kwargs)


def test_a_larger_teacher_vocabulary_is_refused_before_building_without_slice(tmp_path):
    mod = _padded_teacher_module()
    cache = TeacherCache(str(tmp_path / "c"), kind="topk", k=4, splits=["train"], progress=False)
    with pytest.raises(ValueError, match="student vocabulary \\(96\\) and teacher vocabulary \\(104\\).*"
                                         "vocab_mismatch='slice'.*nothing was written"):
        _trainer(cache, max_steps=1, limit_val_batches=0).fit(mod, Data(Blocks()))
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("kind", ["topk", "sampled"])
def test_ids_past_the_student_vocabulary_are_folded(tmp_path, kind):
    mod = _padded_teacher_module(vocab_mismatch="slice")
    data = Blocks()
    order = list(range(6))
    logits = teacher_logits(mod, data, order).double()  # (6, SEQ, 104)
    cache = TeacherCache(str(tmp_path / "c"), kind=kind, k=5, num_samples=16, splits=["train"], progress=False)
    trainer = L.Trainer(callbacks=[cache], logger=L.pytorch.loggers.CSVLogger(tmp_path / "logs"), max_steps=2,
                        limit_val_batches=0, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(mod, Data(data))  # trains from the folded cache (the fused KD + task path)
    logged = (tmp_path / "logs" / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "teacher_cache/train/folded_mass_mean" in logged
    assert trainer.global_step == 2 and math.isfinite(float(trainer.callback_metrics["train/loss"]))
    assert cache.spec.fold_vocab == VOCAB and cache.spec.vocab_size == VOCAB + EXTRA
    assert json.loads((tmp_path / "c" / "cache.json").read_text())["fingerprint"]["params"]["fold_vocab"] == VOCAB
    t = cache.readers["train"].read(data.sample_ids[order], (6, SEQ), "cpu", input_ids=data.ids[order])
    sparse = t.sparse
    assert sparse.vocab_size == VOCAB and int(sparse.ids.max()) < VOCAB
    log_p = logits.log_softmax(-1)
    folded = log_p[..., VOCAB:].logsumexp(-1).exp()  # the teacher's mass past the student's ids
    assert float(folded.mean()) > 0.01  # a random teacher: enough mass to see where it goes
    info = cache.config()["splits"]["train"]["folded_mass"]
    all_logits = teacher_logits(mod, data, list(range(len(data)))).double()
    expected = all_logits.log_softmax(-1)[..., VOCAB:].logsumexp(-1).exp()
    assert info["mean"] == pytest.approx(float(expected.mean()), rel=1e-4)
    assert info["max"] == pytest.approx(float(expected.max()), rel=1e-4)
    if kind == "topk":
        top = log_p[..., :VOCAB].topk(5, -1)
        assert torch.equal(sparse.ids, top.indices)
        tail = (1 - top.values.exp().sum(-1)).log()  # includes the folded ids' mass
        torch.testing.assert_close(sparse.tail_logprob.double(), tail, atol=2e-3, rtol=2e-3)
    else:
        assert bool((sparse.counts.sum(-1) == 16).all())  # every draw lands on a student id
        kept = logits[..., :VOCAB].log_softmax(-1)  # the teacher renormalised over them
        entropy = -(kept.exp() * kept).sum(-1)
        torch.testing.assert_close(sparse.entropy.double(), entropy, atol=5e-3, rtol=2e-3)


@pytest.mark.parametrize("uniform", [True, False])
@pytest.mark.parametrize("kind", ["dense", "topk", "sampled"])
def test_batched_reads_equal_sample_by_sample_reads(tmp_path, kind, uniform):
    """A batch read (one index_select per stored tensor and run of same-shard samples) holds
    exactly what reading each sample alone holds: any order, several shards, samples of
    different lengths, 16-bit ids (V = 300) and hidden states."""
    from lightning_distill.cache.format import encode_sample
    from lightning_distill.cache.writer import ShardWriter, merge_index

    vocab, width = 300, 9
    spec = CacheSpec(kind=kind, vocab_size=vocab, k=7, num_samples=20, hidden_layers=(1,), compression=None)
    storage = CacheStorage(str(tmp_path / "c"))
    g = torch.Generator().manual_seed(3)
    encoded = []
    for sample_id in range(12):
        length = width if uniform else width - sample_id % 3  # 9, 8, 7 positions
        logits = torch.randn(length, vocab, generator=g) * 3
        labels = torch.randint(0, vocab, (length,), generator=g)
        labels[0] = -100
        hidden = [torch.randn(length, 5, generator=g)]
        encoded.append(encode_sample(spec, logits, labels, ignore_index=-100, split="train",
                                     sample_id=100 + sample_id, hidden=hidden))
    one = sum(t.numel() * t.element_size() for t in encoded[0].values())
    writer = ShardWriter(storage, "train", shard_bytes=int(3.5 * one))  # about 4 samples a shard
    for sample_id, tensors in enumerate(encoded):
        writer.add(100 + sample_id, sample_id, tensors)
    writer.flush()
    assert len(writer.written) > 2  # several shards
    merge_index(storage, "train")
    reader = SplitReader(storage, "train", spec)
    order = torch.tensor([107, 102, 100, 103, 101, 111, 110, 104, 105])  # runs out of row order
    batch = reader.read(order, (len(order), width), "cpu")
    alone = [reader.read(order[b : b + 1], (1, width), "cpu") for b in range(len(order))]

    def fields(targets):
        out = {"hidden": targets.hidden_states[0], "logits": targets.logits,
               "label_logprobs": targets.label_logprobs, "top1": targets.top1}
        if targets.sparse is not None:
            out.update(ids=targets.sparse.ids, logprobs=targets.sparse.logprobs, counts=targets.sparse.counts,
                       tail=targets.sparse.tail_logprob, entropy=targets.sparse.entropy)
        return {k: v for k, v in out.items() if v is not None}

    got = fields(batch)
    for name, value in got.items():
        rows = [fields(a)[name] for a in alone]
        if name in ("ids", "counts", "logprobs"):  # sampled rows: a batch pads to its widest shard
            k = value.shape[-1]
            fill = -1 if name == "ids" else 0
            rows = [torch.nn.functional.pad(r, (0, k - r.shape[-1]), value=fill) for r in rows]
        torch.testing.assert_close(value, torch.cat(rows), rtol=0, atol=0, msg=name)
    if kind != "dense":
        assert batch.sparse.ids.max() >= 256  # the 16-bit ids came through the batched path
    # Targets are copies: changing them in place leaves what later reads see as it was.
    for value in fields(reader.read(order[:1], (1, width), "cpu")).values():
        value.fill_(7)
    for name, value in fields(reader.read(order[:1], (1, width), "cpu")).items():
        torch.testing.assert_close(value, fields(alone[0])[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("kind", ["topk", "sampled"])
def test_a_label_the_teacher_cannot_score_is_refused_when_building(kind):
    from lightning_distill.cache.format import encode_sample

    spec = CacheSpec(kind=kind, vocab_size=10, k=3, num_samples=5)
    logits = torch.randn(4, 10)
    labels = torch.tensor([1, -100, 12, 3])  # 12: past the teacher's 10 classes
    with pytest.raises(ValueError, match=r"sample 7 \(train\) has label id 12 outside the teacher's 10"):
        encode_sample(spec, logits, labels, ignore_index=-100, split="train", sample_id=7)
    encode_sample(spec, logits, torch.tensor([1, -100, 9, 3]), ignore_index=-100, split="train", sample_id=7)


# ----------------------------------------------------------------------------- concurrent builds
CONCURRENT_SCRIPT = Path(__file__).resolve().parent / "scripts" / "concurrent_cache.py"


@pytest.mark.slow
def test_two_processes_building_one_folder_build_each_sample_once(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    cache_dir = tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, str(CONCURRENT_SCRIPT), str(cache_dir), name], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-4000:]
    reports = [json.loads((tmp_path / f"{name}.json").read_text()) for name in ("a", "b")]
    n, seq = 16, 8
    assert sorted(r["built"] for r in reports) == [0, n]  # the second waited, then found everything built
    index = json.loads((cache_dir / "train" / "index.json").read_text())
    assert index["samples"] == n and index["positions"] == n * seq
    assert sum(s["samples"] for s in index["shards"]) == n  # no shard listed twice
    shards = sorted(p.name for p in (cache_dir / "train" / "shards").iterdir())
    assert len(shards) == 2 * len(index["shards"]) and not [s for s in shards if ".tmp-" in s]
    for report in reports:
        assert report["samples"] == n and report["positions"] == n * seq and report["counts"] == n * seq * 8


def test_the_index_counts_a_sample_written_twice_once(tmp_path):
    from lightning_distill.cache.writer import merge_index

    cache, _, info = prepare(tmp_path, "sampled", num_samples=8, shard_mb=1e-3)
    storage = cache.storage
    before = json.loads((tmp_path / "cache" / "train" / "index.json").read_text())
    # A second build of the same samples that did not see the first (no lock on an object store).
    again = TeacherCache(str(tmp_path / "again"), kind="sampled", num_samples=8, splits=["train"], shard_mb=1e-3,
                         progress=False)
    again.prepare(module(), Data(Blocks()))
    for name in again.storage.list("train", "shards"):
        (tmp_path / "cache" / "train" / "shards" / f"z{name}").write_bytes(
            (tmp_path / "again" / "train" / "shards" / name).read_bytes())
        if name.endswith(".json"):
            sidecar = json.loads((tmp_path / "cache" / "train" / "shards" / f"z{name}").read_text())
            sidecar["file"] = "z" + sidecar["file"]
            (tmp_path / "cache" / "train" / "shards" / f"z{name}").write_text(json.dumps(sidecar))
    index = merge_index(storage, "train", clean=False)
    assert index["samples"] == before["samples"] == 24
    assert index["positions"] == before["positions"] == 24 * SEQ
    assert index["bytes"] == before["bytes"] and len(index["shards"]) == len(before["shards"])
    assert info["train"]["positions"] == 24 * SEQ


# ----------------------------------------------------------------------------- stages
def _trainer(cache: TeacherCache, **kwargs) -> L.Trainer:
    return L.Trainer(callbacks=[cache], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, **kwargs)


def test_test_after_fit_with_explicit_loaders_caches_the_test_split(tmp_path):
    mod = module()
    cache = TeacherCache(str(tmp_path / "c"), kind="topk", k=4, progress=False)
    trainer = _trainer(cache, max_steps=2, limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(mod, DataLoader(Blocks(), batch_size=4), DataLoader(Blocks(n=8, seed=5), batch_size=4))
    assert mod.teacher is not None  # the test split may still come: the teacher stays
    trainer.test(mod, DataLoader(Blocks(n=8, seed=7), batch_size=4))
    assert set(cache.readers) == {"train", "val", "test"} and mod.teacher is None  # all cached: released
    assert math.isfinite(float(trainer.callback_metrics["test/kd"]))


def test_a_datamodule_without_a_test_split_releases_the_teacher_at_fit(tmp_path):
    mod = module()
    cache = TeacherCache(str(tmp_path / "c"), kind="topk", k=4, progress=False)
    _trainer(cache, max_steps=1, limit_val_batches=1, num_sanity_val_steps=0).fit(mod, Data(Blocks()))
    assert mod.teacher is None and set(cache.readers) == {"train", "val"}


def test_without_a_teacher_a_cache_means_kd_plus_task_by_default(tmp_path):
    prepare(tmp_path, "topk", k=4)  # built once with the teacher
    student = DistillationModule(lm(0), None, optimizer=functools.partial(torch.optim.SGD, lr=0.0),
                                 metrics_every_n_steps=1)
    assert set(student.losses) == {"task"}  # no teacher and no cache known yet
    cache = TeacherCache(str(tmp_path / "cache"), kind="topk", k=4, splits=["train"], progress=False)
    with pytest.warns(UserWarning, match="trusted to be of teacher"):
        _trainer(cache, max_steps=1, limit_val_batches=0).fit(student, Data(Blocks()))
    assert set(student.losses) == {"kd", "task"}
    assert float(student.trainer.callback_metrics["train/kd"]) > 0  # the cached targets were used


def test_explicit_losses_that_use_no_teacher_target_warn_with_a_cache(tmp_path):
    prepare(tmp_path, "topk", k=4)
    student = DistillationModule(lm(0), None, {"task": TaskLoss()},
                                 optimizer=functools.partial(torch.optim.SGD, lr=0.0))
    cache = TeacherCache(str(tmp_path / "cache"), kind="topk", k=4, splits=["train"], progress=False)
    with pytest.warns(UserWarning, match="no loss term uses them \\(task\\)"):
        _trainer(cache, max_steps=1, limit_val_batches=0).fit(student, Data(Blocks()))
    assert set(student.losses) == {"task"}
