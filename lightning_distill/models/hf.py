"""Build Hugging Face models for configs: from a local path or hub id, or from a config."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["causal_lm_from_config", "freeze", "load_pretrained"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    try:
        return _DTYPES[value]
    except KeyError:
        raise ValueError(f"unknown dtype {value!r}; use one of {sorted(_DTYPES)}.") from None


def causal_lm_from_config(model_type: str = "llama", *, seed: int | None = 0, dtype: str | None = None,
                          **config: Any) -> nn.Module:
    """A randomly initialised causal LM of ``model_type`` (``llama``, ``gpt2``, ``qwen2``, ...).

    Args:
        model_type: a transformers model type.
        seed: seeds the initialisation, so the same config gives the same weights.
        dtype: optional parameter dtype (``float32``, ``bfloat16``, ``float16``).
        **config: fields of that model type's config (``hidden_size``, ``vocab_size``, ...).

    Example:
        >>> m = causal_lm_from_config("llama", vocab_size=64, hidden_size=16, intermediate_size=32,
        ...                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
        >>> type(m).__name__
        'LlamaForCausalLM'
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        cfg = AutoConfig.for_model(model_type, **config)
    except ValueError as err:
        raise ValueError(f"unknown model_type {model_type!r}: {err}") from None
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
    if dtype is not None:
        model = model.to(_dtype(dtype))
    return model


def load_pretrained(path: str, *, revision: str | None = None, dtype: str | None = None,
                    trust_remote_code: bool = False, local_files_only: bool = False,
                    **kwargs: Any) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` with safe defaults.

    ``trust_remote_code`` stays off unless you turn it on; weights load from safetensors when
    the checkpoint has them.
    """
    from transformers import AutoModelForCausalLM

    extra = {"dtype": _dtype(dtype)} if dtype is not None else {}
    return AutoModelForCausalLM.from_pretrained(
        path, revision=revision, trust_remote_code=trust_remote_code,
        local_files_only=local_files_only, use_safetensors=None, **extra, **kwargs,
    )


def freeze(model: nn.Module) -> nn.Module:
    """Put ``model`` in eval mode with every parameter's ``requires_grad`` off; returns it."""
    model.eval()
    model.requires_grad_(False)
    return model
