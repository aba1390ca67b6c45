"""Build Hugging Face models for configs: from a local path or hub id, or from a config."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_distill.validation import check_bool

__all__ = ["causal_lm_from_config", "freeze", "load_pretrained", "load_pretrained_encoder"]

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


def _looks_like_path(value: str) -> bool:
    """A value meant as a local folder: absolute, relative (``./``, ``../``, ``~``) or OS-separated."""
    return value.startswith(("/", "./", "../", "~", "\\")) or (len(value) > 1 and value[1] == ":") \
        or value.count("/") > 1 or os.sep != "/" and os.sep in value


def load_pretrained(path: str | os.PathLike, *, revision: str | None = None, dtype: str | torch.dtype | None = None,
                    attn_implementation: str | None = None, trust_remote_code: bool = False,
                    local_files_only: bool = False, **kwargs: Any) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` with safe defaults, from a local folder or a hub id.

    ``trust_remote_code`` stays off unless you turn it on (only for code you have read); weights
    load from safetensors when the checkpoint has them.

    Args:
        path: a local folder written by ``save_pretrained`` or a hub id (``org/name``).
        revision: a hub branch, tag or commit (hub ids only).
        dtype: parameter dtype: ``float32``/``fp32``, ``bfloat16``/``bf16``, ``float16``/``fp16``
            (a bf16 teacher next to an fp32 student halves the teacher's memory); ``None`` keeps
            the checkpoint's.
        attn_implementation: ``eager``, ``sdpa``, ``flash_attention_2``, ...; ``None`` lets
            transformers choose.
        trust_remote_code: run the checkpoint's own modelling code (off by default).
        local_files_only: never reach the network.
        **kwargs: passed to ``from_pretrained``.

    Raises:
        FileNotFoundError: ``path`` looks like a local path (``/``, ``./``, ``~``...) and does not exist.
        ValueError: an unknown ``dtype``; pickled weights that hold more than tensors (refused unread);
            weights that are not readable safetensors.
        TypeError: ``trust_remote_code`` or ``local_files_only`` is not a bool.
    """
    from transformers import AutoModelForCausalLM

    return _from_pretrained(AutoModelForCausalLM, path, revision=revision, dtype=dtype,
                            attn_implementation=attn_implementation, trust_remote_code=trust_remote_code,
                            local_files_only=local_files_only, **kwargs)


def load_pretrained_encoder(path: str | os.PathLike, *, revision: str | None = None,
                            dtype: str | torch.dtype | None = None, attn_implementation: str | None = None,
                            trust_remote_code: bool = False, local_files_only: bool = False,
                            **kwargs: Any) -> nn.Module:
    """``AutoModel.from_pretrained`` (token states, no head) with the safe defaults of :func:`load_pretrained`:
    the encoder teacher or student of embedding distillation (``teacher=hf_encoder_pretrained``,
    docs/relation.md). A folder of a model with a head (``*ForMaskedLM``, ``*ForCausalLM``) loads its
    base model.

    Args:
        path: a local folder written by ``save_pretrained`` or a hub id (``org/name``).
        revision: a hub branch, tag or commit (hub ids only).
        dtype: parameter dtype (``float32``, ``bfloat16``, ``float16``); ``None`` keeps the checkpoint's.
        attn_implementation: ``eager``, ``sdpa``, ...; ``None`` lets transformers choose.
        trust_remote_code: run the checkpoint's own modelling code (off by default).
        local_files_only: never reach the network.
        **kwargs: passed to ``from_pretrained``.

    Raises:
        FileNotFoundError: a local-looking ``path`` that does not exist, or a folder without config.json.
        ValueError: an unknown ``dtype``; pickled weights that hold more than tensors; unreadable safetensors.
        TypeError: ``trust_remote_code`` or ``local_files_only`` is not a bool.
    """
    from transformers import AutoModel

    return _from_pretrained(AutoModel, path, revision=revision, dtype=dtype, attn_implementation=attn_implementation,
                            trust_remote_code=trust_remote_code, local_files_only=local_files_only, **kwargs)


def _from_pretrained(auto_class: Any, path: str | os.PathLike, *, revision: str | None, dtype: Any,
                     attn_implementation: str | None, trust_remote_code: bool, local_files_only: bool,
                     **kwargs: Any) -> nn.Module:
    for name, flag in (("trust_remote_code", trust_remote_code), ("local_files_only", local_files_only)):
        check_bool(name, flag)
    torch_dtype = _dtype(dtype)
    path = os.fspath(path)
    if _looks_like_path(path) and not Path(path).expanduser().exists():
        raise FileNotFoundError(
            f"no model folder at {path!r} (resolved to {Path(path).expanduser().resolve()}); pass a folder "
            "written by save_pretrained (with config.json) or a hub id such as 'org/name'."
        )
    if Path(path).expanduser().is_dir():
        path = str(Path(path).expanduser())
        if not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"{path!r} is a folder without config.json; point to the folder that "
                                    "save_pretrained wrote.")
    extra: dict[str, Any] = {}
    if torch_dtype is not None:
        extra["dtype"] = torch_dtype
    if attn_implementation is not None:
        extra["attn_implementation"] = attn_implementation
    from safetensors import SafetensorError

    try:
        return auto_class.from_pretrained(
            path, revision=revision, trust_remote_code=trust_remote_code,
            local_files_only=local_files_only, use_safetensors=None, **extra, **kwargs,
        )
    except SafetensorError as error:
        raise ValueError(
            f"the safetensors weights at {path!r} cannot be read ({error}): the file is damaged or is not "
            "safetensors (nothing in it was run). Re-save the model with save_pretrained(), or export the "
            "student again."
        ) from None
    except pickle.UnpicklingError:
        # torch's message advises weights_only=False, the load that runs the file's code: never pass it on.
        raise ValueError(
            f"the weights at {path!r} are a pickle holding Python objects besides tensors, so they were not "
            "loaded (unpickling them could run code). Use safetensors weights (model.safetensors), e.g. "
            "re-saved with save_pretrained() from a copy you trust."
        ) from None


def freeze(model: nn.Module) -> nn.Module:
    """Put ``model`` in eval mode with every parameter's ``requires_grad`` off; returns it."""
    model.eval()
    model.requires_grad_(False)
    return model
