"""End-to-end tests of ``DistillationModule`` with real ``lightning.Trainer`` runs on CPU.

Expected values are computed independently of the library, in plain PyTorch written here
(softmax / log-softmax, ``F.cross_entropy``, ``torch.autograd``), or taken from the Hugging
Face model itself (``model(..., labels=...).loss``). The library's loss functions are never
used to compute an expectation.

Models are tiny and built from configs (no hub access).
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import transformers
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_distill import DistillationModule, TeacherTargets
from lightning_distill.losses import LogitKD, TaskLoss
from lightning_distill.models import causal_lm_from_config, weights_fingerprint

VOCAB = 64
SEQ = 12


# ------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------
def tiny_llama(seed: int = 0, vocab_size: int = VOCAB) -> nn.Module:
    return causal_lm_from_config(
        "llama", vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32, seed=seed,
    )


def tiny_teacher(seed: int = 1, vocab_size: int = VOCAB) -> nn.Module:
    """A tiny llama with a scaled-up head: peaked distributions, so KD values are not ~0."""
    model = tiny_llama(seed=seed, vocab_size=vocab_size)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    return model


class DictDataset(Dataset):
    """A list of per-sample dicts; the default collate stacks them into dict batches."""

    def __init__(self, items):
        self.items = list(items)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


def lm_items(n: int = 8, seed: int = 0, vocab: int = VOCAB, seq: int = SEQ, with_labels: bool = True,
             pad_tail: tuple[int, ...] = ()):
    """``n`` random token sequences, labels = input_ids (see ``mask_labels`` for holes).

    ``pad_tail[i]`` (optional) right-pads sequence ``i`` with that many attention-masked tokens
    (their labels are -100).
    """
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, seq), generator=g)
    mask = torch.ones(n, seq, dtype=torch.long)
    for i, pad in enumerate(pad_tail):
        if pad:
            mask[i, seq - pad:] = 0
    items = []
    for i in range(n):
        item = {"input_ids": ids[i], "attention_mask": mask[i]}
        if with_labels:
            labels = ids[i].clone()
            labels[mask[i] == 0] = -100
            items.append(item | {"labels": labels})
        else:
            items.append(item)
    return items


def mask_labels(items, masked_counts, seed: int = 1):
    """Set ``masked_counts[i]`` random positions of sequence ``i``'s labels to -100."""
    g = torch.Generator().manual_seed(seed)
    for item, k in zip(items, masked_counts):
        positions = torch.randperm(item["labels"].numel(), generator=g)[:k]
        item["labels"][positions] = -100
    return items


def collate(items):
    return torch.utils.data.default_collate(items)


def make_trainer(**kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0)
    return L.Trainer(**(defaults | kwargs))


def loader(items, batch_size: int = 4, **kwargs) -> DataLoader:
    return DataLoader(DictDataset(items), batch_size=batch_size, shuffle=False, **kwargs)


def validate(module, data) -> dict[str, float]:
    trainer = make_trainer()
    trainer.validate(module, data, verbose=False)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def kd_losses(temperature: float = 2.0):
    return {"kd": LogitKD(temperature=temperature, weight=0.5), "task": TaskLoss(weight=0.5)}


def ref_kl_sum(student_logits, teacher_logits, mask, temperature: float = 1.0):
    """sum over masked-in positions of KL(softmax(t/T) || softmax(s/T)), plain torch."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    rows = (log_p.exp() * (log_p - log_q)).sum(-1)
    return rows[mask].sum()


def shifted(logits, labels):
    """transformers' causal-LM alignment, by hand: logits at t score labels at t + 1."""
    return logits[:, :-1], labels[:, 1:]


def params_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class GradRecorder(torch.optim.SGD):
    """lr=0 SGD that copies every parameter's gradient as the optimizer sees it in ``step``.

    Lightning runs the closure (forward, backward, on_before_optimizer_step, clipping) inside
    ``optimizer.step``, so the copy is taken after the closure has returned.
    """

    def __init__(self, params, store: list):
        super().__init__(params, lr=0.0)
        self.store = store

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.store.append([None if p.grad is None else p.grad.detach().clone()
                           for group in self.param_groups for p in group["params"]])
        super().step()
        return loss


def assert_grads_close(actual, expected, what: str):
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a is not None, f"{what}: parameter {i} has no gradient"
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6, msg=lambda m, i=i: f"{what}, param {i}: {m}")


# ------------------------------------------------------------------------------------------
# 1. Gradient accumulation: the loss is normalised by the optimizer step's valid tokens
# ------------------------------------------------------------------------------------------
# Sequences 0-3 have few valid labels, 4-7 many: a per-micro-batch mean would weight them
# differently from the step-wide mean.
MASKED_COUNTS = [10, 9, 8, 11, 1, 0, 2, 3]


def grad_items():
    return mask_labels(lm_items(8, seed=3, pad_tail=(0, 0, 0, 0, 0, 0, 2, 0)), MASKED_COUNTS)


def reference_grads(student, teacher, items, temperature=2.0, micro_batches=None):
    """Gradients of 0.5 * T^2 * KL + 0.5 * CE, summed over valid tokens / total valid tokens.

    With ``micro_batches`` set, the (wrong) per-micro-batch mean averaged over micro-batches.
    """
    batch = collate(items)
    student = copy.deepcopy(student).train()
    params = [p for p in student.parameters() if p.requires_grad]
    with torch.no_grad():
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    s, y = shifted(s_logits, batch["labels"])
    t, _ = shifted(t_logits, batch["labels"])
    valid = y != -100

    def loss_of(rows):
        kl = ref_kl_sum(s[rows], t[rows], valid[rows], temperature) * temperature**2
        ce = F.cross_entropy(s[rows][valid[rows]], y[rows][valid[rows]], reduction="sum")
        return 0.5 * kl + 0.5 * ce

    if micro_batches is None:
        loss = loss_of(slice(None)) / valid.sum()
    else:
        size = len(items) // micro_batches
        parts = [slice(i * size, (i + 1) * size) for i in range(micro_batches)]
        loss = sum(loss_of(p) / valid[p].sum() for p in parts) / micro_batches
    return list(torch.autograd.grad(loss, params))


