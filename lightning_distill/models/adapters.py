"""Output adapters: how to call a model on a batch and read logits from what it returns.

One answer for every model kind: Hugging Face models (``ModelOutput.logits``), plain
``nn.Module`` s returning a tensor, tuples or dicts, and anything else through a
user callable.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

__all__ = [
    "RESERVED_BATCH_KEYS",
    "call_model",
    "is_causal_lm",
    "is_hf_model",
    "logits_from_output",
    "output_vocab_size",
]

#: Batch keys that describe the sample rather than feed the model.
RESERVED_BATCH_KEYS = frozenset({"labels", "slice", "sample_id", "teacher_targets"})

LogitsFn = Callable[[Any], Tensor]


def is_hf_model(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel``."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel)


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a Hugging Face causal LM (logits at t score token t + 1)."""
    if not is_hf_model(model):
        return False
    name = type(model).__name__
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return True
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return name in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def output_vocab_size(model: nn.Module) -> int | None:
    """The width of the model's logits when it can be read without a forward pass."""
    if is_hf_model(model):
        head = model.get_output_embeddings()
        if head is not None and getattr(head, "weight", None) is not None:
            return int(head.weight.shape[0])
        size = getattr(model.config, "vocab_size", None) or getattr(model.config, "num_labels", None)
        return int(size) if size else None
    return None


def _forward_parameters(model: nn.Module) -> tuple[frozenset[str], bool]:
    cached = model.__dict__.get("_ld_forward_params")
    if cached is None:
        params = inspect.signature(model.forward).parameters.values()
        named = frozenset(
            p.name for p in params
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        )
        var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
        cached = (named, var_kw)
        model.__dict__["_ld_forward_params"] = cached
    return cached


def call_model(model: nn.Module, inputs: Any, **extra: Any) -> Any:
    """Call ``model`` on ``inputs``: a mapping of named inputs, a tensor, or a tuple of them.

    For a mapping, only the keys that ``model.forward`` names are passed (a forward that takes
    nothing but ``**kwargs`` gets every non-reserved key), so batches may carry extra keys
    such as ``slice`` or ``sample_id``. Hugging Face models are called with ``use_cache=False``
    (no key/value cache is built during training) and ``return_dict=True``. ``extra`` keyword
    arguments (e.g. ``output_hidden_states=True``) are always passed.
    """
    if isinstance(inputs, Mapping):
        named, var_kw = _forward_parameters(model)
        if named - {"self"}:
            kwargs = {k: v for k, v in inputs.items() if k in named and k not in RESERVED_BATCH_KEYS}
        elif var_kw:
            kwargs = {k: v for k, v in inputs.items() if k not in RESERVED_BATCH_KEYS}
        else:
            kwargs = {}
        if not kwargs:
            raise ValueError(
                f"none of the batch keys {sorted(inputs)} is an input of {type(model).__name__}.forward "
                f"(it takes {sorted(named) or 'only positional arguments'}); rename the keys or pass "
                "(inputs, target) tuples."
            )
        if is_hf_model(model):
            if "use_cache" in named or var_kw:
                kwargs.setdefault("use_cache", False)
            if "return_dict" in named or var_kw:
                kwargs.setdefault("return_dict", True)
        return model(**kwargs, **extra)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs, **extra)
    return model(inputs, **extra)


def logits_from_output(output: Any, fn: LogitsFn | None = None, *, who: str = "model") -> Tensor:
    """Read logits from a model's output.

    Args:
        output: what the model returned.
        fn: optional user callable ``output -> logits`` for anything else (for example a
            model that returns log-probabilities flattened to ``(N, V)``).
        who: ``"student"`` or ``"teacher"``, for error messages.

    Raises:
        TypeError: when no logits can be found; the message says what came back.
    """
    if fn is not None:
        logits = fn(output)
    elif isinstance(output, Tensor):
        logits = output
    elif getattr(output, "logits", None) is not None:
        logits = output.logits
    elif isinstance(output, Mapping) and "logits" in output:
        logits = output["logits"]
    elif isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        logits = output[0]
    else:
        raise TypeError(
            f"cannot read logits from the {who}'s output of type {type(output).__name__}; return a "
            f"tensor or an object with .logits, or pass {who}_logits_fn=lambda out: ... to "
            "DistillationModule."
        )
    if not isinstance(logits, Tensor):
        raise TypeError(f"the {who}'s logits must be a torch.Tensor, got {type(logits).__name__}.")
    return logits
