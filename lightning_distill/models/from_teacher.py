"""A smaller student cut from the teacher: a subset of its layers, optionally a narrower MLP.

The student starts from the teacher's knowledge instead of from noise: its config is the
teacher's with fewer layers (and optionally a narrower MLP), and every weight it keeps is a copy
of the teacher's: embeddings, the kept layers, the final norm and the head. This is the
DistilBERT initialisation (one layer in two) and the depth/width pruning of Minitron, without the
retraining, which is what distillation then does.

Supported: decoder-only Hugging Face causal LMs whose blocks live in ``model.layers`` (Llama,
Qwen2, Mistral, Gemma, Phi-3, ...) or ``transformer.h`` (GPT-2) or ``gpt_neox.layers``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_distill.models.adapters import is_hf_model
from lightning_distill.validation import check_int

__all__ = ["LAYER_CHOICES", "MLP_SELECTIONS", "random_init_like", "select_layers", "student_from_teacher"]

#: Named layer subsets (or pass an explicit list of teacher layer indices).
LAYER_CHOICES = ("every_other", "first_k", "all")
#: How the neurons of a narrower MLP are chosen: the first ones, or those whose weights have the largest norm.
MLP_SELECTIONS = ("first", "norm")

# Where each supported family keeps its blocks, and the config fields for depth and MLP width.
_FAMILIES = (
    ("model.layers", "num_hidden_layers", "intermediate_size"),
    ("transformer.h", "n_layer", "n_inner"),
    ("gpt_neox.layers", "num_hidden_layers", "intermediate_size"),
)


def select_layers(layers: str | Sequence[int], num_layers: int, k: int | None = None) -> list[int]:
    """The teacher layer indices a student keeps.

    Args:
        layers: ``"every_other"`` (0, 2, 4, ...), ``"first_k"`` (0 .. k - 1), ``"all"``, or an
            explicit increasing list of indices.
        num_layers: the teacher's number of layers.
        k: the number of layers for ``first_k``.

    Raises:
        ValueError: an unknown name, a missing or out-of-range ``k``, or a list that is empty,
            repeats or is not increasing, or names a layer the teacher does not have.
        TypeError: ``layers`` is neither a name nor a list of ints, or ``k`` is not an int.
    """
    if isinstance(layers, str):
        if layers == "every_other":
            return list(range(0, num_layers, 2))
        if layers == "all":
            return list(range(num_layers))
        if layers == "first_k":
            need = f"layers=first_k needs k between 1 and the teacher's {num_layers} layers"
            if k is None:
                raise ValueError(f"{need}, got k=None.")
            check_int("k", k, low=1, high=num_layers, hint=f"({need}.)")
            return list(range(k))
        raise ValueError(f"layers={layers!r} is not a layer choice; use one of {list(LAYER_CHOICES)} or a list of "
                         f"layer indices such as [0, 5, 11].")
    try:
        kept = list(layers)
    except TypeError:
        raise TypeError(f"layers must be one of {list(LAYER_CHOICES)} or a list of ints, got {layers!r}.") from None
    if any(isinstance(i, bool) or not isinstance(i, int) for i in kept):
        raise TypeError(f"layers must be a list of ints (teacher layer indices), got {kept!r}.")
    if not kept:
        raise ValueError("layers must be a non-empty list of ints (teacher layer indices), got [].")
    bad = [i for i in kept if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"layers {bad} do not exist: the teacher has layers 0..{num_layers - 1}.")
    if any(b <= a for a, b in zip(kept, kept[1:])):
        raise ValueError(f"layers must be strictly increasing (each teacher layer once, in order), got {kept}.")
    return kept


def _family(model: nn.Module) -> tuple[str, str, str]:
    names = {name for name, _ in model.named_modules()}
    for prefix, depth, width in _FAMILIES:
        if prefix in names and isinstance(model.get_submodule(prefix), nn.ModuleList):
            return prefix, depth, width
    raise ValueError(
        f"student_from_teacher does not know where {type(model).__name__} keeps its layers; supported are "
        f"decoder-only causal LMs with {', '.join(p for p, _, _ in _FAMILIES)} (Llama, Qwen2, Mistral, GPT-2, ...). "
        "Use student=hf_config or student=hf_pretrained for this teacher."
    )


def _mlp_width(config: Any, width_field: str) -> int:
    value = getattr(config, width_field, None)
    if value is None and width_field == "n_inner":  # GPT-2: None means 4 * n_embd
        value = 4 * config.n_embd
    if value is None:
        raise ValueError(f"{type(config).__name__} has no {width_field}; a narrower MLP cannot be cut from it.")
    return int(value)


def student_from_teacher(
    teacher: nn.Module | None = None,
    *,
    layers: str | Sequence[int] = "every_other",
    k: int | None = None,
    intermediate_size: int | None = None,
    mlp_selection: str = "first",
    dtype: str | torch.dtype | None = "float32",
    seed: int | None = 0,
) -> nn.Module:
    """A student with the teacher's architecture, fewer layers, and the teacher's weights.

    Args:
        teacher: a Hugging Face causal LM (the CLI passes the configured teacher). It is not
            changed: every kept weight is copied.
        layers: which teacher layers the student keeps (see :func:`select_layers`).
        k: the number of layers for ``layers="first_k"``.
        intermediate_size: a narrower MLP (``None``: the teacher's width).
        mlp_selection: which MLP neurons a narrower MLP keeps, per layer: ``first`` or ``norm``
            (the largest summed squared norm of the neuron's input and output weights).
        dtype: the student's parameter dtype (default ``float32``, whatever the teacher's).
        seed: seeds the construction (every weight is then overwritten by the teacher's).

    Returns:
        The student; ``student.config.derived_from_teacher`` records the teacher, the kept layers
        and the MLP width (saved in its ``config.json`` and shown in the distillation card).

    Raises:
        ValueError: no teacher, an unsupported architecture, a bad layer list, an MLP wider than
            the teacher's or an unknown ``mlp_selection``.
        TypeError: the teacher is not a Hugging Face model, or ``k``, ``intermediate_size`` or a
            layer index is not an int.
    """
    from transformers import AutoModelForCausalLM

    from lightning_distill.models.hf import _dtype

    if teacher is None:
        raise ValueError("student=from_teacher needs a teacher to cut the student from; pick one with teacher=... "
                         "(teacher=none has nothing to copy).")
    if not is_hf_model(teacher):
        raise TypeError(f"student_from_teacher needs a Hugging Face PreTrainedModel teacher, got {type(teacher).__name__}.")
    if mlp_selection not in MLP_SELECTIONS:
        raise ValueError(f"mlp_selection={mlp_selection!r} is not one of {list(MLP_SELECTIONS)}.")
    prefix, depth_field, width_field = _family(teacher)
    num_layers = len(teacher.get_submodule(prefix))
    kept = select_layers(layers, num_layers, k)

    config = copy.deepcopy(teacher.config)
    config._name_or_path = ""  # a new model: not the teacher's folder (the teacher is in derived_from_teacher)
    setattr(config, depth_field, len(kept))
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == num_layers:
        config.layer_types = [layer_types[i] for i in kept]
    teacher_width = None
    if intermediate_size is not None:
        teacher_width = _mlp_width(teacher.config, width_field)
        check_int("intermediate_size", intermediate_size, low=1, high=teacher_width,
                  hint=f"(At most the teacher's {teacher_width}.)")
        setattr(config, width_field, intermediate_size)
    config.derived_from_teacher = {
        "teacher": getattr(teacher.config, "_name_or_path", "") or None,
        "teacher_class": type(teacher).__name__,
        "teacher_layers": num_layers,
        "layers": kept,
        "intermediate_size": intermediate_size,
        "teacher_intermediate_size": teacher_width,
        "mlp_selection": mlp_selection if intermediate_size is not None else None,
    }
    target_dtype = _dtype(dtype) or next(teacher.parameters()).dtype
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        student = AutoModelForCausalLM.from_config(config)
    student = student.to(target_dtype)
    student.load_state_dict(_cut_state(teacher, student, prefix, kept, mlp_selection, target_dtype))
    return student


def _cut_state(teacher: nn.Module, student: nn.Module, prefix: str, kept: list[int], selection: str,
               dtype: torch.dtype) -> dict[str, Tensor]:
    """The student's state dict, every entry copied (and narrowed where the shapes say so) from the teacher."""
    source = teacher.state_dict()
    layer_key = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.(.*)$")
    out: dict[str, Tensor] = {}
    narrowed: dict[int, dict[str, Tensor]] = {}  # student layer -> {key: teacher tensor} that need cutting
    for key, target in student.state_dict().items():
        match = layer_key.match(key)
        src_key = f"{prefix}.{kept[int(match.group(1))]}.{match.group(2)}" if match else key
        if src_key not in source:
            raise ValueError(f"the teacher has no {src_key!r} for the student's {key!r}; this architecture is not "
                             "supported by student_from_teacher.")
        tensor = source[src_key]
        if tensor.shape == target.shape:
            out[key] = tensor.detach().to("cpu", dtype if tensor.is_floating_point() else tensor.dtype).clone()
        elif match is not None and tensor.dim() == target.dim():
            narrowed.setdefault(int(match.group(1)), {})[key] = tensor
        else:
            raise ValueError(f"the teacher's {src_key!r} has shape {tuple(tensor.shape)}, the student's {key!r} "
                             f"{tuple(target.shape)}; only MLP widths can be narrowed.")
    targets = student.state_dict()
    for tensors in narrowed.values():
        width = {targets[key].shape[d] for key, t in tensors.items() for d in range(t.dim())
                 if t.shape[d] != targets[key].shape[d]}
        if len(width) != 1:
            raise ValueError(f"cannot narrow {sorted(tensors)}: the cut dimensions disagree ({sorted(width)}).")
        keep = _neurons(tensors, targets, width.pop(), selection)
        for key, tensor in tensors.items():
            for d in range(tensor.dim()):
                if tensor.shape[d] != targets[key].shape[d]:
                    tensor = tensor.index_select(d, keep)
            out[key] = tensor.detach().to("cpu", dtype).clone()
    return out


def _neurons(tensors: dict[str, Tensor], targets: dict[str, Tensor], width: int, selection: str) -> Tensor:
    """The (increasing) indices of the MLP neurons one layer keeps."""
    if selection == "first":
        return torch.arange(width)
    score = None
    for key, tensor in tensors.items():
        for d in range(tensor.dim()):
            if tensor.shape[d] != targets[key].shape[d]:
                dims = [i for i in range(tensor.dim()) if i != d]
                part = tensor.detach().float().pow(2).sum(dim=dims) if dims else tensor.detach().float().pow(2)
                score = part if score is None else score + part
    return torch.topk(score, width).indices.sort().values


def random_init_like(model: nn.Module, *, seed: int | None = 0) -> nn.Module:
    """A freshly initialised model of ``model``'s architecture and dtype (the no-teacher baseline of a cut student)."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        fresh = AutoModelForCausalLM.from_config(copy.deepcopy(model.config))
    return fresh.to(next(model.parameters()).dtype)