def fit_and_record_grads(student, teacher, items, batch_size, accumulate, clip=None):
    store: list = []
    module = DistillationModule(copy.deepcopy(student), copy.deepcopy(teacher), losses=kd_losses(2.0),
                                optimizer=functools.partial(GradRecorder, store=store))
    trainer = make_trainer(max_steps=1, accumulate_grad_batches=accumulate, gradient_clip_val=clip)
    trainer.fit(module, loader(items, batch_size=batch_size))
    assert len(store) == 1, "exactly one optimizer step expected"
    return store[0]


def clipped(grads, max_norm):
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    coef = min(1.0, max_norm / (float(norm) + 1e-6))
    return [g * coef for g in grads], float(norm)


@pytest.mark.slow
@pytest.mark.parametrize("clip_fraction", [None, 0.5], ids=["no_clip", "clip"])
def test_gradient_accumulation_equals_one_big_batch_and_reference(clip_fraction):
    items = grad_items()
    counts = [int((it["labels"][1:] != -100).sum()) for it in items]
    assert sum(counts[:4]) != sum(counts[4:]) and len(set(counts)) > 4  # uneven on purpose
    student, teacher = tiny_llama(seed=0), tiny_teacher(seed=1)

    reference = reference_grads(student, teacher, items)
    # The data must tell the right normalisation from a per-micro-batch mean.
    wrong = reference_grads(student, teacher, items, micro_batches=2)
    assert max(float((a - b).abs().max()) for a, b in zip(reference, wrong)) > 1e-3

    clip = None
    if clip_fraction is not None:
        _, norm = clipped(reference, float("inf"))
        clip = clip_fraction * norm
        reference, _ = clipped(reference, clip)

    big = fit_and_record_grads(student, teacher, items, batch_size=8, accumulate=1, clip=clip)
    accumulated = fit_and_record_grads(student, teacher, items, batch_size=4, accumulate=2, clip=clip)
    assert_grads_close(accumulated, big, "batch 4 x accumulate 2 vs batch 8")
    assert_grads_close(big, reference, "batch 8 vs plain-torch reference")
    assert_grads_close(accumulated, reference, "batch 4 x accumulate 2 vs plain-torch reference")


@pytest.mark.slow
def test_gradient_accumulation_with_uneven_last_step():
    """8 micro-batches of 1 with accumulate 3: steps of 3, 3 and 2 sequences, each a step mean."""
    items = grad_items()[:2] + grad_items()[4:7]  # 5 sequences, uneven valid counts
    student, teacher = tiny_llama(seed=0), tiny_teacher(seed=1)
    store: list = []
    module = DistillationModule(copy.deepcopy(student), copy.deepcopy(teacher), losses=kd_losses(2.0),
                                optimizer=functools.partial(GradRecorder, store=store))
    make_trainer(max_epochs=1, accumulate_grad_batches=3).fit(module, loader(items, batch_size=1))
    assert len(store) == 2  # 3 micro-batches, then the epoch's last 2
    assert_grads_close(store[0], reference_grads(student, teacher, items[:3]), "first step")
    assert_grads_close(store[1], reference_grads(student, teacher, items[3:]), "short last step")


# ------------------------------------------------------------------------------------------
# 2. The causal-LM shift: once, the way transformers does it, for every term
# ------------------------------------------------------------------------------------------
def test_task_loss_equals_transformers_shifted_loss():
    items = mask_labels(lm_items(8, seed=5, pad_tail=(3, 0, 1)), [0, 4, 2, 7, 1, 0, 5, 3])
    student = tiny_llama(seed=0)
    module = DistillationModule(student, None, losses={"task": TaskLoss()})
    metrics = validate(module, loader(items, batch_size=4))  # two batches: token-weighted mean

    batch = collate(items)
    with torch.no_grad():
        expected = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           labels=batch["labels"]).loss
    assert metrics["val/task"] == pytest.approx(float(expected), abs=1e-5)
    assert metrics["val/loss"] == pytest.approx(float(expected), abs=1e-5)
    assert "val/kd" not in metrics and "val/agreement" not in metrics


def _perturb_fn(labels, positions_fn, seed=0):
    """teacher_logits_fn adding large noise at the positions ``positions_fn(labels, T)`` picks."""
    def fn(output):
        logits = output.logits.clone()
        chosen = positions_fn(labels, logits.shape[1])
        g = torch.Generator().manual_seed(seed)
        noise = 20 * torch.randn(logits.shape, generator=g)
        return torch.where(chosen.unsqueeze(-1), logits + noise, logits)
    return fn


def _unscored(labels, length):
    """The last position, and every position whose next label is -100: they score nothing."""
    chosen = torch.zeros(labels.shape[0], length, dtype=torch.bool)
    chosen[:, -1] = True
    chosen[:, :-1] |= labels[:, 1:] == -100
    return chosen


def _scored(labels, length):
    chosen = torch.zeros(labels.shape[0], length, dtype=torch.bool)
    chosen[:, :-1] = labels[:, 1:] != -100
    return chosen


