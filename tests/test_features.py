"""Feature-based distillation: hidden states by index and by module path, FeatureKD, the
projector, AttentionTransfer, cached teacher hidden states, export of the projector.

Expected values are computed here in plain PyTorch from the Hugging Face models' own outputs
(``output_hidden_states``/``output_attentions``, the value projection's output read by calling
the layers), never with the library's loss functions. Models are tiny, built from configs.
"""

from __future__ import annotations

import copy
import functools
import json

import lightning as L
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_distill import DistillationModule
from lightning_distill.callbacks import TeacherCache
from lightning_distill.export import card_markdown, distillation_card, export_student
from lightning_distill.losses import AttentionTransfer, FeatureKD, LogitKD, TaskLoss
from lightning_distill.losses.feature_terms import export_modules
from lightning_distill.models import causal_lm_from_config
from lightning_distill.models.features import capture, capture_hooks, layer_pairs

VOCAB, SEQ = 48, 10


def llama(seed: int, hidden: int = 16, layers: int = 2, heads: int = 2, eager: bool = False) -> nn.Module:
    extra = {"attn_implementation": "eager"} if eager else {}
    return causal_lm_from_config("llama", vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                 num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                                 max_position_embeddings=32, seed=seed, **extra)


class Blocks(Dataset):
    """Random token blocks; sample ``i`` has ``lengths[i]`` real tokens (the rest padding, label -100)
    and a few masked labels, so the valid positions are not all positions."""

    def __init__(self, n: int = 8, seed: int = 0, lengths: list[int] | None = None) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
        self.lengths = lengths or [SEQ - (i % 3) for i in range(n)]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        mask = (torch.arange(SEQ) < self.lengths[i]).long()
        labels = self.ids[i].masked_fill(mask == 0, -100)
        labels[2] = -100  # a masked position inside the text
        return {"input_ids": self.ids[i], "attention_mask": mask, "labels": labels, "sample_id": 100 + i}


class Data(L.LightningDataModule):
    def __init__(self, ds: Dataset, batch_size: int = 4) -> None:
        super().__init__()
        self.ds, self.batch_size = ds, batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.ds, batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.ds, batch_size=self.batch_size)


def trainer(**kwargs) -> L.Trainer:
    return L.Trainer(**({"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
                         "enable_model_summary": False, "enable_checkpointing": False, "num_sanity_val_steps": 0}
                        | kwargs))


def val_metrics(module: DistillationModule, data: Data) -> dict[str, float]:
    return {k: float(v) for k, v in trainer().validate(module, datamodule=data, verbose=False)[0].items()}


def shifted_valid(ds: Blocks) -> torch.Tensor:
    """The valid positions of a causal LM (label of t + 1 not ignored), as the logit terms use."""
    labels = torch.stack([ds[i]["labels"] for i in range(len(ds))])
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100) != -100


def no_hooks(*models: nn.Module) -> bool:
    """No feature hook left (transformers keeps its own output-recording hooks: not ours)."""
    return all(not capture_hooks(model) for model in models)


def batch_of(ds: Blocks) -> dict:
    return torch.utils.data.default_collate([ds[i] for i in range(len(ds))])


# ----------------------------------------------------------------------------- layer maps
def test_layer_map_shortcuts_and_explicit_pairs():
    assert layer_pairs("last", 2, 6) == ((2, 6),)
    assert layer_pairs("uniform", 2, 4) == ((1, 2), (2, 4))
    assert layer_pairs("uniform", 3, 4) == ((1, 1), (2, 3), (3, 4))  # round(i * 4 / 3), ending at the last
    assert layer_pairs("uniform", 4, 12) == ((1, 3), (2, 6), (3, 9), (4, 12))
    assert layer_pairs({1: 3, "2": "-1"}, None, None) == ((1, 3), (2, -1))  # YAML keys arrive as strings
    assert layer_pairs([["model.layers.0", "model.layers.2"]], None, None) == (("model.layers.0", "model.layers.2"),)
    with pytest.raises(ValueError, match="'first'"):
        layer_pairs("first", 2, 4)
    with pytest.raises(ValueError, match="teacher's is unknown.*explicit pairs"):
        layer_pairs("uniform", 2, None)
    with pytest.raises(ValueError, match="maps a student layer twice"):
        layer_pairs([[1, 2], [1, 3]], None, None)
    with pytest.raises(TypeError, match="layers must be"):
        layer_pairs(3, 2, 4)


