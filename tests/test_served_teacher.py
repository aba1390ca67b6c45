"""A teacher served over HTTP as a top-k teacher cache: the real loopback server over a tiny Llama."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from blackbox_fixtures import WORDS, tiny_model, tiny_tokenizer
from torch.utils.data import DataLoader, Dataset

from lightning_distill import DistillationModule
from lightning_distill.blackbox import ServedTeacher, TeacherRequestError, TokenMismatchError, serve
from lightning_distill.blackbox.server import LoopbackServer, RequestError
from lightning_distill.cache import CacheBuilder, CacheMismatchError
from lightning_distill.callbacks import TeacherCache
from lightning_distill.data.tokenizer import train_bpe_tokenizer
from lightning_distill.losses import LogitKD, TaskLoss

SEQ, K = 12, 5
TEXT = " ".join(WORDS * 5) + "\ndef f(x):\n    return x\n" + " ".join(reversed(WORDS * 3))


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model(tokenizer)


class Blocks(Dataset):
    """Blocks of ``SEQ`` tokens of ``TEXT``; the last two shorter (right padding); ids from 500, step 7."""

    def __init__(self, tokenizer, n: int = 8) -> None:
        ids = tokenizer(TEXT)["input_ids"]
        assert len(ids) >= n * SEQ
        self.ids = torch.tensor(ids[: n * SEQ]).reshape(n, SEQ)
        self.lengths = [SEQ] * (n - 2) + [SEQ - 3, SEQ - 5]
        self.sample_ids = [500 + 7 * i for i in range(n)]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        mask = (torch.arange(SEQ) < self.lengths[i]).long()
        ids = self.ids[i].masked_fill(mask == 0, 0)
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": ids.masked_fill(mask == 0, -100),
            "sample_id": self.sample_ids[i],
        }


class Data(L.LightningDataModule):
    def __init__(self, tokenizer, batch_size: int = 2) -> None:
        super().__init__()
        self.tokenizer, self.batch_size = tokenizer, batch_size
        self.train = Blocks(tokenizer)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train,
            batch_size=self.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(0),
        )


def student_module(tokenizer, teacher=None) -> DistillationModule:
    return DistillationModule(
        tiny_model(tokenizer, seed=3),
        teacher,
        {"kd": LogitKD(weight=0.5), "task": TaskLoss(weight=0.5)},
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
    )


@pytest.fixture
def server(model, tokenizer):
    with serve(model, tokenizer, model_name="tiny") as s:
        yield s


def count_completions(server: LoopbackServer, fail_at: int | None = None) -> list[int]:
    """Count the server's completion requests (``[n]``); the ``fail_at``-th answers 500."""
    calls = [0]
    serve_it = server.completions

    def counted(body):
        calls[0] += 1
        if fail_at is not None and calls[0] == fail_at:
            raise RequestError(500, "the teacher went away (test)", "server_error")
        return serve_it(body)

    server.completions = counted
    return calls


def build(path, module, tokenizer, served=None, **kw) -> CacheBuilder:
    data = Data(tokenizer)
    kw = {"kind": "topk", "k": K, "splits": ["train"], "progress": False, **kw}
    builder = CacheBuilder(str(path), served=served, **kw)
    builder.build(module, {"train": data.train_dataloader()}, tokenizer=tokenizer)
    return builder


def read_all(builder: CacheBuilder, tokenizer):
    ds = Blocks(tokenizer)
    batch = [ds[i] for i in range(len(ds))]
    ids = torch.stack([b["input_ids"] for b in batch])
    sids = torch.tensor([b["sample_id"] for b in batch])
    targets = builder.readers["train"].read(sids, tuple(ids.shape), "cpu", input_ids=ids)
    mask = torch.stack([b["attention_mask"] for b in batch]).bool()
    return targets, mask