def test_kd_uses_the_same_shifted_alignment():
    items = mask_labels(lm_items(4, seed=6), [3, 5, 0, 8])
    batch = collate(items)
    student, teacher = tiny_llama(seed=0), tiny_teacher(seed=1)
    data = loader(items, batch_size=4)

    def run(fn):
        module = DistillationModule(copy.deepcopy(student), copy.deepcopy(teacher),
                                    losses={"kd": LogitKD(temperature=2.0)}, teacher_logits_fn=fn)
        return validate(module, data)

    plain = run(None)
    unscored = run(_perturb_fn(batch["labels"], _unscored))
    scored = run(_perturb_fn(batch["labels"], _scored))

    # Independent value: T^2 * mean KL over the shifted valid positions.
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"]).logits
        t = teacher(input_ids=batch["input_ids"]).logits
    s, y = shifted(s, batch["labels"])
    t, _ = shifted(t, batch["labels"])
    valid = y != -100
    expected = 4.0 * ref_kl_sum(s, t, valid, 2.0) / valid.sum()
    assert plain["val/kd"] == pytest.approx(float(expected), rel=1e-5)
    assert plain["val/kl"] == pytest.approx(float(ref_kl_sum(s, t, valid) / valid.sum()), rel=1e-5)

    for key in ("val/kd", "val/kl", "val/agreement"):
        assert unscored[key] == pytest.approx(plain[key], rel=1e-6, abs=1e-7), key
    assert abs(scored["val/kd"] - plain["val/kd"]) > 1e-2  # the control: scored positions matter


# ------------------------------------------------------------------------------------------
# 3. The teacher stays frozen
# ------------------------------------------------------------------------------------------
class TeacherWatch(Callback):
    def __init__(self):
        self.seen: list[tuple[str, bool, bool]] = []
        self.grads: list[bool] = []

    def _look(self, where, module):
        teacher = module.teacher
        self.seen.append((where, any(m.training for m in teacher.modules()),
                          any(p.requires_grad for p in teacher.parameters())))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._look("batch_start", pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._look("batch_end", pl_module)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append(any(p.grad is not None for p in pl_module.teacher.parameters()))
        self.student_grads = sum(p.grad is not None for p in pl_module.student.parameters())


@pytest.mark.slow
def test_teacher_is_frozen_during_fit():
    student, teacher = tiny_llama(seed=0), tiny_teacher(seed=1)
    teacher.train()
    student_before, teacher_before = copy.deepcopy(student), copy.deepcopy(teacher)
    module = DistillationModule(student, teacher, losses=kd_losses(),
                                optimizer=functools.partial(torch.optim.AdamW, lr=1e-2))
    assert not teacher.training
    watch = TeacherWatch()
    forwards: list[tuple[bool, bool, bool]] = []  # (trainer.training, teacher.training, grad on)
    teacher.register_forward_pre_hook(lambda m, args: forwards.append(
        (module.trainer.training, m.training, torch.is_grad_enabled())))
    items = lm_items(16, seed=7)
    trainer = make_trainer(max_steps=4, val_check_interval=2, callbacks=[watch])
    # Validation mid-training flips modes (eval, then back): the teacher must stay in eval.
    trainer.fit(module, loader(items[:8], batch_size=2), loader(items[8:], batch_size=4))

    assert sum(in_training for in_training, _, _ in forwards) == 4  # one teacher call per step
    assert all(not training and not grad_on for _, training, grad_on in forwards), forwards

    assert len(watch.seen) == 8
    assert all(not training and not grad for _, training, grad in watch.seen), watch.seen
    assert watch.grads == [False] * 4
    assert watch.student_grads == len(list(student.parameters()))
    assert all(p.grad is None and not p.requires_grad for p in module.teacher.parameters())
    assert params_equal(module.teacher, teacher_before)
    assert not params_equal(module.student, student_before)

    optimizer = trainer.optimizers[0]
    in_optimizer = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert sorted(in_optimizer) == sorted(id(p) for p in module.student.parameters())
    assert len(in_optimizer) == len(set(in_optimizer))

    module.train()
    assert module.student.training and not any(m.training for m in module.teacher.modules())
    module.eval()
    module.train(True)
    assert not any(m.training for m in module.teacher.modules())


# ------------------------------------------------------------------------------------------
# 4. Checkpoints: no teacher weights, the teacher's identity, load and resume
# ------------------------------------------------------------------------------------------
class FirstStepWeights(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not hasattr(self, "state"):
            self.state = {k: v.clone() for k, v in pl_module.student.state_dict().items()}
            self.global_step = trainer.global_step


@pytest.mark.slow
def test_checkpoint_save_load_and_resume(tmp_path):
    student, teacher = tiny_llama(seed=0), tiny_teacher(seed=1)
    teacher_copy = copy.deepcopy(teacher)
    module = DistillationModule(student, teacher, losses=kd_losses(),
                                optimizer=functools.partial(torch.optim.AdamW, lr=1e-2))
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=2,
                              save_top_k=-1)
    items = lm_items(16, seed=8)
    trainer = make_trainer(max_steps=2, enable_checkpointing=True, callbacks=[ckpt_cb])
    trainer.fit(module, loader(items, batch_size=2))
    path = ckpt_cb.best_model_path
    assert path.endswith("step=2.ckpt") and Path(path).parent == tmp_path and Path(path).exists()

    checkpoint = torch.load(path, weights_only=True, map_location="cpu")
    state = checkpoint["state_dict"]
    assert not [k for k in state if k.startswith("teacher.")]
    assert {k for k in state if k.startswith("student.")} == {f"student.{k}" for k in student.state_dict()}
    identity = checkpoint["lightning_distill"]["teacher"]
    assert identity["class"] == "transformers.models.llama.modeling_llama.LlamaForCausalLM"
    assert identity["num_parameters"] == sum(p.numel() for p in teacher_copy.parameters())
    assert identity["weights_sha256"] == weights_fingerprint(teacher_copy)
    assert identity["weights_sha256"] != weights_fingerprint(tiny_teacher(seed=2))
    assert set(checkpoint["lightning_distill"]["losses"]) == {"kd", "task"}
    assert checkpoint["lightning_distill"]["losses"]["kd"]["temperature"] == 2.0

    # Load with a fresh student of the same config but other weights.
    fresh = tiny_llama(seed=99)
    assert not params_equal(fresh, module.student)
    loaded = DistillationModule.load_from_checkpoint(path, student=fresh)
    assert loaded.teacher is None
    assert params_equal(loaded.student, module.student)

    # Load with a teacher passed in (strict): the live teacher is kept as given.
    new_teacher = tiny_teacher(seed=1)
    loaded_t = DistillationModule.load_from_checkpoint(path, student=tiny_llama(seed=99),
                                                       teacher=new_teacher, losses=kd_losses(), strict=True)
    assert params_equal(loaded_t.student, module.student)
    assert params_equal(loaded_t.teacher, teacher_copy)
    assert not any(p.requires_grad for p in loaded_t.teacher.parameters())

    # Resume: continues from step 2 with the trained student and a live teacher.
    resumed = DistillationModule(tiny_llama(seed=99), tiny_teacher(seed=1), losses=kd_losses(),
                                 optimizer=functools.partial(torch.optim.AdamW, lr=1e-2))
    first = FirstStepWeights()
    trainer2 = make_trainer(max_steps=4, callbacks=[first], log_every_n_steps=1)
    trainer2.fit(resumed, loader(items, batch_size=2), ckpt_path=path)
    assert first.global_step == 2 and trainer2.global_step == 4
    assert all(torch.equal(first.state[k], v) for k, v in module.student.state_dict().items())
    assert params_equal(resumed.teacher, teacher_copy)
    assert torch.isfinite(trainer2.callback_metrics["train/kd"])
    assert not params_equal(resumed.student, module.student)


# ------------------------------------------------------------------------------------------
# 5. Plain nn.Module pair with (x, y) batches
# ------------------------------------------------------------------------------------------
def mlp_data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 10, generator=g)
    y = torch.randint(0, 5, (n,), generator=g)
    return x, y