def test_feature_kd_resolves_shortcuts_from_the_models_and_builds_a_projector_when_widths_differ():
    term = FeatureKD(layers="uniform")
    DistillationModule(llama(0, hidden=16, layers=2), llama(1, hidden=32, layers=4), {"feat": term})
    assert term.pairs == ((1, 2), (2, 4))
    assert term.student_layers == (1, 2) and term.teacher_layers == (2, 4)
    assert (term.projector.in_features, term.projector.out_features) == (16, 32)
    same = FeatureKD(layers="last")
    DistillationModule(llama(0), llama(1, layers=3), {"feat": same})
    assert same.pairs == ((2, 3),) and same.projector is None
    with pytest.raises(ValueError, match="out of range.*3 blocks"):
        DistillationModule(llama(0), llama(1, layers=3), {"feat": FeatureKD(layers={1: 5})})
    with pytest.raises(ValueError, match="need a Hugging Face student.*module paths"):
        DistillationModule(nn.Linear(4, 4), llama(1), {"feat": FeatureKD(layers={1: 1})})
    with pytest.raises(ValueError, match="loss must be one of"):
        FeatureKD(loss="l1")
    with pytest.raises(ValueError, match="projector_export must be one of"):
        FeatureKD(projector_export="keep")


# ----------------------------------------------------------------------------- values
@pytest.mark.parametrize("loss", ["cosine", "mse"])
def test_feature_loss_is_zero_for_identical_features(loss):
    teacher = llama(1)
    module = DistillationModule(copy.deepcopy(teacher), teacher, {"feat": FeatureKD(layers="uniform", loss=loss)})
    assert val_metrics(module, Data(Blocks()))["val/feat"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("loss", ["mse", "cosine"])
def test_feature_loss_matches_an_independent_computation(loss):
    ds = Blocks()
    student, teacher = llama(0, hidden=16, layers=2), llama(1, hidden=24, layers=4)
    term = FeatureKD(layers={1: 2, 2: -1}, loss=loss)
    module = DistillationModule(student, teacher, {"feat": term})
    got = val_metrics(module, Data(ds, batch_size=8))["val/feat"]

    batch = batch_of(ds)
    valid = shifted_valid(ds)
    with torch.no_grad():
        hs = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        ht = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        w = term.projector.weight.double()
        total = 0.0
        for s, t in ((1, 2), (2, 4)):
            a, b = hs.hidden_states[s].double() @ w.T, ht.hidden_states[t].double()
            if loss == "mse":
                rows = ((a - b) ** 2).sum(-1) / a.shape[-1]
            else:
                rows = 1 - (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
            total += float(rows[valid].sum())
    assert got == pytest.approx(total / 2 / int(valid.sum()), rel=1e-4)


# ----------------------------------------------------------------------------- training
class Grads(L.Callback):
    def __init__(self) -> None:
        self.seen: dict[str, bool] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        proj = pl_module.losses["feat"].projector.weight
        self.seen["projector"] = proj.grad is not None and bool(proj.grad.abs().sum() > 0)
        self.seen["in_optimizer"] = any(p is proj for g in optimizer.param_groups for p in g["params"])
        self.seen["teacher"] = any(p.grad is not None or p.requires_grad for p in pl_module.teacher.parameters())


def test_the_projector_gets_gradients_and_trains_the_teacher_does_not():
    teacher = llama(1, hidden=24)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    term = FeatureKD(layers="uniform", loss="mse")
    module = DistillationModule(llama(0), teacher, {"feat": term, "task": TaskLoss(weight=0.1)},
                                optimizer=functools.partial(torch.optim.SGD, lr=0.5))
    start = term.projector.weight.detach().clone()
    grads = Grads()
    trainer(max_steps=2, callbacks=[grads]).fit(module, datamodule=Data(Blocks()))
    assert grads.seen == {"projector": True, "in_optimizer": True, "teacher": False}
    assert not torch.equal(term.projector.weight, start)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_module_path_hooks_are_gone_after_fit_and_after_an_exception_in_fit():
    student, teacher = llama(0), llama(1, hidden=24, layers=3)
    term = FeatureKD(layers={"model.layers.1": "model.layers.2"}, student_dim=16, teacher_dim=24)
    seen = []
    module = DistillationModule(student, teacher, {"feat": term})

    class DuringStep(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            seen.append(float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs))

    trainer(max_steps=3, callbacks=[DuringStep()]).fit(module, datamodule=Data(Blocks()))
    assert len(seen) == 3 and all(v > 0 for v in seen)  # the hooked features fed the loss
    assert no_hooks(student, teacher)

    calls = {"n": 0}
    real_forward = student.model.layers[1].mlp.forward

    def failing(*args, **kwargs):  # the third student forward fails inside the hooked forward
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return real_forward(*args, **kwargs)

    student.model.layers[1].mlp.forward = failing
    with pytest.raises(RuntimeError, match="boom"):
        trainer(max_steps=5).fit(module, datamodule=Data(Blocks()))
    assert calls["n"] == 3
    assert no_hooks(student, teacher)


@pytest.mark.slow  # torch.compile: ~8 s on two cores
def test_hooks_reach_a_wrapped_model_and_leave_with_the_block():
    model = llama(0)
    compiled = torch.compile(model, backend="eager")
    ids = torch.randint(0, VOCAB, (2, 5))
    with capture(compiled, ["model.layers.0"]) as found:
        assert capture_hooks(compiled) == ["model.layers.0"]
        out = compiled(input_ids=ids, output_hidden_states=True)
    assert torch.allclose(found["model.layers.0"], out.hidden_states[1])
    assert no_hooks(model)
    with pytest.raises(ValueError, match="no submodule 'model.layer.0'"):
        with capture(compiled, ["model.layer.0"]):
            pass


# ----------------------------------------------------------------------------- cache
def test_cached_hidden_states_feed_feature_kd_like_the_live_teacher(tmp_path):
    ds = Blocks(n=8)
    data = Data(ds, batch_size=4)
    student, teacher = llama(0), llama(1, hidden=24, layers=3)

    def make(t):
        torch.manual_seed(0)  # the same initial projector (16 -> 24) in both modules
        return DistillationModule(copy.deepcopy(student), t, {"feat": FeatureKD(layers={1: 1, 2: -1}),
                                                              "kd": LogitKD(weight=0.0)})

    live = make(teacher)
    live_value = val_metrics(live, data)["val/feat"]

    cached_module = make(copy.deepcopy(teacher))
    cache = TeacherCache(str(tmp_path / "c"), kind="dense", hidden_layers=[1, -1], splits=["val"], progress=False)
    cache.prepare(cached_module, data, splits=["val"])
    # The stored states are the live teacher's hidden_states[1] and [-1] (up to fp16), at the stored positions.
    batch = batch_of(ds)
    cache.attach("val", cached_module, batch)
    targets = batch["teacher_targets"]
    assert targets.hidden_layers == (1, -1)
    with torch.no_grad():
        out = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    real = batch["attention_mask"].bool()
    for stored, index in zip(targets.hidden_states, (1, 3)):
        assert torch.equal(stored[real], out.hidden_states[index][real].half().float())
    cache.release(cached_module)
    assert cached_module.teacher is None
    result = trainer(callbacks=[cache]).validate(cached_module, datamodule=data, verbose=False)[0]
    assert float(result["val/feat"]) == pytest.approx(live_value, rel=2e-3)


def test_a_cache_without_the_layers_a_term_reads_is_refused_before_it_is_built(tmp_path):
    data = Data(Blocks(n=4))

    def fit_with(term, hidden_layers):
        module = DistillationModule(llama(0, eager=True), llama(1, eager=True), {"t": term})
        cache = TeacherCache(str(tmp_path / "c"), kind="dense", hidden_layers=hidden_layers, progress=False)
        trainer(max_steps=1, callbacks=[cache]).fit(module, datamodule=data)

    with pytest.raises(ValueError, match=r"hidden states \[1\], but the teacher cache stores hidden_layers=\[-1\]"):
        fit_with(FeatureKD(layers={1: 1}), [-1])
    with pytest.raises(ValueError, match="reads the teacher's attentions, which a teacher cache does not store"):
        fit_with(AttentionTransfer(value_weight=0), None)
    with pytest.raises(ValueError, match=r"outputs of \['model.layers.0'\]"):
        fit_with(FeatureKD(layers={"model.layers.0": "model.layers.0"}), [1])
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").rglob("*.safetensors"))  # nothing built
    fit_with(FeatureKD(layers={2: 2}), [-1])  # -1 is the teacher's last (2 blocks): accepted


# ----------------------------------------------------------------------------- export
@pytest.mark.parametrize("choice", ["save", "drop"])
def test_projector_is_saved_or_dropped_at_export_and_the_card_says_which(tmp_path, choice):
    term = FeatureKD(layers="last", projector_export=choice)
    module = DistillationModule(llama(0), llama(1, hidden=24), {"feat": term})
    extras = export_modules(module.losses)
    losses = {n: t.config() for n, t in module.losses.items()}
    card = distillation_card(student=module.student, teacher=module.teacher_identity, data={}, slices=[],
                             losses=losses)
    out = export_student(module.student, tmp_path / "student", record={"losses": losses}, card=card, extras=extras)
    record = json.loads((out / "distillation.json").read_text())
    assert record["losses"]["feat"]["projector_export"] == choice
    markdown = (out / "distillation_card.md").read_text()
    assert markdown == card_markdown(card)
    if choice == "save":
        weights = load_file(str(out / "feat_projector.safetensors"))
        assert torch.equal(weights["weight"], term.projector.weight.detach())
        info = json.loads((out / "feat_projector.json").read_text())
        assert (info["in_features"], info["out_features"], info["bias"]) == (16, 24, False)
        assert record["extras"]["feat_projector"]["weights"] == "feat_projector.safetensors"
        assert "projector of `feat`: saved beside the student" in markdown
    else:
        assert not list(out.glob("feat_projector*")) and "extras" not in record
        assert "projector of `feat`: dropped at export" in markdown
    assert no_hooks(module.student)


def test_a_checkpoint_restores_the_feature_term_and_its_projector(tmp_path):
    term = FeatureKD(layers="uniform", loss="cosine", projector_export="save")
    module = DistillationModule(llama(0), llama(1, hidden=24, layers=4), {"feat": term},
                                optimizer=functools.partial(torch.optim.SGD, lr=0.5))
    t = trainer(max_steps=1, default_root_dir=str(tmp_path))
    t.fit(module, datamodule=Data(Blocks()))
    t.save_checkpoint(tmp_path / "m.ckpt")
    loaded = DistillationModule.load_from_checkpoint(tmp_path / "m.ckpt", student=llama(0),
                                                     teacher=llama(1, hidden=24, layers=4), weights_only=True)
    feat = loaded.losses["feat"]
    assert isinstance(feat, FeatureKD) and feat.config() == term.config() and feat.pairs == ((1, 2), (2, 4))
    assert torch.equal(feat.projector.weight, term.projector.weight)


# ----------------------------------------------------------------------------- attention transfer
def test_attention_transfer_is_zero_for_identical_models():
    teacher = llama(1, eager=True)
    module = DistillationModule(copy.deepcopy(teacher), teacher, {"at": AttentionTransfer()})
    assert val_metrics(module, Data(Blocks()))["val/at"] == pytest.approx(0.0, abs=1e-6)


def _value_relation(v: torch.Tensor, heads: int, keys: torch.Tensor) -> torch.Tensor:
    b, t, d = v.shape
    v = v.double().reshape(b, t, heads, d // heads).permute(0, 2, 1, 3)
    scores = torch.einsum("bhqd,bhkd->bhqk", v, v) / (d // heads) ** 0.5
    scores = scores.masked_fill(~keys[:, None, None, :], float("-inf"))
    return torch.softmax(scores, -1)


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    p, q = p.double(), q.double()
    safe = torch.where(p > 0, p * (p / q).log(), torch.zeros_like(p))
    return safe.sum(-1)


def test_attention_transfer_matches_a_hand_computation():
    ds = Blocks()
    student, teacher = llama(0, hidden=16, layers=2, eager=True), llama(1, hidden=32, layers=3, eager=True)
    module = DistillationModule(student, teacher, {"at": AttentionTransfer(attention_weight=0.7, value_weight=0.3)})
    got = val_metrics(module, Data(ds, batch_size=8))["val/at"]

    batch = batch_of(ds)
    valid, keys = shifted_valid(ds), batch["attention_mask"].bool()
    values = {}
    hooks = [m.model.layers[-1].self_attn.v_proj.register_forward_hook(
        lambda mod, i, o, key=key: values.__setitem__(key, o)) for key, m in (("s", student), ("t", teacher))]
    with torch.no_grad():
        a_s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_attentions=True)
        a_t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_attentions=True)
    for h in hooks:
        h.remove()
    attention = _kl(a_t.attentions[-1], a_s.attentions[-1]).mean(1)  # mean over heads
    relation = _kl(_value_relation(values["t"], 2, keys), _value_relation(values["s"], 2, keys)).mean(1)
    expected = (0.7 * attention[valid].sum() + 0.3 * relation[valid].sum()) / valid.sum()
    assert got == pytest.approx(float(expected), rel=1e-4)
    assert float(attention[valid].sum()) > 1e-4 and float(relation[valid].sum()) > 1e-4  # both parts count


def test_attention_transfer_refuses_what_it_cannot_compare():
    with pytest.raises(ValueError, match="eager attention.*attn_implementation='eager'"):
        DistillationModule(llama(0), llama(1), {"at": AttentionTransfer()})
    with pytest.raises(ValueError, match="student has 2 heads and the teacher 4.*attention_weight=0"):
        DistillationModule(llama(0, eager=True), llama(1, hidden=32, heads=4, eager=True), {"at": AttentionTransfer()})
    # Value relations alone work across head counts (relation heads split both models' values alike).
    DistillationModule(llama(0), llama(1, hidden=32, heads=4), {"at": AttentionTransfer(attention_weight=0)})
    gpt2 = causal_lm_from_config("gpt2", vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=32)
    with pytest.raises(ValueError, match="fused query/key/value.*value_weight=0"):
        DistillationModule(llama(0), gpt2, {"at": AttentionTransfer(attention_weight=0)})
    with pytest.raises(ValueError, match="computes nothing"):
        AttentionTransfer(attention_weight=0, value_weight=0)


# ----------------------------------------------------------------------------- a real fit
def test_a_real_fit_distils_features_across_widths_and_depths():
    torch.manual_seed(0)
    ds = Blocks(n=16)
    teacher = llama(1, hidden=32, layers=4, eager=True)
    student = llama(0, hidden=16, layers=2, eager=True)
    losses = {"kd": LogitKD(weight=0.5), "task": TaskLoss(weight=0.5),
              "feat": FeatureKD(layers="uniform", loss="cosine"), "at": AttentionTransfer(weight=0.5)}
    module = DistillationModule(student, teacher, losses, optimizer=functools.partial(torch.optim.AdamW, lr=1e-2))
    data = Data(ds, batch_size=8)
    before = val_metrics(module, data)
    trainer(max_steps=20, limit_val_batches=0).fit(module, datamodule=data)
    after = val_metrics(module, data)
    assert after["val/feat"] < 0.7 * before["val/feat"]  # the projected student features turn toward the teacher's
    assert after["val/loss"] < before["val/loss"]
    assert after["val/at"] > 0  # attention transfer ran on both (eager) models every step
    assert no_hooks(student, teacher)


# ----------------------------------------------------------------------------- Hydra configs
@pytest.mark.parametrize("name, term", [("feature_mse", "feature"), ("feature_cosine", "feature"),
                                        ("attention_transfer", "attention")])
def test_loss_configs_compose_with_the_logit_terms_and_build(name, term):
    from hydra import compose, initialize_config_dir

    from lightning_distill.cli import CONFIG_DIR, _build_losses

    overrides = [f"loss=[kd_task,{name}]", "output_dir=/tmp/ld-compose"]
    if term == "feature":
        overrides.append("loss.feature.layers={1: 2, 2: -1}")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="distill", overrides=overrides)
    losses = _build_losses(cfg.loss)
    assert set(losses) == {"kd", "task", term}
    module = DistillationModule(llama(0, eager=True), llama(1, hidden=24, layers=4, eager=True), losses)
    built = module.losses[term]
    if term == "feature":
        assert built.pairs == ((1, 2), (2, -1)) and built.config()["layers"] == [[1, 2], [2, -1]]
        assert built.loss == ("mse" if name == "feature_mse" else "cosine")
    else:
        assert built.reads_attentions and built.student_layers == ("model.layers.1.self_attn.v_proj",)
        assert built.teacher_layers == ("model.layers.3.self_attn.v_proj",)
    metrics = val_metrics(module, Data(Blocks()))
    assert metrics[f"val/{term}"] > 0
