"""Model families beyond causal LMs: encoder-decoders (T5, BART), Hugging Face classifiers, and
wrapped models (``torch.compile``, DataParallel), live and from every teacher-cache kind.

Expectations come from transformers itself (``model(..., labels=...)``: its own decoder shift and
loss) or from plain PyTorch written here. Models are tiny and built from config classes.
"""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertForMultipleChoice,
    BertForSequenceClassification,
    T5Config,
    T5ForConditionalGeneration,
)

from lightning_distill import DistillationModule
from lightning_distill.cache import CacheMismatchError
from lightning_distill.callbacks import TeacherCache
from lightning_distill.export import export_student
from lightning_distill.losses import LogitKD, TaskLoss
from lightning_distill.models import (
    call_model,
    causal_lm_from_config,
    describe_model,
    is_causal_lm,
    output_vocab_size,
    weights_fingerprint,
)
from lightning_distill.models.adapters import is_classifier, is_seq2seq, unwrap_model

VOCAB, SRC, TGT = 64, 10, 6
KINDS = ["dense", "topk", "sampled"]


# ------------------------------------------------------------------------------------------ models
def t5(seed: int, d_model: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(T5Config(
        vocab_size=VOCAB, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1, num_decoder_layers=1,
        num_heads=2, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))


def bart(seed: int, d_model: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return BartForConditionalGeneration(BartConfig(
        vocab_size=VOCAB, d_model=d_model, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=2 * d_model, decoder_ffn_dim=2 * d_model,
        max_position_embeddings=32))


def bert(seed: int, vocab: int = 100, num_labels: int = 3, hidden: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=32, num_labels=num_labels))


def llama(seed: int) -> nn.Module:
    return causal_lm_from_config("llama", vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                                 num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                 max_position_embeddings=32, seed=seed)


SEQ2SEQ = {"t5": t5, "bart": bart}


# ------------------------------------------------------------------------------------------ data
class Pairs(Dataset):
    """Source/target pairs, right-padded (sources with the attention mask, targets with -100)."""

    def __init__(self, n: int = 12, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.src = torch.randint(3, VOCAB, (n, SRC), generator=g)
        self.tgt = torch.randint(3, VOCAB, (n, TGT), generator=g)
        self.src_len = torch.randint(4, SRC + 1, (n,), generator=g)
        self.tgt_len = torch.randint(2, TGT + 1, (n,), generator=g)
        self.sample_ids = torch.arange(n) * 7 + 100

    def __len__(self) -> int:
        return len(self.src)

    def __getitem__(self, i: int) -> dict:
        mask = (torch.arange(SRC) < self.src_len[i]).long()
        labels = self.tgt[i].masked_fill(torch.arange(TGT) >= self.tgt_len[i], -100)
        return {"input_ids": self.src[i] * mask, "attention_mask": mask, "labels": labels,
                "sample_id": int(self.sample_ids[i]), "slice": "a"}


class Sentences(Dataset):
    """Token sequences with a class label each (3 classes), ids below ``vocab``."""

    def __init__(self, n: int = 12, vocab: int = 50, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, vocab, (n, SRC), generator=g)
        self.lengths = torch.randint(3, SRC + 1, (n,), generator=g)
        self.labels = torch.randint(0, 3, (n,), generator=g)
        self.sample_ids = torch.arange(n) + 5

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        mask = (torch.arange(SRC) < self.lengths[i]).long()
        return {"input_ids": self.ids[i] * mask, "attention_mask": mask, "labels": self.labels[i],
                "sample_id": int(self.sample_ids[i]), "slice": "a"}


class Data(L.LightningDataModule):
    def __init__(self, ds: Dataset, batch_size: int = 4) -> None:
        super().__init__()
        self.ds, self.batch_size = ds, batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.ds, batch_size=self.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.ds, batch_size=self.batch_size)


def batch_of(ds: Dataset, index: list[int]) -> dict:
    return torch.utils.data.default_collate([ds[i] for i in index])


def module(student: nn.Module, teacher: nn.Module | None, **kwargs) -> DistillationModule:
    return DistillationModule(student, teacher, {"kd": LogitKD(weight=0.5), "task": TaskLoss(weight=0.5)},
                              optimizer=functools.partial(torch.optim.SGD, lr=0.1), **kwargs)


def trainer(tmp_path, callbacks=(), steps: int = 2) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=2,
                     num_sanity_val_steps=0, default_root_dir=tmp_path, callbacks=list(callbacks))


# ------------------------------------------------------------------------------------------ encoder-decoders
@pytest.mark.parametrize("family", sorted(SEQ2SEQ))
def test_seq2seq_decoder_inputs_are_the_models_own_shift_and_no_loss_is_computed(family):
    model = SEQ2SEQ[family](0).eval()
    batch = batch_of(Pairs(), [0, 1, 2])
    assert is_seq2seq(model) and not is_causal_lm(model)
    out = call_model(model, batch)
    reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    assert out.loss is None  # the labels never reached the model
    assert out.logits.shape == (3, TGT, VOCAB)
    torch.testing.assert_close(out.logits, reference.logits)