def mlp_pair(seed=0):
    torch.manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 5))
    student = nn.Sequential(nn.Linear(10, 5))
    return student, teacher


@pytest.mark.slow
def test_plain_module_pair_fits_and_logs(tmp_path):
    student, teacher = mlp_pair()
    x, y = mlp_data(64)
    xv, yv = mlp_data(24, seed=1)
    module = DistillationModule(student, teacher, losses=kd_losses(2.0),
                                optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    assert module.shift_labels is False
    trainer = make_trainer(max_epochs=1, logger=CSVLogger(tmp_path), log_every_n_steps=1)
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=16),
                DataLoader(TensorDataset(xv, yv), batch_size=10))  # 10 + 10 + 4: uneven val batches
    metrics = trainer.callback_metrics
    for key in ("train/loss", "train/kd", "train/task", "val/loss", "val/kd", "val/task",
                "val/agreement", "val/kl"):
        assert key in metrics and torch.isfinite(metrics[key]), key
    assert float(metrics["train/loss"]) == pytest.approx(
        0.5 * float(metrics["train/kd"]) + 0.5 * float(metrics["train/task"]), rel=1e-5)

    # Validation ran after the last step: recompute it by hand with the final student.
    with torch.no_grad():
        s, t = student(xv), teacher(xv)
    everything = torch.ones(len(yv), dtype=torch.bool)
    kd = 4.0 * ref_kl_sum(s, t, everything, 2.0) / len(yv)
    task = F.cross_entropy(s, yv)
    assert float(metrics["val/agreement"]) == pytest.approx(
        float((s.argmax(-1) == t.argmax(-1)).float().mean()), abs=1e-6)
    assert float(metrics["val/kl"]) == pytest.approx(float(ref_kl_sum(s, t, everything) / len(yv)), rel=1e-5)
    assert float(metrics["val/kd"]) == pytest.approx(float(kd), rel=1e-5)
    assert float(metrics["val/task"]) == pytest.approx(float(task), rel=1e-5)
    assert float(metrics["val/loss"]) == pytest.approx(float(0.5 * kd + 0.5 * task), rel=1e-5)

    csv = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    header = csv.splitlines()[0].split(",")
    assert {"train/loss", "train/kd", "train/task", "val/loss", "val/agreement"} <= set(header)