def test_served_cache_equals_the_local_models_topk_cache(tmp_path, server, model, tokenizer):
    served = ServedTeacher(server.base_url, "tiny", concurrency=4, max_retries=0)
    s = build(tmp_path / "served", student_module(tokenizer), tokenizer, served)
    local = build(tmp_path / "local", student_module(tokenizer, model), tokenizer)
    got, mask = read_all(s, tokenizer)
    want, _ = read_all(local, tokenizer)
    a, b = got.sparse, want.sparse
    assert torch.equal(a.ids[mask], b.ids[mask])  # same ids, same order, at every stored position
    # Both store float16: the same float32 value rounds to the same half (one ulp apart at most).
    assert torch.allclose(a.logprobs[mask], b.logprobs[mask], rtol=0, atol=4e-3)
    assert torch.allclose(a.tail_logprob[mask], b.tail_logprob[mask], rtol=0, atol=4e-3)
    assert torch.allclose(got.label_logprobs[mask], want.label_logprobs[mask], rtol=0, atol=4e-3)
    assert (a.tail_logprob[mask] < 0).all() and (got.label_logprobs[mask] <= 0).all()
    # Before the 16-bit rounding: the server's numbers are the model's log-softmax to ~1e-5.
    ds = Blocks(tokenizer)
    for i in (0, len(ds) - 1):
        ids = ds.ids[i, : ds.lengths[i]]
        answer = served.sample_logprobs(
            ids.tolist(), k=K, tokenizer=tokenizer, vocab_size=len(tokenizer), sample=f"sample {i}"
        )
        with torch.no_grad():
            logp = torch.log_softmax(model(ids[None]).logits[0].double(), -1)
        top = logp.topk(K, -1)
        assert np.array_equal(answer.top_ids, top.indices.numpy())
        np.testing.assert_allclose(answer.top_logprobs, top.values.numpy(), atol=1e-5)
        np.testing.assert_allclose(
            answer.next_logprobs[:-1], logp[:-1].gather(-1, ids[1:, None])[:, 0], atol=1e-5
        )
        tail = np.log1p(-np.exp(answer.top_logprobs).sum(-1))
        np.testing.assert_allclose(
            tail, torch.logsumexp(logp.scatter(-1, top.indices, -torch.inf), -1), atol=1e-5
        )
    # Identity: the served teacher is named by what serves it, never confused with the local model.
    assert s.fingerprint["teacher"] == {
        "source": "served",
        "model_name": "tiny",
        "base_url": server.base_url,
    }
    assert s.fingerprint["teacher"] != local.fingerprint["teacher"]
    assert s.fingerprint["tokenizer"] == local.fingerprint["tokenizer"]
    assert s.config()["teacher"]["model_name"] == "tiny"
    with pytest.raises(CacheMismatchError, match="teacher: cache has .*served"):
        build(tmp_path / "served", student_module(tokenizer, model), tokenizer)
    with pytest.raises(CacheMismatchError, match="teacher: cache has"):
        build(tmp_path / "local", student_module(tokenizer), tokenizer, served)


def test_fit_reads_the_served_cache_and_a_second_run_asks_nothing(tmp_path, server, tokenizer):
    calls = count_completions(server)
    data = Data(tokenizer)

    def fit(served=True):
        module = student_module(tokenizer)
        cache = TeacherCache(
            str(tmp_path / "c"),
            kind="topk",
            k=K,
            splits=["train"],
            progress=False,
            served=ServedTeacher(server.base_url, "tiny", max_retries=0) if served else None,
        )
        trainer = L.Trainer(
            max_steps=4,
            callbacks=[cache],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
        )
        before = [p.detach().clone() for p in module.student.parameters()]
        trainer.fit(module, datamodule=data)
        assert module.teacher is None and trainer.global_step == 4
        assert any(not torch.equal(p0, p) for p0, p in zip(before, module.student.parameters()))
        assert torch.isfinite(trainer.callback_metrics["train/loss"])
        return cache

    cache = fit()
    assert calls[0] == len(data.train) + 1  # every sample once, plus the tokenizer check
    assert cache.config()["splits"]["train"]["built_now"] == len(data.train)
    cache = fit()
    assert calls[0] == len(data.train) + 1  # the second run reads the cache: no sample asked again
    assert cache.config()["splits"]["train"]["built_now"] == 0
    requests = server.requests
    with pytest.warns(UserWarning, match="trusted to be of teacher .*'source': 'served'"):
        fit(served=False)  # the server is not needed to read the cache (without its identity check)
    assert server.requests == requests


