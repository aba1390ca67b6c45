"""Encoders as embedding models: pool a model's token states into one vector per sample.

:class:`Pooling` is an *output function* (``DistillationModule(student_logits_fn=...,
teacher_logits_fn=...)``): it turns what an encoder returns into ``(batch, D)`` embeddings, the
way sentence-transformers models do (mean over the attention mask of ``last_hidden_state``, the
first (CLS) token, a max over the mask, or the last real token). Relation and embedding loss
terms (:mod:`lightning_distill.losses.relation`) read those embeddings.

:func:`encoder_from_config` builds a randomly initialised Hugging Face encoder (``BertModel``,
...) from a config, for tests, demos and Hydra (``conf/student/hf_encoder.yaml``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_distill.validation import check_bool, check_choice

__all__ = ["POOLING_MODES", "Pooling", "encoder_from_config", "pool"]

#: The ways :class:`Pooling` reduces token states to one vector.
POOLING_MODES = ("mean", "cls", "max", "last")


def pool(hidden: Tensor, attention_mask: Tensor | None, mode: str = "mean") -> Tensor:
    """Reduce ``(B, T, D)`` token states to ``(B, D)`` over the positions ``attention_mask`` keeps.

    Args:
        hidden: the token states.
        attention_mask: ``(B, T)``, 1 at real tokens; ``None``: every position is real.
        mode: ``mean`` (mean over real tokens), ``cls`` (position 0), ``max`` (per-dimension max over
            real tokens) or ``last`` (the last real token, for right-padded decoder models).

    Raises:
        ValueError: an unknown ``mode``, or a mask whose shape is not ``hidden``'s first two.
    """
    check_choice("mode", mode, POOLING_MODES)
    if mode == "cls":
        return hidden[:, 0]
    if attention_mask is None:
        attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    if attention_mask.shape != hidden.shape[:2]:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but the token states "
                         f"{tuple(hidden.shape)}; they must agree on (batch, positions).")
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    if mode == "mean":
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
    if mode == "max":
        return hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).amax(1)
    last = (attention_mask.long().sum(1) - 1).clamp_min(0)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class Pooling:
    """An output function that makes ``(B, D)`` embeddings of a model's output.

    It reads, in this order: a ready embedding (``output["sentence_embedding"]`` of a
    sentence-transformers-like model, or a 2-D tensor), else the token states
    (``output.last_hidden_state``, a 3-D tensor, or the first element of a tuple) and pools them
    over the batch's ``attention_mask`` (:func:`pool`). The module hands it the model inputs
    (``reads_inputs``), which is where the mask comes from.

    Args:
        mode: ``mean``, ``cls``, ``max`` or ``last`` (see :func:`pool`).
        normalize: L2-normalise each embedding (for models trained with cosine objectives).

    Raises:
        ValueError: an unknown ``mode``.
        TypeError: ``normalize`` not a bool.

    Example:
        >>> module = DistillationModule(student, teacher, losses={"emb": EmbeddingKD()},  # doctest: +SKIP
        ...     student_logits_fn=Pooling("mean"), teacher_logits_fn=Pooling("mean"))
    """

    #: The module passes the model inputs as a second argument (for the attention mask).
    reads_inputs = True

    def __init__(self, mode: str = "mean", normalize: bool = False) -> None:
        self.mode = check_choice("mode", mode, POOLING_MODES)
        self.normalize = check_bool("normalize", normalize)

    def __call__(self, output: Any, inputs: Any = None) -> Tensor:
        embeddings = self._ready(output)
        if embeddings is None:
            hidden = self._hidden(output)
            mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
            embeddings = pool(hidden, mask, self.mode)
        return nn.functional.normalize(embeddings, dim=-1) if self.normalize else embeddings

    @staticmethod
    def _ready(output: Any) -> Tensor | None:
        if isinstance(output, Mapping) and isinstance(output.get("sentence_embedding"), Tensor):
            return output["sentence_embedding"]
        if isinstance(output, Tensor) and output.dim() == 2:
            return output
        return None

    @staticmethod
    def _hidden(output: Any) -> Tensor:
        hidden = getattr(output, "last_hidden_state", None)
        if hidden is None and isinstance(output, Mapping):
            hidden = output.get("last_hidden_state", output.get("token_embeddings"))
        if hidden is None and isinstance(output, Tensor):
            hidden = output
        if hidden is None and isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
            hidden = output[0]
        if not isinstance(hidden, Tensor) or hidden.dim() != 3:
            raise TypeError(
                f"Pooling cannot find (batch, positions, width) token states in a {type(output).__name__} "
                "output; use an encoder that returns last_hidden_state (e.g. transformers' AutoModel, not "
                "a *ForMaskedLM head), a (B, T, D) tensor, or a (B, D) embedding."
            )
        return hidden

    def config(self) -> dict[str, Any]:
        """Plain values that describe this output function."""
        return {"type": "Pooling", "mode": self.mode, "normalize": self.normalize}

    def __repr__(self) -> str:
        return f"Pooling(mode={self.mode!r}, normalize={self.normalize})"


def encoder_from_config(model_type: str = "bert", *, seed: int | None = 0, dtype: str | None = None,
                        **config: Any) -> nn.Module:
    """A randomly initialised Hugging Face encoder (``AutoModel``: token states, no head) of ``model_type``.

    Args:
        model_type: a transformers model type with an encoder (``bert``, ``roberta``, ``distilbert``, ...).
        seed: seeds the initialisation, so the same config gives the same weights.
        dtype: optional parameter dtype (``float32``, ``bfloat16``, ``float16``).
        **config: fields of that model type's config (``hidden_size``, ``vocab_size``, ...).

    Raises:
        ValueError: an unknown ``model_type``.

    Example:
        >>> m = encoder_from_config("bert", vocab_size=64, hidden_size=16, intermediate_size=32,
        ...                         num_hidden_layers=1, num_attention_heads=2)
        >>> type(m).__name__
        'BertModel'
    """
    from transformers import AutoConfig, AutoModel

    from lightning_distill.models.hf import _dtype

    try:
        cfg = AutoConfig.for_model(model_type, **config)
    except ValueError as err:
        raise ValueError(f"unknown model_type {model_type!r}: {err}") from None
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = AutoModel.from_config(cfg, add_pooling_layer=False) if model_type == "bert" \
            else AutoModel.from_config(cfg)
    if dtype is not None:
        model = model.to(_dtype(dtype))
    return model