# ------------------------------------------------------------------------------------------
# 6. Output adapters
# ------------------------------------------------------------------------------------------
class SeqLinear(nn.Module):
    """(B, T, F) -> (B, T, V) logits, returned in the shape ``style`` asks for."""

    def __init__(self, features=6, vocab=7, style="tensor", seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.proj = nn.Linear(features, vocab)
        self.style = style

    def forward(self, x):
        logits = self.proj(x)
        flat_logp = F.log_softmax(logits, -1).flatten(0, 1)
        if self.style == "tensor":
            return logits
        if self.style == "tuple":
            return logits, x
        if self.style == "dict_logp":
            return {"logp": flat_logp, "hidden": x}
        if self.style == "tuple_logp":
            return flat_logp, x
        if self.style == "no_logits":
            return SimpleNamespace(hidden=x)
        raise AssertionError(self.style)


def seq_data(n=8, length=5, features=6, vocab=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, length, features, generator=g)
    y = torch.randint(0, vocab, (n, length), generator=g)
    y[0, :2] = -100
    return DataLoader(TensorDataset(x, y), batch_size=4)


def seq_module(style, teacher_style="tensor", **kwargs):
    return DistillationModule(SeqLinear(style=style, seed=0), SeqLinear(style=teacher_style, seed=1),
                              losses=kd_losses(2.0), **kwargs)


def test_output_adapters_read_the_same_logits():
    data = seq_data()
    plain = validate(seq_module("tensor"), data)
    unflatten = functools.partial(torch.unflatten, dim=0, sizes=(-1, 5))
    dict_logp = validate(seq_module("dict_logp", student_logits_fn=lambda o: unflatten(o["logp"])), data)
    tuple_logp = validate(seq_module("tuple_logp", student_logits_fn=lambda o: unflatten(o[0])), data)
    tuples = validate(seq_module("tuple", teacher_style="tuple"), data)
    # Log-probabilities are logits of the same distribution: every metric is unchanged.
    for other in (dict_logp, tuple_logp, tuples):
        for key in ("val/kd", "val/task", "val/loss", "val/kl", "val/agreement"):
            assert other[key] == pytest.approx(plain[key], rel=1e-5), key


@pytest.mark.slow
def test_flattened_logprob_student_trains():
    data = seq_data()
    module = seq_module("dict_logp", student_logits_fn=lambda o: o["logp"].unflatten(0, (-1, 5)),
                        optimizer=functools.partial(torch.optim.SGD, lr=0.5))
    before = copy.deepcopy(module.student)
    trainer = make_trainer(max_epochs=1)
    trainer.fit(module, data)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert not params_equal(module.student, before)


@pytest.mark.parametrize("who", ["student", "teacher"])
def test_output_without_logits_raises_type_error(who):
    if who == "student":
        module = seq_module("no_logits")
    else:
        module = seq_module("tensor", teacher_style="no_logits")
    with pytest.raises(TypeError, match=f"{who}_logits_fn") as info:
        validate(module, seq_data())
    assert "SimpleNamespace" in str(info.value)


# ------------------------------------------------------------------------------------------
# 7. Vocabulary mismatch
# ------------------------------------------------------------------------------------------
class ForwardCounter:
    def __init__(self, model):
        self.calls = 0
        model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.calls += 1


@pytest.mark.slow
def test_vocab_mismatch_raises_at_fit_start():
    student, teacher = tiny_llama(seed=0, vocab_size=64), tiny_teacher(seed=1, vocab_size=72)
    before = copy.deepcopy(student)
    store: list = []
    module = DistillationModule(student, teacher, optimizer=functools.partial(GradRecorder, store=store))
    counter = ForwardCounter(student)
    items = lm_items(4, seed=2)
    trainer = make_trainer(max_steps=2, num_sanity_val_steps=2)
    with pytest.raises(ValueError, match="slice") as info:
        trainer.fit(module, loader(items), loader(items))
    message = str(info.value)
    assert "64" in message and "72" in message
    assert counter.calls == 0 and store == [] and trainer.global_step == 0
    assert params_equal(student, before)


@pytest.mark.slow
@pytest.mark.parametrize(("vs", "vt"), [(64, 72), (72, 64)], ids=["teacher_larger", "student_larger"])
def test_vocab_slice_compares_the_shared_entries(vs, vt):
    student, teacher = tiny_llama(seed=0, vocab_size=vs), tiny_teacher(seed=1, vocab_size=vt)
    items = mask_labels(lm_items(4, seed=4, vocab=min(vs, vt)), [2, 0, 5, 1])
    batch = collate(items)
    module = DistillationModule(copy.deepcopy(student), copy.deepcopy(teacher), losses=kd_losses(2.0),
                                vocab_mismatch="slice")
    metrics = validate(module, loader(items))
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"]).logits
        t = teacher(input_ids=batch["input_ids"]).logits
        hf_loss = student(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    assert s.shape[-1] == vs and t.shape[-1] == vt
    s, y = shifted(s, batch["labels"])
    t, _ = shifted(t, batch["labels"])
    valid = y != -100
    shared = min(vs, vt)
    expected_kd = 4.0 * ref_kl_sum(s[..., :shared], t[..., :shared], valid, 2.0) / valid.sum()
    assert metrics["val/kd"] == pytest.approx(float(expected_kd), rel=1e-5)
    assert metrics["val/task"] == pytest.approx(float(hf_loss), rel=1e-5)  # full student vocabulary

    trainer = make_trainer(max_steps=2, log_every_n_steps=1)
    trainer.fit(module, loader(lm_items(8, seed=5, vocab=shared), batch_size=4))
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["train/kd"])


@pytest.mark.slow
def test_plain_module_vocab_mismatch_raises_on_first_batch():
    torch.manual_seed(0)
    student, teacher = nn.Linear(10, 5), nn.Linear(10, 7)
    store: list = []
    module = DistillationModule(student, teacher, optimizer=functools.partial(GradRecorder, store=store))
    counter = ForwardCounter(student)
    x, y = mlp_data(32)
    trainer = make_trainer(max_steps=2)
    with pytest.raises(ValueError, match="slice") as info:
        trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=8))
    message = str(info.value)
    assert "(5)" in message and "(7)" in message
    assert counter.calls == 1 and store == []


# ------------------------------------------------------------------------------------------
# 8. Bad inputs: clear errors that name the value
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["loss", "a.b", "kl", "agreement", "1kd", ""])
def test_bad_term_names_rejected(name):
    student, teacher = mlp_pair()
    with pytest.raises(ValueError, match="loss term name") as info:
        DistillationModule(student, teacher, losses={name: TaskLoss()})
    assert repr(name) in str(info.value)


