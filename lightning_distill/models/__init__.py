"""Models: output adapters, Hugging Face builders, identity."""

from lightning_distill.models.adapters import (
    call_model,
    is_causal_lm,
    is_hf_model,
    logits_from_output,
    output_vocab_size,
)
from lightning_distill.models.from_teacher import (
    random_init_like,
    select_layers,
    student_from_teacher,
)
from lightning_distill.models.hf import (
    causal_lm_from_config,
    freeze,
    load_pretrained,
    load_pretrained_encoder,
)
from lightning_distill.models.identity import describe_model, weights_fingerprint
from lightning_distill.models.pooling import Pooling, encoder_from_config

__all__ = [
    "call_model",
    "causal_lm_from_config",
    "describe_model",
    "encoder_from_config",
    "freeze",
    "is_causal_lm",
    "is_hf_model",
    "load_pretrained",
    "load_pretrained_encoder",
    "logits_from_output",
    "output_vocab_size",
    "Pooling",
    "random_init_like",
    "select_layers",
    "student_from_teacher",
    "weights_fingerprint",
]
