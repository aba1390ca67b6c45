"""Model identity: a small, plain-value description of a model, with a weight fingerprint."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from lightning_distill.models.adapters import is_hf_model, unwrap_model

__all__ = ["describe_model", "weights_fingerprint"]

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


def describe_model(model: nn.Module, *, fingerprint: bool = True) -> dict[str, Any]:
    """Plain values that identify a model: class, size, HF name/revision, weight fingerprint.

    The model behind its wrappers is described (:func:`~lightning_distill.models.adapters.unwrap_model`).
    """
    model = unwrap_model(model)
    info: dict[str, Any] = {
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "num_parameters": int(sum(p.numel() for p in model.parameters())),
    }
    if is_hf_model(model):
        config = model.config
        info["model_type"] = getattr(config, "model_type", None)
        info["name_or_path"] = getattr(config, "_name_or_path", "") or None
        info["revision"] = getattr(config, "_commit_hash", None)
        info["vocab_size"] = getattr(config, "vocab_size", None)
    if fingerprint:
        info["weights_sha256"] = weights_fingerprint(model)
    return info