def test_construction_errors():
    student, teacher = mlp_pair()
    with pytest.raises(ValueError, match="weight 0"):
        DistillationModule(student, teacher, losses={"kd": LogitKD(weight=0), "task": TaskLoss(weight=0.0)})
    with pytest.raises(TypeError, match=r"'kd' is a MSELoss.*LossTerm"):
        DistillationModule(student, teacher, losses={"kd": nn.MSELoss()})
    with pytest.raises(TypeError, match="student must be a torch.nn.Module, got str"):
        DistillationModule("gpt2", teacher)
    with pytest.raises(TypeError, match="teacher must be a torch.nn.Module or None, got dict"):
        DistillationModule(student, {"logits": 1})
    with pytest.raises(ValueError, match="same object"):
        DistillationModule(student, student)
    with pytest.raises(ValueError, match="'foo'"):
        DistillationModule(student, teacher, vocab_mismatch="foo")
    with pytest.raises(ValueError, match="'hourly'"):
        DistillationModule(student, teacher, lr_scheduler_interval="hourly")
    with pytest.raises(ValueError, match="metrics_every_n_steps"):
        DistillationModule(student, teacher, metrics_every_n_steps=0)
    # A separate copy of the student is a fine teacher.
    DistillationModule(student, copy.deepcopy(student))


@pytest.mark.slow
def test_logit_kd_without_teacher_source_raises():
    module = DistillationModule(tiny_llama(seed=0), None, losses=kd_losses())
    trainer = make_trainer(max_steps=1)
    with pytest.raises(ValueError, match="teacher_targets") as info:
        trainer.fit(module, loader(lm_items(4)))
    assert "'kd'" in str(info.value) and "teacher=" in str(info.value)
    assert trainer.global_step == 0


@pytest.mark.slow
@pytest.mark.parametrize("bad", [70, -5])
def test_labels_outside_vocab_raise_on_first_batch(bad):
    items = lm_items(4, seed=9)
    items[2]["labels"][4] = bad  # position 4: not dropped by the shift
    student = tiny_llama(seed=0)
    store: list = []
    module = DistillationModule(student, tiny_teacher(seed=1),
                                optimizer=functools.partial(GradRecorder, store=store))
    counter = ForwardCounter(student)
    with pytest.raises(ValueError, match=f"label id {bad} is outside the student's 64"):
        make_trainer(max_steps=2).fit(module, loader(items))
    assert counter.calls == 1 and store == []


@pytest.mark.slow
def test_labels_outside_vocab_raise_value_error_with_sanity_validation():
    items = lm_items(4, seed=9)
    items[2]["labels"][4] = 70
    module = DistillationModule(tiny_llama(seed=0), tiny_teacher(seed=1))
    trainer = make_trainer(max_steps=2, num_sanity_val_steps=1)
    with pytest.raises(ValueError, match="label id 70"):
        trainer.fit(module, loader(items), loader(items))


# ------------------------------------------------------------------------------------------
# 9. Teacher targets carried by the batch
# ------------------------------------------------------------------------------------------
def test_teacher_targets_from_batch_equal_live_teacher():
    student, teacher = tiny_llama(seed=0), tiny_teacher(seed=1)
    items = mask_labels(lm_items(8, seed=10, pad_tail=(0, 2)), [1, 3, 0, 2, 4, 0, 1, 6])
    live = validate(DistillationModule(copy.deepcopy(student), copy.deepcopy(teacher), losses=kd_losses()),
                    loader(items))
    with torch.no_grad():
        batch = collate(items)
        cached = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    # (a) a plain tensor per sample, stacked by the default collate
    tensor_items = [item | {"teacher_targets": cached[i]} for i, item in enumerate(items)]
    from_tensor = validate(DistillationModule(copy.deepcopy(student), None, losses=kd_losses()),
                           loader(tensor_items))
    # (b) TeacherTargets per (pre-built) batch
    batches = [collate(items[i:i + 4]) | {"teacher_targets": TeacherTargets(logits=cached[i:i + 4])}
               for i in (0, 4)]
    from_targets = validate(DistillationModule(copy.deepcopy(student), None, losses=kd_losses()),
                            DataLoader(batches, batch_size=None))
    # (c) the batch's targets win over a live (different) teacher
    over_live = validate(DistillationModule(copy.deepcopy(student), tiny_teacher(seed=5), losses=kd_losses()),
                         loader(tensor_items))
    different = validate(DistillationModule(copy.deepcopy(student), tiny_teacher(seed=5), losses=kd_losses()),
                         loader(items))
    for result in (from_tensor, from_targets, over_live):
        for key in ("val/kd", "val/task", "val/loss", "val/kl", "val/agreement"):
            assert result[key] == pytest.approx(live[key], rel=1e-5, abs=1e-7), key
    assert abs(different["val/kd"] - live["val/kd"]) > 1e-2 * live["val/kd"]


@pytest.mark.slow
def test_fit_with_teacher_targets_and_no_teacher():
    student, teacher = tiny_llama(seed=0), tiny_teacher(seed=1)
    items = lm_items(8, seed=11)
    with torch.no_grad():
        batch = collate(items)
        cached = teacher(input_ids=batch["input_ids"]).logits
    items = [item | {"teacher_targets": cached[i]} for i, item in enumerate(items)]
    before = copy.deepcopy(student)
    module = DistillationModule(student, None, losses=kd_losses(),
                                optimizer=functools.partial(torch.optim.SGD, lr=0.5))
    trainer = make_trainer(max_steps=2, log_every_n_steps=1)
    trainer.fit(module, loader(items))
    assert trainer.global_step == 2
    assert torch.isfinite(trainer.callback_metrics["train/kd"])
    assert not params_equal(student, before)


# ------------------------------------------------------------------------------------------
# 10. Extra batch keys stay out of the model call
# ------------------------------------------------------------------------------------------
class KwargRecorder:
    def __init__(self, model):
        self.keys: list[set[str]] = []
        model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.keys.append(set(kwargs))


