"""Intermediate features of a model: hidden states by layer index, any module's output by path,
attention probabilities.

Two ways to reach inside a model, one convention for the losses that read them:

* **layer index** (``int``), for Hugging Face models: an index into the ``hidden_states`` tuple the
  model returns with ``output_hidden_states=True``. Index ``0`` is the embeddings' output, index
  ``i`` (``1 .. L``) the output of block ``i``, and index ``L`` (or ``-1``) the model's last hidden
  state as transformers returns it (for Llama-like models: after the final norm). A teacher cache
  built with ``hidden_layers=[...]`` stores the same indices.
* **module path** (``str``), for any ``nn.Module``: the output of ``model.get_submodule(path)``
  (``"encoder.layers.3"``, ``"model.layers.1.self_attn.v_proj"``), caught by a forward hook that
  lives only for the one forward (:func:`capture`; a tuple output gives its first tensor). Paths
  name the unwrapped model (:func:`~lightning_distill.models.adapters.unwrap_model`), so the same
  path works on a ``torch.compile``d or DDP-wrapped model.

Attentions (``output_attentions=True``) are indexed by block, ``1 .. L`` (``-1``: the last), the
way hidden states are, so ``attentions`` block ``i`` belongs to hidden state ``i``. Hugging Face
models return them only with eager attention (``attn_implementation="eager"``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from lightning_distill.models.adapters import is_hf_model, unwrap_model

__all__ = [
    "FeatureRequest",
    "Features",
    "LayerRef",
    "attn_implementation",
    "capture",
    "capture_hooks",
    "hidden_width",
    "layer_pairs",
    "num_layers",
    "num_heads",
    "value_module_path",
]

#: A layer index into ``hidden_states`` (Hugging Face models) or a module path (any model).
LayerRef = int | str

#: Where the supported families keep the value projection of block ``i`` (0-based).
VALUE_PATHS = (
    "model.layers.{i}.self_attn.v_proj",  # Llama, Mistral, Qwen2/3, Gemma, Olmo, ...
    "model.decoder.layers.{i}.self_attn.v_proj",  # OPT
    "gpt_neox.layers.{i}.attention.query_key_value",  # (fused: refused below)
    "bert.encoder.layer.{i}.attention.self.value",  # BERT-like with a head
    "encoder.layer.{i}.attention.self.value",  # BERT-like base models
    "roberta.encoder.layer.{i}.attention.self.value",
)
_FUSED = ("query_key_value", "c_attn", "qkv_proj", "Wqkv")


def _config(model: nn.Module) -> Any:
    return getattr(unwrap_model(model), "config", None) if is_hf_model(model) else None


def num_layers(model: nn.Module) -> int | None:
    """The number of blocks ``L`` of a Hugging Face model (``hidden_states`` has ``L + 1``
    entries), or ``None`` when its config does not say (or it is no Hugging Face model)."""
    config = _config(model)
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def hidden_width(model: nn.Module) -> int | None:
    """The width of a Hugging Face model's hidden states (``hidden_size``), or ``None``."""
    config = _config(model)
    for key in ("hidden_size", "n_embd", "d_model", "dim"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def num_heads(model: nn.Module) -> int | None:
    """The number of attention heads of a Hugging Face model, or ``None``."""
    config = _config(model)
    for key in ("num_attention_heads", "n_head"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def attn_implementation(model: nn.Module) -> str | None:
    """The attention implementation of a Hugging Face model (``"eager"``, ``"sdpa"``, ...), or ``None``."""
    config = _config(model)
    return getattr(config, "_attn_implementation", None) if config is not None else None


def value_module_path(model: nn.Module, block: int) -> str:
    """The module path of block ``block``'s value projection (``block`` counted ``1 .. L``).

    Raises:
        ValueError: the model's family keeps no separate value projection where this library
            looks (:data:`VALUE_PATHS`), or keeps it fused with the queries and keys.
    """
    base = unwrap_model(model)
    for template in VALUE_PATHS:
        path = template.format(i=block - 1)
        try:
            module = base.get_submodule(path)
        except AttributeError:
            continue
        if path.rsplit(".", 1)[-1] in _FUSED or not isinstance(module, nn.Linear):
            break
        return path
    supported = ", ".join(t.format(i="<i>") for t in VALUE_PATHS if not t.endswith(_FUSED))
    raise ValueError(
        f"cannot find a separate value projection in block {block} of {type(base).__name__}: value relations "
        f"read the output of one of {supported} (Llama, Mistral, Qwen, Gemma, OPT, BERT, RoBERTa); families with "
        "fused query/key/value projections (GPT-2, GPT-NeoX, Phi-3) are not supported. Pass the path of a module "
        "whose output is the value vectors (student_values=/teacher_values=), or set value_weight=0."
    )


def layer_pairs(layers: str | Mapping[Any, Any] | Sequence[Sequence[Any]], student_layers: int | None,
                teacher_layers: int | None) -> tuple[tuple[LayerRef, LayerRef], ...]:
    """The ``(student, teacher)`` pairs of a layer map.

    Args:
        layers: ``"last"`` (the last hidden states of both: ``(L_s, L_t)``), ``"uniform"`` (student
            block ``i`` ↔ teacher block ``round(i · L_t / L_s)``, ``i = 1 .. L_s``: the teacher's
            blocks evenly spaced, ending at its last), or explicit pairs: a mapping
            ``{student: teacher}`` or a list of ``[student, teacher]``, each an index into
            ``hidden_states`` or a module path (a string of digits counts as an index).
        student_layers: the student's number of blocks ``L_s`` (for the shortcuts).
        teacher_layers: the teacher's ``L_t``.

    Raises:
        ValueError: an unknown shortcut, a shortcut without layer counts, an empty map, a
            repeated student layer.
        TypeError: a map that is neither a name, a mapping nor a list of pairs.
    """
    if isinstance(layers, str):
        if layers not in ("last", "uniform"):
            raise ValueError(f"layers must be 'last', 'uniform' or explicit {{student: teacher}} pairs, got {layers!r}.")
        if student_layers is None or teacher_layers is None:
            raise ValueError(
                f"layers={layers!r} needs the layer counts of both models, but the "
                f"{'student' if student_layers is None else 'teacher'}'s is unknown (not a Hugging Face model, or "
                "no teacher was given: a cache-only run); give explicit pairs, e.g. layers={2: 4}."
            )
        if layers == "last":
            return ((student_layers, teacher_layers),)
        return tuple((i, (2 * i * teacher_layers + student_layers) // (2 * student_layers))
                     for i in range(1, student_layers + 1))
    if isinstance(layers, Mapping):
        items = list(layers.items())
    elif isinstance(layers, Sequence) and all(isinstance(p, Sequence) and not isinstance(p, str) and len(p) == 2
                                              for p in layers):
        items = [tuple(p) for p in layers]
    else:
        raise TypeError(f"layers must be 'last', 'uniform', a mapping {{student: teacher}} or a list of "
                        f"[student, teacher] pairs, got {layers!r} ({type(layers).__name__}).")
    if not items:
        raise ValueError("layers is empty; give at least one {student: teacher} pair, or 'last'.")
    pairs = tuple((_ref(s, "student"), _ref(t, "teacher")) for s, t in items)
    students = [s for s, _ in pairs]
    if len(set(students)) != len(students):
        raise ValueError(f"layers maps a student layer twice: {list(pairs)}; give each student layer one teacher layer.")
    return pairs


def _ref(value: Any, who: str) -> LayerRef:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(f"a {who} layer must be an int (hidden-state index) or a str (module path), got "
                        f"{value!r} ({type(value).__name__}).")
    if isinstance(value, str):
        stripped = value.strip()
        if stripped.lstrip("-").isdigit():
            return int(stripped)
        if not stripped:
            raise ValueError(f"a {who} module path is empty; give e.g. 'model.layers.1'.")
        return stripped
    return value


@dataclass
class Features:
    """What a forward pass exposed beyond its logits, for the feature terms.

    Attributes:
        hidden_states: Hugging Face's ``hidden_states`` tuple (``0`` = embeddings), or the stored
            subset of it (``hidden_layers`` say which indices).
        hidden_layers: the indices ``hidden_states`` hold, in order; ``None``: all of them.
        attentions: Hugging Face's ``attentions`` tuple, one ``(B, heads, T, T)`` per block.
        modules: ``{path: output}`` of the hooked modules.
    """

    hidden_states: tuple[Tensor, ...] | None = None
    hidden_layers: tuple[int, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None
    modules: dict[str, Tensor] = field(default_factory=dict)

    def get(self, ref: LayerRef, *, who: str, num_states: int | None = None) -> Tensor:
        """The feature ``ref`` (an index into ``hidden_states`` or a module path).

        Args:
            ref: the layer.
            who: ``"student"`` or ``"teacher"``, for messages.
            num_states: ``L + 1``, to match a negative index with a stored non-negative one.

        Raises:
            ValueError: the feature was not computed (or not stored in the cache).
        """
        if isinstance(ref, str):
            if ref not in self.modules:
                raise ValueError(f"the {who}'s module output {ref!r} is not available" + (
                    "; a teacher cache stores hidden states by index only (hidden_layers=[...]), not module "
                    "outputs: use layer indices, or a live teacher" if who == "teacher" else "") + ".")
            return self.modules[ref]
        states = self.hidden_states
        if states is None or len(states) == 0:
            raise ValueError(
                f"the {who} returned no hidden states for layer {ref}: layer indices need a Hugging Face model "
                "(output_hidden_states)" + (", or a teacher cache built with hidden_layers=[...] holding them"
                                            if who == "teacher" else "") + "; use module paths for other models."
            )
        if self.hidden_layers is None:
            if not -len(states) <= ref < len(states):
                raise ValueError(f"the {who} has {len(states)} hidden states (0 = embeddings .. {len(states) - 1}); "
                                 f"layer {ref} is out of range.")
            return states[ref]
        stored = list(self.hidden_layers)
        if ref in stored:
            return states[stored.index(ref)]
        if num_states is not None:
            wanted = ref % num_states
            for i, index in enumerate(stored):
                if index % num_states == wanted:
                    return states[i]
        raise ValueError(f"the {who}'s hidden state {ref} is not among the stored layers {stored}; rebuild the "
                         f"teacher cache with hidden_layers including {ref}.")

    def attention(self, block: int, *, who: str) -> Tensor:
        """Block ``block``'s attention probabilities ``(B, heads, T, T)`` (``1 .. L``, ``-1``: last).

        Raises:
            ValueError: no attentions came back (not eager attention, or no Hugging Face model).
        """
        if not self.attentions:
            raise ValueError(
                f"the {who} returned no attentions: Hugging Face models return them only with eager attention; "
                "load it with attn_implementation='eager' (or call model.set_attn_implementation('eager')), or "
                "use a teacher cache only without attention terms."
            )
        count = len(self.attentions)
        index = block - 1 if block > 0 else count + block
        if not 0 <= index < count:
            raise ValueError(f"the {who} has {count} attention blocks (1 .. {count}, or -1 for the last); "
                             f"block {block} is out of range.")
        return self.attentions[index]


@dataclass(frozen=True)
class FeatureRequest:
    """What one side (student or teacher) must expose for the active terms.

    Attributes:
        indices: hidden-state indices (asks ``output_hidden_states=True``).
        paths: module paths to hook.
        attentions: asks ``output_attentions=True``.
    """

    indices: frozenset[int] = frozenset()
    paths: tuple[str, ...] = ()
    attentions: bool = False

    @classmethod
    def of(cls, terms: Iterable[Any], side: str) -> FeatureRequest:
        """The union of what ``terms`` declare for ``side`` (``"student"`` or ``"teacher"``), read from
        their ``<side>_layers`` and ``reads_attentions`` declarations."""
        refs = [ref for term in terms for ref in getattr(term, f"{side}_layers", ())]
        paths = tuple(dict.fromkeys(r for r in refs if isinstance(r, str)))
        return cls(indices=frozenset(r for r in refs if isinstance(r, int)), paths=paths,
                   attentions=any(getattr(t, "reads_attentions", False) for t in terms))

    def __bool__(self) -> bool:
        return bool(self.indices or self.paths or self.attentions)

    def flags(self, model: nn.Module) -> dict[str, bool]:
        """The keyword arguments of the forward (Hugging Face models only)."""
        if not is_hf_model(model):
            return {}
        out = {}
        if self.indices:
            out["output_hidden_states"] = True
        if self.attentions:
            out["output_attentions"] = True
        return out

    def collect(self, output: Any, modules: Mapping[str, Tensor]) -> Features:
        """The :class:`Features` of one forward's ``output`` and hooked ``modules``."""
        return Features(
            hidden_states=_field(output, "hidden_states", "decoder_hidden_states") if self.indices else None,
            attentions=_field(output, "attentions", "decoder_attentions") if self.attentions else None,
            modules=dict(modules),
        )


def _field(output: Any, *names: str) -> Any:
    for name in names:
        value = output.get(name) if isinstance(output, Mapping) else getattr(output, name, None)
        if value is not None:
            return tuple(value)
    return None


def _first_tensor(output: Any) -> Tensor | None:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return next((o for o in output if isinstance(o, Tensor)), None)
    return getattr(output, "last_hidden_state", None)


@contextlib.contextmanager
def capture(model: nn.Module | None, paths: Sequence[str]) -> Iterator[dict[str, Tensor]]:
    """Hook the outputs of ``model``'s submodules at ``paths`` for the forwards inside the block.

    Yields a dict that fills with ``{path: output}`` (a tuple output gives its first tensor) as
    the forward runs. The hooks are removed when the block ends, also on an exception: no hook
    outlives the forward. Paths name the unwrapped model (``torch.compile``, DDP, peft are looked
    through; a hook on the inner module fires when the wrapper runs it).

    Raises:
        ValueError: a path that names no submodule (with the model's top-level children).
    """
    found: dict[str, Tensor] = {}
    if model is None or not paths:
        yield found
        return
    base = unwrap_model(model)
    handles = []
    try:
        for path in paths:
            try:
                module = base.get_submodule(path)
            except AttributeError:
                children = [name for name, _ in base.named_children()]
                raise ValueError(f"{type(base).__name__} has no submodule {path!r} (its top-level modules: "
                                 f"{children}); name one of model.named_modules().") from None

            def hook(_module: nn.Module, _args: Any, output: Any, path: str = path) -> None:
                tensor = _first_tensor(output)
                if tensor is None:
                    raise TypeError(f"the module {path!r} returned {type(output).__name__}, not a tensor; hook a "
                                    "module that returns one.")
                found[path] = tensor

            hook.lightning_distill_capture = True  # type: ignore[attr-defined]  # see capture_hooks
            handles.append(module.register_forward_hook(hook))
        yield found
    finally:
        for handle in handles:
            handle.remove()


def capture_hooks(model: nn.Module) -> list[str]:
    """The paths of ``model``'s submodules that hold a :func:`capture` hook (none outside a
    ``capture`` block). Other hooks (transformers installs its own output-recording hooks on the
    first ``output_hidden_states`` call) are not counted."""
    base = unwrap_model(model)
    return [name for name, module in base.named_modules()
            if any(getattr(h, "lightning_distill_capture", False) for h in module._forward_hooks.values())]