def test_an_interrupted_build_resumes_with_only_the_missing_samples(tmp_path, server, tokenizer):
    served = ServedTeacher(server.base_url, "tiny", concurrency=1, max_retries=0)
    calls = count_completions(server, fail_at=6)  # check + samples 1-4 answered; the 5th fails
    with pytest.raises(TeacherRequestError, match="HTTP 500: the teacher went away"):
        build(
            tmp_path / "c",
            student_module(tokenizer),
            tokenizer,
            served,
            shard_mb=1e-6,
            build_batch_size=1,
        )
    assert calls[0] == 6
    builder = build(
        tmp_path / "c",
        student_module(tokenizer),
        tokenizer,
        ServedTeacher(server.base_url, "tiny", max_retries=0),
        shard_mb=1e-6,
    )
    assert calls[0] == 6 + 1 + 4  # the check, then the 4 samples not stored
    assert builder.built["train"] == 4
    clean = build(
        tmp_path / "clean",
        student_module(tokenizer),
        tokenizer,
        ServedTeacher(server.base_url, "tiny", max_retries=0),
    )
    got, mask = read_all(builder, tokenizer)
    want, _ = read_all(clean, tokenizer)
    assert torch.equal(got.sparse.ids[mask], want.sparse.ids[mask])
    assert torch.equal(got.sparse.logprobs[mask], want.sparse.logprobs[mask])


def test_a_server_with_another_tokenizer_is_refused_before_anything_is_stored(tmp_path, tokenizer):
    other_tok = train_bpe_tokenizer(
        ["gamma alpha delta beta " * 8, "class import return def of the\n"], 300
    )
    with serve(tiny_model(other_tok), other_tok, model_name="other") as other:
        data = Data(tokenizer)
        module = student_module(tokenizer)
        cache = TeacherCache(
            str(tmp_path / "c"),
            kind="topk",
            k=K,
            splits=["train"],
            progress=False,
            served=ServedTeacher(other.base_url, "other", max_retries=0),
        )
        trainer = L.Trainer(
            max_steps=2,
            callbacks=[cache],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
        )
        with pytest.raises(TokenMismatchError) as info:
            trainer.fit(module, datamodule=data)
    message = str(info.value)
    assert "sample 5" in message and "differ at position" in message  # sample ids are 500, 507, ...
    assert "the student has id" in message and "the server id" in message
    assert (
        "same tokenizer" not in message
        and "serve a teacher with the student's tokenizer" in message
    )
    assert trainer.global_step == 0
    assert not list((tmp_path / "c").glob("train/shards/*.json"))


def test_top_k_width_and_vocabulary_are_checked(tmp_path, model, tokenizer):
    class Narrow(LoopbackServer):  # serves one log-probability fewer than asked
        def completions(self, body):
            out = super().completions(body)
            for entry in out["choices"][0]["logprobs"]["top_logprobs"][1:]:
                for key in sorted(entry, key=entry.get)[: len(entry) - body["logprobs"] + 1]:
                    del entry[key]
            return out

    with Narrow(model, tokenizer, model_name="tiny") as narrow:
        with pytest.raises(
            ValueError, match=r"returned 4 log-probabilities at position 0 .* lower the cache's k"
        ):
            build(
                tmp_path / "a",
                student_module(tokenizer),
                tokenizer,
                ServedTeacher(narrow.base_url, "tiny", max_retries=0),
            )
    with serve(model, tokenizer, model_name="tiny") as server:
        served = ServedTeacher(server.base_url, "tiny", max_retries=0)
        with pytest.raises(TokenMismatchError, match="past the student's 40 ids"):
            served.sample_logprobs(
                Blocks(tokenizer).ids[0].tolist(),
                k=K,
                tokenizer=tokenizer,
                vocab_size=40,
                sample="sample 0",
            )
        with pytest.raises(
            TeacherRequestError, match="'logprobs' must be at most 20"
        ):  # the server's own limit
            build(tmp_path / "b", student_module(tokenizer), tokenizer, served, k=25)
        with pytest.raises(ValueError, match="does not serve model 'nope'"):
            build(
                tmp_path / "d",
                student_module(tokenizer),
                tokenizer,
                ServedTeacher(server.base_url, "nope"),
            )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"kind": "sampled"}, "kind='topk'"),
        ({"top_k": 7}, r"top_k=7\) and the cache's k=5 differ"),
        ({"hidden_layers": [-1]}, "no hidden states"),
    ],
)
def test_what_a_served_teacher_cannot_build_is_refused(kwargs, match):
    served = ServedTeacher("http://127.0.0.1:9/v1", "m", top_k=kwargs.pop("top_k", None))
    with pytest.raises(ValueError, match=match):
        CacheBuilder("unused", **{"kind": "topk", "k": K, **kwargs}, served=served)