@pytest.mark.slow
def test_extra_batch_keys_are_not_passed_to_models():
    student, teacher = tiny_llama(seed=0), tiny_teacher(seed=1)
    items = [item | {"slice": ["web", "code"][i % 2], "sample_id": i}
             for i, item in enumerate(lm_items(8, seed=12))]
    seen_s, seen_t = KwargRecorder(student), KwargRecorder(teacher)
    module = DistillationModule(student, teacher, losses=kd_losses())
    trainer = make_trainer(max_steps=2, log_every_n_steps=1)
    trainer.fit(module, loader(items), loader(items[:4]))
    assert trainer.global_step == 2
    assert seen_s.keys and seen_t.keys
    for keys in seen_s.keys + seen_t.keys:
        assert keys <= {"input_ids", "attention_mask", "use_cache", "return_dict"}, keys
        assert {"input_ids", "attention_mask"} <= keys


# ------------------------------------------------------------------------------------------
# 11. Labels derived from input_ids when the batch has none
# ------------------------------------------------------------------------------------------
def test_labels_derived_from_input_ids_and_attention_mask():
    items = lm_items(8, seed=13, with_labels=False, pad_tail=(0, 3, 1, 0, 5))
    student = tiny_llama(seed=0)
    metrics = validate(DistillationModule(student, None, losses={"task": TaskLoss()}), loader(items))
    batch = collate(items)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        expected = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           labels=labels).loss
        unmasked = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           labels=batch["input_ids"]).loss
    assert abs(float(expected) - float(unmasked)) > 1e-4  # the padding makes a difference
    assert metrics["val/task"] == pytest.approx(float(expected), abs=1e-5)


# ------------------------------------------------------------------------------------------
# 12. Schedulers get the trainer's number of steps
# ------------------------------------------------------------------------------------------
class LrWatch(Callback):
    def __init__(self):
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.slow
@pytest.mark.parametrize("explicit_steps", [None, 8])
def test_lr_scheduler_gets_estimated_stepping_batches(explicit_steps):
    student, teacher = mlp_pair()
    x, y = mlp_data(64)
    extra = {} if explicit_steps is None else {"num_training_steps": explicit_steps}
    scheduler = functools.partial(transformers.get_linear_schedule_with_warmup, num_warmup_steps=1, **extra)
    module = DistillationModule(student, teacher, optimizer=functools.partial(torch.optim.SGD, lr=0.1),
                                lr_scheduler=scheduler)
    watch = LrWatch()
    trainer = make_trainer(max_steps=4, callbacks=[watch])  # 8 batches per epoch: stops mid-epoch
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=8))
    assert trainer.estimated_stepping_batches == 4
    total = explicit_steps or 4
    expected = [0.0] + [0.1 * (total - k) / (total - 1) for k in (1, 2, 3)]
    assert watch.lrs == pytest.approx(expected, abs=1e-9)
    final = trainer.optimizers[0].param_groups[0]["lr"]
    assert final == pytest.approx(0.1 * (total - 4) / (total - 1), abs=1e-9)
    if explicit_steps is None:
        assert final == pytest.approx(0.0, abs=1e-12)


@pytest.mark.slow
def test_per_term_values_and_metrics_are_logged_on_logging_steps(tmp_path):
    """train/loss every step; per-term values, agreement and KL on the steps the trainer writes logs."""
    module = DistillationModule(tiny_llama(seed=0), tiny_teacher(seed=1), losses=kd_losses())
    trainer = make_trainer(max_steps=6, log_every_n_steps=3, logger=CSVLogger(tmp_path, name="csv"))
    trainer.fit(module, loader(lm_items(24, seed=3), batch_size=4))
    rows = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    logged = [dict(zip(header, r.split(","))) for r in rows[1:]]
    steps_with_kd = sorted(int(r["step"]) for r in logged if r.get("train/kd"))
    steps_with_agreement = sorted(int(r["step"]) for r in logged if r.get("train/agreement"))
    assert steps_with_kd == steps_with_agreement == [2, 5]


def test_evaluate_batch_refuses_labels_a_smaller_teacher_cannot_score():
    """Under vocab_mismatch="slice" a label past the teacher's vocabulary has no teacher perplexity:
    one clear error naming the label, not an index error."""
    student, teacher = tiny_llama(seed=0, vocab_size=72), tiny_teacher(seed=1, vocab_size=64)
    batch = collate(lm_items(4, seed=6, vocab=64))  # inputs both models embed
    module = DistillationModule(student, teacher, vocab_mismatch="slice")
    module.evaluate_batch(dict(batch))  # labels the teacher covers: fine
    labels = batch["labels"].clone()
    labels[1, 5] = 70  # an id only the student has
    with pytest.raises(ValueError, match=r"label id 70 is outside the teacher's 64 output classes.*ignore_index"):
        module.evaluate_batch({**batch, "labels": labels})


# ------------------------------------------------------------------------------------------
# Several eval dataloaders; a live teacher's non-finite outputs
# ------------------------------------------------------------------------------------------
def test_each_val_dataloader_keeps_its_own_metrics():
    torch.manual_seed(0)
    module = DistillationModule(tiny_llama(), tiny_teacher(), kd_losses())
    first, second = loader(lm_items(8, seed=1)), loader(lm_items(8, seed=2))
    both = validate(module, [first, second])
    alone = [validate(module, data) for data in (first, second)]
    for term in ("kd", "task", "loss", "agreement", "kl"):
        for k in (0, 1):
            assert both[f"val/{term}/dataloader_idx_{k}"] == pytest.approx(alone[k][f"val/{term}"], rel=1e-5)
    # The two loaders differ, so a shared (averaged) metric would fail the checks above.
    assert alone[0]["val/loss"] != pytest.approx(alone[1]["val/loss"], rel=1e-3)


