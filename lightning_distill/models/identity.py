"""Model identity: a small, plain-value description of a model, with a weight fingerprint."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn

from lightning_distill.models.adapters import is_hf_model, unwrap_model

__all__ = ["INFORMATIONAL_FIELDS", "config_fingerprint", "describe_model", "weights_fingerprint"]

#: Identity fields that say where a model came from, not what it computes: recorded, never compared
#: (a teacher loaded back from the folder it was saved to is the same teacher). They identify a
#: model only when its weights are too large to hash (``weights_sha256`` is ``None``).
INFORMATIONAL_FIELDS = ("name_or_path", "revision")

# Config entries that do not change what the model computes: where it was loaded from, library
# bookkeeping, runtime switches, and the dtype (recorded on its own from the parameters).
_CONFIG_IGNORED = frozenset({
    "_name_or_path", "_commit_hash", "transformers_version", "architectures", "dtype", "torch_dtype",
    "attn_implementation", "_attn_implementation", "_attn_implementation_autoset", "_attn_implementation_internal",
    "use_cache", "output_attentions", "output_hidden_states", "return_dict", "torchscript",
    "derived_from_teacher",
})

#: Models above this many bytes of parameters are identified by name and revision only.
MAX_HASH_BYTES = 2 * 2**30


def weights_fingerprint(model: nn.Module, max_bytes: int = MAX_HASH_BYTES) -> str | None:
    """sha256 (16 hex digits) over parameter names, shapes, dtypes and values, or ``None``.

    Returns ``None`` when the parameters take more than ``max_bytes`` (hashing them would cost
    more than the fingerprint is worth; name and revision identify such models). Wrappers
    (``torch.compile``, DDP, peft) are looked through: a compiled model has its model's fingerprint.
    """
    state = unwrap_model(model).state_dict()
    size = sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))
    if size > max_bytes:
        return None
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name]
        if not isinstance(tensor, torch.Tensor):
            continue
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:16]


def config_fingerprint(config: Any) -> str:
    """sha256 (16 hex digits) of a Hugging Face config's entries that change what the model computes.

    Where the config was loaded from, the library version, runtime switches (``use_cache``,
    attention implementation) and the dtype are left out, so a model saved with
    ``save_pretrained`` and loaded back has the fingerprint it had before.
    """
    values = {k: v for k, v in config.to_dict().items() if k not in _CONFIG_IGNORED}
    blob = json.dumps(values, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def _param_dtype(model: nn.Module) -> str | None:
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.is_floating_point()})
    return ",".join(dtypes) or None


def describe_model(model: nn.Module, *, fingerprint: bool = True) -> dict[str, Any]:
    """Plain values that identify a model by what it computes, plus where it came from.

    What it computes: class, parameter count and dtype, and for Hugging Face models the model
    type, vocabulary size and a fingerprint of the config (:func:`config_fingerprint`); with
    ``fingerprint``, a digest of the weights. Where it came from (:data:`INFORMATIONAL_FIELDS`:
    ``name_or_path``, ``revision``) is recorded for people to read; caches do not compare it
    while the weights are hashed. The model behind its wrappers is described
    (:func:`~lightning_distill.models.adapters.unwrap_model`).
    """
    model = unwrap_model(model)
    info: dict[str, Any] = {
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "num_parameters": int(sum(p.numel() for p in model.parameters())),
        "dtype": _param_dtype(model),
    }
    if is_hf_model(model):
        config = model.config
        info["model_type"] = getattr(config, "model_type", None)
        info["name_or_path"] = getattr(config, "_name_or_path", "") or None
        info["revision"] = getattr(config, "_commit_hash", None)
        info["vocab_size"] = getattr(config, "vocab_size", None)
        info["config_sha256"] = config_fingerprint(config)
        if getattr(config, "derived_from_teacher", None):  # a student cut from its teacher (from_teacher)
            info["derived_from_teacher"] = config.derived_from_teacher
    if fingerprint:
        info["weights_sha256"] = weights_fingerprint(model)
    return info