@pytest.mark.parametrize("family", sorted(SEQ2SEQ))
def test_seq2seq_task_loss_is_transformers_loss_and_a_live_fit_runs(tmp_path, family):
    data = Pairs()
    mod = module(SEQ2SEQ[family](0), SEQ2SEQ[family](1, d_model=24))
    assert mod.shift_labels is False
    mod.eval()  # no dropout while comparing
    batch = batch_of(data, [0, 1, 2, 3])
    out = mod._shared_step(batch, "val")
    expected = mod.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           labels=batch["labels"]).loss
    torch.testing.assert_close(out["sums"]["task"] / out["count"], expected)
    assert out["count"] == (batch["labels"] != -100).sum()
    before = [p.detach().clone() for p in mod.student.parameters()]
    trainer(tmp_path).fit(mod, Data(data))
    assert any(not torch.equal(a, b) for a, b in zip(before, mod.student.parameters()))
    metrics = trainer(tmp_path).validate(mod, Data(data), verbose=False)[0]
    assert metrics["val/kl"] > 0 and torch.isfinite(torch.tensor(metrics["val/loss"]))


def test_seq2seq_batch_without_labels_is_one_clear_error():
    batch = batch_of(Pairs(), [0, 1])
    del batch["labels"]
    with pytest.raises(ValueError, match="encoder-decoder.*'labels'.*decoder_input_ids"):
        call_model(t5(0), batch)


@pytest.mark.parametrize("kind", KINDS)
def test_seq2seq_cache_stores_decoder_positions_and_trains(tmp_path, kind):
    data = Pairs()
    mod = module(t5(0), t5(1, d_model=24))
    cache = TeacherCache(str(tmp_path / "cache"), kind=kind, k=8, splits=["train"], progress=False,
                         release_teacher=False)
    cache.prepare(mod, Data(data))
    batch = batch_of(data, [3, 0, 5, 1])
    cache.attach("train", mod, batch)
    targets = batch["teacher_targets"]
    live = call_model(mod.teacher, batch).logits.float()
    if kind == "dense":
        scored = batch["labels"] != -100
        torch.testing.assert_close(targets.logits[scored], live.half().float()[scored])
    else:
        assert targets.sparse.ids.shape[:2] == (4, TGT)
        label_lp = live.log_softmax(-1).gather(-1, batch["labels"].clamp_min(0).unsqueeze(-1)).squeeze(-1)
        scored = batch["labels"] != -100
        torch.testing.assert_close(targets.label_logprobs[scored], label_lp[scored], atol=2e-3, rtol=1e-3)
    cached = module(t5(0), None)
    trainer(tmp_path, [TeacherCache(str(tmp_path / "cache"), kind=kind, k=8, splits=["train"], progress=False)]
            ).fit(cached, Data(data))


def test_seq2seq_cache_catches_a_changed_source_or_target(tmp_path):
    data = Pairs()
    cache = TeacherCache(str(tmp_path / "cache"), kind="topk", k=4, splits=["train"], progress=False)
    cache.prepare(module(t5(0), t5(1)), Data(data))
    for key, position in (("input_ids", 1), ("labels", 1)):
        batch = batch_of(data, [0, 1])
        batch[key][1, position] = 2 if int(batch[key][1, position]) != 2 else 3
        reader = cache.readers["train"]
        reader._hash_checked[:] = bytes(len(reader._hash_checked))
        with pytest.raises(CacheMismatchError, match="other tokens"):
            cache.attach("train", module(t5(0), None), batch)
    batch = batch_of(data, [0, 1])
    cache.attach("train", module(t5(0), None), batch)  # unchanged: read fine


# ------------------------------------------------------------------------------------------ classifiers
def test_classifier_output_width_is_its_number_of_labels():
    model = bert(0, vocab=100, num_labels=3)
    assert is_classifier(model) and output_vocab_size(model) == 3
    assert output_vocab_size(t5(0)) == VOCAB and output_vocab_size(llama(0)) == VOCAB
    choices = BertForMultipleChoice(bert(0).config)  # one logit per choice: no fixed width
    assert not is_classifier(choices) and output_vocab_size(choices) is None


def test_classifiers_with_different_token_vocabularies_distil_live(tmp_path):
    data = Sentences(vocab=50)
    mod = module(bert(0, vocab=50), bert(1, vocab=100, hidden=24))
    trainer(tmp_path).fit(mod, Data(data))
    metrics = trainer(tmp_path).validate(mod, Data(data), verbose=False)[0]
    assert metrics["val/kl"] > 0