class _NaNForSample(nn.Module):
    """Wraps a teacher; returns NaN logits for the sample whose first token is ``token``."""

    def __init__(self, inner: nn.Module, token: int, value: float = float("nan"), row: bool = False):
        super().__init__()
        self.inner, self.token, self.value, self.row = inner, token, value, row
        self.config = inner.config

    def forward(self, input_ids, attention_mask=None):
        logits = self.inner(input_ids=input_ids, attention_mask=attention_mask).logits.clone()
        hit = input_ids[:, 0] == self.token
        if self.row:
            logits[hit, 3, :] = self.value
        else:
            logits[hit, 3, 5] = self.value
        return logits


def _items_with_ids(n: int = 8):
    return [item | {"sample_id": torch.tensor(100 + i)} for i, item in enumerate(lm_items(n, seed=3))]


@pytest.mark.parametrize(("value", "row", "divergence", "refused"), [
    (float("nan"), False, "forward_kl", True),
    (float("inf"), False, "forward_kl", True),
    (float("-inf"), True, "forward_kl", True),       # a row of only -inf: no distribution
    (float("-inf"), False, "forward_kl", False),     # one impossible token: forward KL is fine
    (float("-inf"), False, "reverse_kl", True),      # ... reverse KL is not
])
def test_live_teacher_non_finite_output_stops_the_fit(value, row, divergence, refused):
    items = _items_with_ids()
    bad_index = 6  # second batch of 4 -> global step 1
    others = {int(it["input_ids"][0]) for i, it in enumerate(items) if i != bad_index}
    token = int(items[bad_index]["input_ids"][0])
    assert token not in others
    teacher = _NaNForSample(tiny_teacher(), token, value, row)
    module = DistillationModule(tiny_llama(), teacher, {"kd": LogitKD(divergence, weight=0.5),
                                                        "task": TaskLoss(weight=0.5)})
    trainer = make_trainer(max_steps=2)
    if not refused:
        trainer.fit(module, loader(items))
        assert all(torch.isfinite(p).all() for p in module.student.parameters())
        return
    with pytest.raises(ValueError, match=r"global step 1.*sample id\(s\) \[106\]"):
        trainer.fit(module, loader(items))
    assert all(torch.isfinite(p).all() for p in module.student.parameters())


# ------------------------------------------------------------------------------------------
# Checkpoints: damaged or foreign files, recorded loss terms
# ------------------------------------------------------------------------------------------
def _one_step_checkpoint(tmp_path, losses=None) -> Path:
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path, filename="step{step}", save_top_k=-1,
                              every_n_train_steps=1)
    module = DistillationModule(tiny_llama(), tiny_teacher(), kd_losses(2.0) if losses is None else losses)
    make_trainer(max_steps=1, enable_checkpointing=True, callbacks=[ckpt_cb]).fit(module, loader(lm_items(4)))
    return Path(ckpt_cb.best_model_path or next(tmp_path.glob("*.ckpt")))


def test_damaged_or_foreign_checkpoint_is_one_clear_error(tmp_path):
    from lightning_distill.checkpoint import CheckpointError

    good = _one_step_checkpoint(tmp_path)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}, "extra": SimpleNamespace(a=1)}, foreign)  # a pickled object
    for path, fault in ((truncated, "damaged or truncated"), (foreign, "not a checkpoint this library wrote")):
        with pytest.raises(CheckpointError, match=fault) as load_error:
            DistillationModule.load_from_checkpoint(path, student=tiny_llama())
        module = DistillationModule(tiny_llama(), tiny_teacher(), kd_losses(2.0))
        with pytest.raises(CheckpointError, match=fault) as fit_error:
            make_trainer(max_steps=2).fit(module, loader(lm_items(4)), ckpt_path=str(path))
        for error in (load_error, fit_error):
            text = str(error.value)
            assert str(path) in text
            assert "weights_only" not in text and error.value.__cause__ is None


def test_load_from_checkpoint_restores_the_recorded_loss_terms(tmp_path):
    losses = {"kd": LogitKD("reverse_kl", temperature=2.0, weight=0.7), "task": TaskLoss(weight=0.3)}
    path = _one_step_checkpoint(tmp_path, losses)
    loaded = DistillationModule.load_from_checkpoint(path, student=tiny_llama(), teacher=tiny_teacher())
    assert {n: t.config() for n, t in loaded.losses.items()} == {n: t.config() for n, t in losses.items()}
    with pytest.warns(UserWarning, match=r"recorded the loss terms.*differing: \['kd'\]"):
        DistillationModule.load_from_checkpoint(path, student=tiny_llama(), teacher=tiny_teacher(),
                                                losses={"kd": LogitKD(temperature=1.0, weight=0.7),
                                                        "task": TaskLoss(weight=0.3)})


def test_fit_after_validate_on_the_same_module():
    """`validate` makes the eval metrics inside inference mode; a later `fit` validates with grad off
    but not in inference mode and must still update them (regression: in-place update refused)."""
    ids = torch.randint(0, VOCAB, (8, 12), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r} for r in ids]
    module = DistillationModule(tiny_llama(), tiny_teacher(), losses={"kd": LogitKD(), "task": TaskLoss()})
    kw = dict(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False)
    first = L.Trainer(**kw).validate(module, DataLoader(rows, batch_size=4), verbose=False)[0]
    trainer = L.Trainer(**kw)
    trainer.fit(module, DataLoader(rows, batch_size=4), DataLoader(rows, batch_size=4))
    assert trainer.global_step == 2
    assert torch.isfinite(trainer.callback_metrics["val/loss"])
    assert trainer.callback_metrics["val/loss"] != first["val/loss"]  # the trained student, measured again
