"""Feature-based distillation: hidden states (``FeatureKD``) and attention (``AttentionTransfer``).

Both terms declare what they read (``student_layers``, ``teacher_layers``, ``reads_attentions``);
the module asks the models for exactly that (``output_hidden_states``, ``output_attentions``,
forward hooks for module paths; see :mod:`lightning_distill.models.features`) and hands the
result over in ``LossInputs.student_features`` and the teacher's ``TeacherTargets``. Like every
term they return a sum over the valid positions (the labels' mask, as the logit terms), which
the module divides by the step's valid positions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_distill.losses.terms import LossTerm
from lightning_distill.models.adapters import is_hf_model
from lightning_distill.models.features import (
    Features,
    LayerRef,
    attn_implementation,
    hidden_width,
    layer_pairs,
    num_heads,
    num_layers,
    value_module_path,
)
from lightning_distill.types import LossInputs, TeacherTargets
from lightning_distill.validation import check_choice, check_int, check_number

__all__ = [
    "AttentionTransfer",
    "FeatureKD",
    "attention_kl_rows",
    "check_cached_features",
    "feature_rows",
    "teacher_features",
    "valid_mask",
    "value_relation_logprobs",
]

FEATURE_LOSSES = ("mse", "cosine")
PROJECTOR_EXPORTS = ("drop", "save")


def teacher_features(targets: TeacherTargets | None) -> Features:
    """The teacher's :class:`Features`, live or cached.

    Raises:
        ValueError: no teacher targets.
    """
    if targets is None:
        raise ValueError("a feature term needs the teacher's features but this batch has no teacher targets; pass "
                         "teacher=... to DistillationModule (or a teacher cache with hidden_layers=[...]).")
    return Features(hidden_states=targets.hidden_states, hidden_layers=targets.hidden_layers,
                    attentions=targets.attentions, modules=dict(targets.modules or {}))


def _student_features(inputs: LossInputs, term: str) -> Features:
    if inputs.student_features is None:
        raise ValueError(f"{term} needs the student's features, but the inputs carry none; use the term inside "
                         "DistillationModule (it asks the student for the layers the term declares).")
    return inputs.student_features


def valid_mask(inputs: LossInputs, shape: torch.Size) -> Tensor:
    """``shape`` booleans: the valid positions (``labels != ignore_index``; all without labels)."""
    if inputs.labels is None:
        return torch.ones(shape, dtype=torch.bool, device=inputs.student_logits.device)
    if tuple(inputs.labels.shape) != tuple(shape):
        raise ValueError(f"the features' positions {tuple(shape)} do not match the labels' {tuple(inputs.labels.shape)}; "
                         "feature terms support models whose hidden states sit at the logits' positions "
                         "(decoder-only and encoder models).")
    return inputs.labels != inputs.ignore_index


def feature_rows(student: Tensor, teacher: Tensor, loss: Literal["mse", "cosine"]) -> Tensor:
    """Per-position distance of ``(..., H)`` features: ``mse`` the mean of squared differences over
    ``H``, ``cosine`` one minus the cosine similarity. Returns ``(...)`` float32."""
    student, teacher = student.float(), teacher.float()
    if loss == "mse":
        return (student - teacher).pow(2).mean(-1)
    return 1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)


def attention_kl_rows(teacher_probs: Tensor, student_probs: Tensor) -> Tensor:
    """``KL(teacher ‖ student)`` over the last dimension of two probability tensors (``0·log 0 = 0``)."""
    pt, ps = teacher_probs.float(), student_probs.float()
    tiny = torch.finfo(torch.float32).tiny
    terms = pt * (pt.clamp_min(tiny).log() - ps.clamp_min(tiny).log())
    return torch.where(pt > 0, terms, torch.zeros((), device=pt.device)).sum(-1)


def value_relation_logprobs(values: Tensor, heads: int, key_mask: Tensor | None = None) -> Tensor:
    """MiniLM's value relation: ``log_softmax(V_r V_rᵀ / √d_r)`` per relation head.

    Args:
        values: ``(B, T, D)`` value vectors (all attention heads side by side).
        heads: relation heads ``R``; ``D`` is split into ``R`` parts of ``d_r = D / R``.
        key_mask: ``(B, T)`` booleans, the keys that count (padding excluded); ``None``: all.

    Returns:
        ``(B, R, T, T)`` log-probabilities over keys.

    Raises:
        ValueError: ``D`` not divisible by ``R``.
    """
    b, t, d = values.shape
    if d % heads:
        raise ValueError(f"value width {d} is not divisible by relation_heads={heads}; pick relation_heads dividing "
                         "both models' value widths (e.g. their common number of key/value heads).")
    v = values.float().reshape(b, t, heads, d // heads).transpose(1, 2)
    scores = v @ v.transpose(-1, -2) / math.sqrt(d // heads)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return scores.log_softmax(-1)


def _masked_sum(rows: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, rows, torch.zeros((), device=rows.device)).sum()


def _layers_config(layers: Any) -> str | list[list[LayerRef]]:
    if isinstance(layers, str):
        return layers
    return [list(p) for p in layer_pairs(layers, None, None)]


class FeatureKD(LossTerm):
    """Hidden-state distillation: the student's features at some layers against the teacher's.

    For each ``(student, teacher)`` layer pair, the per-position distance (``mse``: the mean
    squared difference over the width; ``cosine``: one minus the cosine similarity) between the
    student's features (through the projector when the widths differ) and the teacher's, averaged
    over the pairs and summed over the valid positions. Layers are indices into Hugging Face's
    ``hidden_states`` (``0`` = embeddings, ``L`` = the last hidden state) or module paths (any
    model; see :mod:`lightning_distill.models.features`). Cached teacher hidden states
    (``TeacherCache(hidden_layers=[...])``) use the same indices.

    When the widths differ a projector ``Linear(student_dim → teacher_dim, bias=False)`` is built
    with the term (from the models' ``hidden_size``, or ``student_dim``/``teacher_dim``), trained
    with the student (it is in the optimizer and the checkpoints), and at export saved beside the
    student (``projector_export="save"``: ``<term>_projector.safetensors`` + ``.json``) or dropped.

    Args:
        layers: ``"last"``, ``"uniform"`` (student block ``i`` ↔ teacher block ``round(i·L_t/L_s)``),
            a mapping ``{student: teacher}`` or a list of ``[student, teacher]`` pairs.
        loss: ``"mse"`` or ``"cosine"``.
        weight: multiplier in the total loss.
        student_dim: the student features' width (default: the model's ``hidden_size``; needed for
            module paths when the widths differ).
        teacher_dim: the teacher features' width (default: its ``hidden_size``; needed without a
            live teacher when the widths differ).
        projector_export: ``"drop"`` (export the student alone) or ``"save"``.

    Raises:
        ValueError: an unknown shortcut, loss or export choice; a shortcut without layer counts;
            layer indices on a model that is not a Hugging Face model; a negative weight.
        TypeError: a layer map of the wrong kind, a width that is not an int.

    Example:
        >>> FeatureKD(layers={2: 4, 4: 8}, loss="cosine")
        FeatureKD(layers=[[2, 4], [4, 8]], loss='cosine', weight=1.0, projector=none, projector_export='drop')
    """

    requires_teacher = True

    def __init__(
        self,
        layers: str | Mapping[Any, Any] | Sequence[Sequence[Any]] = "last",
        loss: Literal["mse", "cosine"] = "mse",
        weight: float = 1.0,
        student_dim: int | None = None,
        teacher_dim: int | None = None,
        projector_export: Literal["drop", "save"] = "drop",
    ) -> None:
        super().__init__(weight)
        self.layers = _layers_config(layers)
        self.loss = check_choice("loss", loss, FEATURE_LOSSES)
        self.student_dim = check_int("student_dim", student_dim, low=1, allow_none=True)
        self.teacher_dim = check_int("teacher_dim", teacher_dim, low=1, allow_none=True)
        self.projector_export = check_choice("projector_export", projector_export, PROJECTOR_EXPORTS)
        self.pairs: tuple[tuple[LayerRef, LayerRef], ...] = (
            () if isinstance(self.layers, str) else layer_pairs(self.layers, None, None))
        self._teacher_states: int | None = None  # L_t + 1: matches -1 with a cached index
        self.projector: nn.Linear | None = None
        self._make_projector(self.student_dim, self.teacher_dim)

    @property
    def student_layers(self) -> tuple[LayerRef, ...]:  # type: ignore[override]
        return tuple(s for s, _ in self.pairs)

    @property
    def teacher_layers(self) -> tuple[LayerRef, ...]:  # type: ignore[override]
        return tuple(t for _, t in self.pairs)

    def _make_projector(self, ds: int | None, dt: int | None) -> None:
        if ds is None or dt is None or ds == dt:
            return
        if self.projector is None or (self.projector.in_features, self.projector.out_features) != (ds, dt):
            self.projector = nn.Linear(ds, dt, bias=False)

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        ls, lt = num_layers(student), num_layers(teacher) if teacher is not None else None
        self.pairs = layer_pairs(self.layers, ls, lt)
        self._teacher_states = lt + 1 if lt is not None else None
        for side, model, count in (("student", student, ls), ("teacher", teacher, lt)):
            refs = [p[0 if side == "student" else 1] for p in self.pairs]
            if model is None or not any(isinstance(r, int) for r in refs):
                continue
            if not is_hf_model(model):
                raise ValueError(f"FeatureKD layer indices {refs} need a Hugging Face {side} (hidden_states); the "
                                 f"{side} is a {type(model).__name__}: give module paths instead, e.g. "
                                 "layers={'encoder.layers.1': 'encoder.layers.3'}.")
            bad = [r for r in refs if isinstance(r, int) and count is not None and not -(count + 1) <= r <= count]
            if bad:
                raise ValueError(f"FeatureKD {side} layer(s) {bad} out of range: the {side} has {count} blocks, so "
                                 f"hidden-state indices 0 (embeddings) .. {count} (or -1 .. -{count + 1}).")
        ints = all(isinstance(s, int) for s in self.student_layers)
        ds = self.student_dim or (hidden_width(student) if ints else None)
        dt = self.teacher_dim or (hidden_width(teacher) if teacher is not None and
                                  all(isinstance(t, int) for t in self.teacher_layers) else None)
        self._make_projector(ds, dt)

    def export_modules(self) -> dict[str, nn.Module]:
        return {"projector": self.projector} if self.projector is not None and self.projector_export == "save" else {}

    def forward(self, inputs: LossInputs) -> Tensor:
        if not self.pairs:
            raise ValueError(f"FeatureKD(layers={self.layers!r}) is not bound to models yet; use it inside "
                             "DistillationModule (which resolves the shortcut from the layer counts).")
        student = _student_features(inputs, "FeatureKD")
        teacher = teacher_features(inputs.teacher)
        total = torch.zeros((), device=inputs.student_logits.device)
        for s, t in self.pairs:
            hs = student.get(s, who="student")
            ht = teacher.get(t, who="teacher", num_states=self._teacher_states)
            if hs.shape[:-1] != ht.shape[:-1]:
                raise ValueError(f"FeatureKD pair ({s!r}, {t!r}): student features {tuple(hs.shape)} and teacher "
                                 f"features {tuple(ht.shape)} do not cover the same positions.")
            if self.projector is not None and hs.shape[-1] == self.projector.in_features:
                hs = self.projector(hs.to(self.projector.weight.dtype))
            if hs.shape[-1] != ht.shape[-1]:
                raise ValueError(
                    f"FeatureKD pair ({s!r}, {t!r}): the student's width {hs.shape[-1]} differs from the teacher's "
                    f"{ht.shape[-1]} and no projector maps one to the other; pass student_dim={hs.shape[-1]} and "
                    f"teacher_dim={ht.shape[-1]} to FeatureKD so one is built (and trained) with the term."
                )
            rows = feature_rows(hs, ht, self.loss)
            total = total + _masked_sum(rows, valid_mask(inputs, rows.shape))
        return total / len(self.pairs)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "layers": self.layers, "loss": self.loss, "student_dim": self.student_dim,
                "teacher_dim": self.teacher_dim, "projector_export": self.projector_export}

    def extra_repr(self) -> str:
        proj = (f"{self.projector.in_features}->{self.projector.out_features}" if self.projector is not None
                else "none")
        layers = self.layers if isinstance(self.layers, str) and not self.pairs else [list(p) for p in self.pairs]
        return (f"layers={layers!r}, loss={self.loss!r}, weight={self.weight}, projector={proj}, "
                f"projector_export={self.projector_export!r}")


class AttentionTransfer(LossTerm):
    """MiniLM's self-attention distillation (Wang et al. 2020) at one block of each model.

    Per valid query position: ``attention_weight ·`` the KL divergence from the teacher's to the
    student's attention distribution, averaged over heads, plus ``value_weight ·`` the KL between
    their value relations (``softmax(V Vᵀ / √d)`` per relation head, MiniLM's value-relation
    transfer; padding keys excluded). Blocks count ``1 .. L``; ``-1`` is the last (MiniLM's choice).

    Attention distributions need a Hugging Face model with eager attention
    (``attn_implementation="eager"``: other implementations return none) and the same number of
    heads in both models (compared head by head, as MiniLM; otherwise refused: use the value
    relation, whose relation heads split both models' value vectors into the same number of parts,
    as MiniLMv2). Value vectors are the output of the block's value projection, found for Llama,
    Mistral, Qwen, Gemma, OPT and BERT-like models; fused q/k/v projections (GPT-2, GPT-NeoX, Phi-3)
    are not supported (pass ``student_values``/``teacher_values`` paths of modules that return the
    value vectors). A teacher cache holds no attentions: this term needs a live teacher.

    Args:
        student_layer: the student's block (``1 .. L``, or negative from the end).
        teacher_layer: the teacher's block.
        attention_weight: weight of the attention-distribution KL (``0``: off).
        value_weight: weight of the value-relation KL (``0``: off).
        relation_heads: relation heads of the value relation (default: the student's number of
            key/value heads).
        student_values: module path of the student's value vectors (default: found by family).
        teacher_values: module path of the teacher's value vectors.
        weight: multiplier in the total loss.

    Raises:
        ValueError: both parts off; a block out of range; attentions asked of a model without eager
            attention or with another head count than the other; no value projection found.
        TypeError: a block or head count that is not an int.
    """

    requires_teacher = True

    def __init__(
        self,
        student_layer: int = -1,
        teacher_layer: int = -1,
        attention_weight: float = 1.0,
        value_weight: float = 1.0,
        relation_heads: int | None = None,
        student_values: str | None = None,
        teacher_values: str | None = None,
        weight: float = 1.0,
    ) -> None:
        super().__init__(weight)
        self.student_layer = check_int("student_layer", student_layer)
        self.teacher_layer = check_int("teacher_layer", teacher_layer)
        if self.student_layer == 0 or self.teacher_layer == 0:
            raise ValueError("student_layer/teacher_layer count blocks from 1 (or -1 for the last), got 0.")
        self.attention_weight = check_number("attention_weight", attention_weight, low=0.0)
        self.value_weight = check_number("value_weight", value_weight, low=0.0)
        if self.attention_weight == 0 and self.value_weight == 0:
            raise ValueError("AttentionTransfer with attention_weight=0 and value_weight=0 computes nothing; give one "
                             "of them a weight > 0.")
        self.relation_heads = check_int("relation_heads", relation_heads, low=1, allow_none=True)
        self.student_values = student_values
        self.teacher_values = teacher_values
        self._heads = self.relation_heads
        self._paths: tuple[str | None, str | None] = (student_values, teacher_values)

    @property
    def reads_attentions(self) -> bool:  # type: ignore[override]
        return self.attention_weight > 0

    @property
    def student_layers(self) -> tuple[LayerRef, ...]:  # type: ignore[override]
        return (self._paths[0],) if self.value_weight > 0 and self._paths[0] else ()

    @property
    def teacher_layers(self) -> tuple[LayerRef, ...]:  # type: ignore[override]
        return (self._paths[1],) if self.value_weight > 0 and self._paths[1] else ()

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        models = {"student": student, "teacher": teacher}
        blocks = {"student": self.student_layer, "teacher": self.teacher_layer}
        for side, model in models.items():
            count = num_layers(model) if model is not None else None
            if count is not None:
                block = blocks[side]
                if not -count <= block <= count:
                    raise ValueError(f"AttentionTransfer {side}_layer={block} is out of range: the {side} has {count} "
                                     f"blocks (1 .. {count}, or -1 .. -{count}).")
                blocks[side] = block if block > 0 else count + 1 + block
            if model is not None and self.attention_weight > 0:
                impl = attn_implementation(model)
                if not is_hf_model(model) or impl != "eager":
                    raise ValueError(
                        f"AttentionTransfer reads the {side}'s attention probabilities, which a Hugging Face model "
                        f"returns only with eager attention (this one: {impl or type(model).__name__}); load it with "
                        "attn_implementation='eager' (or call model.set_attn_implementation('eager')), or set "
                        "attention_weight=0 to use the value relation alone."
                    )
        if student is not None and teacher is not None and self.attention_weight > 0:
            hs, ht = num_heads(student), num_heads(teacher)
            if hs != ht:
                raise ValueError(
                    f"AttentionTransfer compares attention distributions head by head, but the student has {hs} heads "
                    f"and the teacher {ht}; set attention_weight=0 and use the value relation (relation_heads split "
                    "both models' value vectors alike, as MiniLMv2), or pick models with equal head counts."
                )
        if teacher is None and self.attention_weight > 0:
            raise ValueError("AttentionTransfer needs a live teacher (a teacher cache stores no attentions); pass "
                             "teacher=... to DistillationModule.")
        paths = list(self._paths)
        if self.value_weight > 0:
            for i, side in enumerate(("student", "teacher")):
                model = models[side]
                if paths[i] is None and model is not None:
                    paths[i] = value_module_path(model, blocks[side])
                elif paths[i] is None and side == "teacher":
                    raise ValueError("AttentionTransfer's value relation needs a live teacher (or teacher_values=...); "
                                     "a teacher cache stores no value vectors.")
        self._paths = (paths[0], paths[1])
        if self._heads is None:
            config = getattr(student, "config", None)
            kv = getattr(config, "num_key_value_heads", None) or num_heads(student)
            self._heads = kv
        self._blocks = (blocks["student"], blocks["teacher"])

    def forward(self, inputs: LossInputs) -> Tensor:
        student = _student_features(inputs, "AttentionTransfer")
        teacher = teacher_features(inputs.teacher)
        blocks = getattr(self, "_blocks", (self.student_layer, self.teacher_layer))
        total = torch.zeros((), device=inputs.student_logits.device)
        if self.attention_weight > 0:
            a_s = student.attention(blocks[0], who="student")
            a_t = teacher.attention(blocks[1], who="teacher")
            if a_s.shape != a_t.shape:
                raise ValueError(f"AttentionTransfer: student attentions {tuple(a_s.shape)} and teacher attentions "
                                 f"{tuple(a_t.shape)} differ (heads, positions); set attention_weight=0 and use the "
                                 "value relation.")
            rows = attention_kl_rows(a_t, a_s).mean(1)  # (B, T): mean over heads
            total = total + self.attention_weight * _masked_sum(rows, valid_mask(inputs, rows.shape))
        if self.value_weight > 0:
            if self._paths[0] is None or self._paths[1] is None or self._heads is None:
                raise ValueError("AttentionTransfer is not bound to models yet; use it inside DistillationModule (or "
                                 "pass student_values=, teacher_values= and relation_heads=).")
            v_s = student.get(self._paths[0], who="student")
            v_t = teacher.get(self._paths[1], who="teacher")
            batch = inputs.batch
            mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
            keys = mask.bool() if isinstance(mask, Tensor) and mask.shape == v_s.shape[:2] else None
            lt = value_relation_logprobs(v_t, self._heads, keys)
            ls = value_relation_logprobs(v_s, self._heads, keys)
            terms = lt.exp() * (lt - ls)
            rows = torch.where(torch.isfinite(lt), terms, torch.zeros((), device=terms.device)).sum(-1).mean(1)
            total = total + self.value_weight * _masked_sum(rows, valid_mask(inputs, rows.shape))
        return total

    def config(self) -> dict[str, Any]:
        return {**super().config(), "student_layer": self.student_layer, "teacher_layer": self.teacher_layer,
                "attention_weight": self.attention_weight, "value_weight": self.value_weight,
                "relation_heads": self.relation_heads, "student_values": self.student_values,
                "teacher_values": self.teacher_values}

    def extra_repr(self) -> str:
        return (f"student_layer={self.student_layer}, teacher_layer={self.teacher_layer}, "
                f"attention_weight={self.attention_weight}, value_weight={self.value_weight}, "
                f"relation_heads={self._heads}, weight={self.weight}")


def check_cached_features(losses: Mapping[str, LossTerm], hidden_layers: Sequence[int],
                          teacher_layers: int | None = None) -> None:
    """Refuse, before a cached fit starts, terms whose teacher features a cache cannot give.

    Args:
        losses: the module's terms (those with ``weight > 0`` count).
        hidden_layers: the cache's stored ``hidden_states`` indices.
        teacher_layers: the teacher's number of blocks ``L`` (matches ``-1`` with ``L``), if known.

    Raises:
        ValueError: a term reads teacher attentions or module outputs (a cache stores neither),
            or a hidden-state index the cache does not store.
    """
    stored = {i % (teacher_layers + 1) if teacher_layers is not None else i for i in hidden_layers}
    for name, term in losses.items():
        if term.weight <= 0 or not term.requires_teacher:
            continue
        paths = [r for r in term.teacher_layers if isinstance(r, str)]
        if term.reads_attentions or paths:
            what = "attentions" if term.reads_attentions else f"the outputs of {paths}"
            raise ValueError(f"loss term {name!r} reads the teacher's {what}, which a teacher cache does not store "
                             "(it stores logits and hidden_layers only); drop the cache for this run, or the term.")
        missing = [r for r in term.teacher_layers if isinstance(r, int) and
                   (r % (teacher_layers + 1) if teacher_layers is not None else r) not in stored]
        if missing:
            raise ValueError(f"loss term {name!r} reads the teacher's hidden states {missing}, but the teacher cache "
                             f"stores hidden_layers={list(hidden_layers)}; build it with hidden_layers including "
                             f"{missing} (callbacks.teacher_cache.hidden_layers=[...]).")


def export_modules(losses: Mapping[str, LossTerm]) -> dict[str, nn.Module]:
    """``{"<term>_<part>": module}``: what the terms keep for the export (see ``LossTerm.export_modules``)."""
    return {f"{name}_{part}": module for name, term in losses.items() for part, module in term.export_modules().items()}