@pytest.mark.slow
def test_cli_teacher_served_builds_the_cache_from_the_server_then_trains(tmp_path, monkeypatch):
    """``teacher=served callbacks=teacher_cache_topk``: no teacher in this process; the cache comes
    from the server (``+build_cache_only=true``: built alone), then training and the test scores
    read it without asking the server for any sample."""
    from hydra import compose, initialize_config_dir

    from lightning_distill.cli import CONFIG_DIR, _instantiate, run

    monkeypatch.setenv("LIGHTNING_DISTILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def config(server, run_dir, *more):
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return compose(
                config_name="distill",
                overrides=[
                    "experiment=tiny",
                    "teacher=served",
                    f"teacher.base_url={server.base_url}",
                    "teacher.model=tiny-served",
                    "teacher.max_retries=0",
                    "callbacks=teacher_cache_topk",
                    "callbacks.teacher_cache.k=8",
                    "callbacks.teacher_cache.progress=false",
                    f"callbacks.teacher_cache.dirpath={tmp_path / 'served-cache'}",
                    "baseline=false",
                    "logger=none",
                    f"output_dir={tmp_path / run_dir}",
                    *more,
                ],
            )

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        data = _instantiate(compose(config_name="distill", overrides=["experiment=tiny"]).data)
    data.prepare_data()
    with serve(tiny_model(data.tokenizer), data.tokenizer, model_name="tiny-served") as server:
        calls = count_completions(server)
        built = run(config(server, "build", "+build_cache_only=true"))
        asked = calls[0]
        splits = built["teacher_cache"]["splits"]
        assert set(splits) == {"train", "val", "test"} and splits["train"]["samples"] == 64
        assert (
            asked == sum(s["built_now"] for s in splits.values()) + 1
        )  # each sample once, + the check
        assert built["teacher_cache"]["teacher"]["model_name"] == "tiny-served"
        report = run(config(server, "run"))
        assert calls[0] == asked  # the cache is reused: no sample asked again
        card = json.loads((Path(report["student_dir"]) / "distillation_card.json").read_text())
        assert (
            card["teacher"]["source"] == "served" and card["teacher"]["model_name"] == "tiny-served"
        )
        assert card["cache"]["kind"] == "topk" and card["cache"]["params"]["k"] == 8
        assert set(report["slices"]) == {"prose", "code"}


def char_level(tokenizer):
    """The same vocabulary without its merges: every word split into single bytes."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    state["model"]["merges"] = []
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(state)))
    tok.eos_token, tok.pad_token = tokenizer.eos_token, tokenizer.pad_token
    return tok


def test_a_student_tokenizer_that_splits_differently_is_refused(tmp_path, server, tokenizer):
    student_tok = char_level(tokenizer)
    assert student_tok.get_vocab() == tokenizer.get_vocab()  # same ids, other splits
    data = Data(student_tok)
    builder = CacheBuilder(
        str(tmp_path / "c"),
        kind="topk",
        k=K,
        splits=["train"],
        progress=False,
        served=ServedTeacher(server.base_url, "tiny", max_retries=0),
    )
    with pytest.raises(
        TokenMismatchError, match=r"differ at position 0: the student has id 65 \('a'\)"
    ):
        builder.build(
            student_module(tokenizer), {"train": data.train_dataloader()}, tokenizer=student_tok
        )


def test_text_prompts_give_the_same_cache_and_every_sample_is_checked(tmp_path, server, tokenizer):
    ids_mode = build(
        tmp_path / "ids",
        student_module(tokenizer),
        tokenizer,
        ServedTeacher(server.base_url, "tiny", max_retries=0),
    )
    text_mode = build(
        tmp_path / "text",
        student_module(tokenizer),
        tokenizer,
        ServedTeacher(server.base_url, "tiny", prompt="text", max_retries=0),
    )
    got, mask = read_all(text_mode, tokenizer)
    want, _ = read_all(ids_mode, tokenizer)
    assert torch.equal(got.sparse.ids[mask], want.sparse.ids[mask])
    assert torch.equal(got.sparse.logprobs[mask], want.sparse.logprobs[mask])
    # Sample 2 (id 514) with its second token spelled byte by byte: its text reads back otherwise.
    data = Data(tokenizer)
    row = data.train.ids[2].tolist()
    start = 1
    spelled = tokenizer.convert_tokens_to_ids(list(tokenizer.convert_ids_to_tokens(row[start])))
    assert len(spelled) > 1
    data.train.ids[2] = torch.tensor((row[:start] + spelled + row[start + 1 :])[:SEQ])
    first = re.escape(repr(tokenizer.decode([spelled[0]])))
    builder = CacheBuilder(
        str(tmp_path / "bad"),
        kind="topk",
        k=K,
        splits=["train"],
        progress=False,
        build_batch_size=8,
        served=ServedTeacher(server.base_url, "tiny", prompt="text", max_retries=0),
    )
    with pytest.raises(
        TokenMismatchError,
        match=rf"sample 514 \(train\): the server's prompt tokens and the "
        rf"sample's ids differ at position {start}: the student has id {spelled[0]} \({first}\)",
    ):
        builder.build(
            student_module(tokenizer), {"train": data.train_dataloader()}, tokenizer=tokenizer
        )


def test_token_strings_are_mapped_through_the_tokenizer_or_refused(server, tokenizer):
    """Without token ids in the answer, strings are mapped back through the tokenizer (the prompt's
    words); a string several ids decode to (the 128 byte tokens that decode to U+FFFD, which this
    random teacher ranks high) is refused."""
    served = ServedTeacher(server.base_url, "tiny", return_token_ids=False, max_retries=0)
    ids = Blocks(tokenizer).ids[0].tolist()
    served.check_tokenizer(tokenizer, ids, k=1, sample="sample 0")  # prompt strings -> the same ids
    with_ids = ServedTeacher(server.base_url, "tiny", max_retries=0).sample_logprobs(
        ids, k=K, tokenizer=tokenizer, vocab_size=len(tokenizer), sample="sample 0"
    )
    ambiguous = {i for i in range(len(tokenizer)) if tokenizer.decode([i]) == "\ufffd"}
    assert len(ambiguous) == 128 and ambiguous & set(with_ids.top_ids.reshape(-1).tolist())
    with pytest.raises(
        TokenMismatchError, match="'\ufffd', which names several ids. Serve with token ids"
    ):
        served.sample_logprobs(
            ids, k=K, tokenizer=tokenizer, vocab_size=len(tokenizer), sample="sample 0"
        )


def test_the_api_key_reaches_no_file_of_the_cache(tmp_path, model, tokenizer, monkeypatch):
    key = "sk-served-SECRET-4711"
    monkeypatch.setenv("LD_SERVED_KEY", key)
    with serve(model, tokenizer, model_name="tiny", api_key=key) as server:
        with pytest.raises(
            TeacherRequestError, match="answered 401"
        ):  # no key: refused, not retried
            build(
                tmp_path / "nokey",
                student_module(tokenizer),
                tokenizer,
                ServedTeacher(server.base_url, "tiny", max_retries=0),
            )
        served = ServedTeacher(server.base_url, "tiny", api_key_env="LD_SERVED_KEY", max_retries=0)
        builder = build(tmp_path / "c", student_module(tokenizer), tokenizer, served)
    assert builder.built["train"] == len(Blocks(tokenizer))
    assert key not in repr(served) and key not in json.dumps(builder.config())
    files = [p for p in (tmp_path / "c").rglob("*") if p.is_file()]
    assert len(files) > 3 and not any(key.encode() in p.read_bytes() for p in files)