def test_classifiers_with_different_label_sets_are_refused(tmp_path):
    mod = module(bert(0, num_labels=3), bert(1, num_labels=5))
    with pytest.raises(ValueError, match="3 labels and the teacher into 5"):
        trainer(tmp_path).fit(mod, Data(Sentences()))


@pytest.mark.parametrize("kind", KINDS)
def test_classifier_cache_of_every_kind_trains(tmp_path, kind):
    data = Sentences(vocab=50)
    mod = module(bert(0, vocab=50), bert(1, vocab=100))
    cache = TeacherCache(str(tmp_path / "cache"), kind=kind, k=2, splits=["train"], progress=False,
                         release_teacher=False)
    cache.prepare(mod, Data(data))
    assert cache.spec.vocab_size == 3
    batch = batch_of(data, [2, 0, 7])
    cache.attach("train", mod, batch)
    live = call_model(mod.teacher, batch).logits
    if kind == "dense":
        torch.testing.assert_close(batch["teacher_targets"].logits, live.half().float())
    else:
        assert batch["teacher_targets"].sparse.ids.shape[0] == 3
    trainer(tmp_path, [TeacherCache(str(tmp_path / "cache"), kind=kind, k=2, splits=["train"], progress=False)]
            ).fit(module(bert(0, vocab=50), None), Data(data))


def test_classifier_cache_catches_a_changed_token_past_the_first(tmp_path):
    data = Sentences(vocab=50)
    cache = TeacherCache(str(tmp_path / "cache"), kind="dense", splits=["train"], progress=False)
    cache.prepare(module(bert(0, vocab=50), bert(1, vocab=50)), Data(data))
    batch = batch_of(data, [0, 1])
    batch["input_ids"][0, 2] = 1 if int(batch["input_ids"][0, 2]) != 1 else 2
    with pytest.raises(CacheMismatchError, match="other tokens"):
        cache.attach("train", module(bert(0, vocab=50), None), batch)


# ------------------------------------------------------------------------------------------ wrapped models
def test_compiled_student_is_seen_as_its_model():
    student = llama(0)
    compiled = torch.compile(student, backend="eager")
    assert unwrap_model(compiled) is student and unwrap_model(nn.DataParallel(compiled)) is student
    mod = DistillationModule(compiled, llama(1))
    assert mod.shift_labels is True  # was False: a compiled causal LM trained on unshifted labels
    assert is_causal_lm(nn.DataParallel(student)) and output_vocab_size(compiled) == VOCAB
    assert describe_model(compiled) == describe_model(student)
    assert weights_fingerprint(compiled) == weights_fingerprint(student)
    with pytest.raises(ValueError, match="the same object"):
        DistillationModule(compiled, student)


def test_compiled_student_loss_equals_the_uncompiled_one_and_checkpoints_are_interchangeable(tmp_path):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 8), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids, "slice": ["a", "b"]}
    plain = module(llama(0), llama(1))
    compiled = module(torch.compile(llama(0), backend="eager"), llama(1))
    expected = plain._shared_step(batch, "val")
    actual = compiled._shared_step(batch, "val")
    for name in ("task", "kd"):
        torch.testing.assert_close(actual["sums"][name], expected["sums"][name])
    hf_loss = llama(0)(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(actual["sums"]["task"] / actual["count"], hf_loss)

    class Items(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return {"input_ids": ids[i % 2], "attention_mask": torch.ones(8, dtype=torch.long), "labels": ids[i % 2]}

    run = trainer(tmp_path, steps=1)
    run.fit(compiled, DataLoader(Items(), batch_size=2))
    run.save_checkpoint(tmp_path / "c.ckpt")
    state = torch.load(tmp_path / "c.ckpt", weights_only=True)["state_dict"]
    assert state and all(k.startswith("student.") and "_orig_mod" not in k for k in state)
    fresh = DistillationModule.load_from_checkpoint(tmp_path / "c.ckpt", student=llama(5), teacher=llama(1))
    for (name, a), b in zip(unwrap_model(compiled.student).state_dict().items(), fresh.student.state_dict().values()):
        assert torch.equal(a, b), name
    back = DistillationModule.load_from_checkpoint(tmp_path / "c.ckpt", student=torch.compile(llama(5), backend="eager"))
    assert weights_fingerprint(back.student) == weights_fingerprint(compiled.student)
    out = export_student(compiled.student, tmp_path / "export")
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert weights_fingerprint(loaded) == weights_fingerprint(compiled.student)


def test_compiled_model_gets_only_the_inputs_its_model_names():
    model = torch.compile(llama(0), backend="eager")
    ids = torch.randint(0, VOCAB, (2, 5))
    out = call_model(model, {"input_ids": ids, "labels": ids, "slice": ["a", "b"], "source": "x"})
    assert out.loss is None and out.logits.shape == (2, 5, VOCAB)
    assert out.past_key_values is None  # called as a Hugging Face model: use_cache=False
    assert F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1)) > 0
