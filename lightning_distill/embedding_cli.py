"""What the ``lightning-distill`` command does differently for embedding models (docs/relation.md).

Embedding and relation terms (``loss=embedding``, ``rkd``, ``similarity_preserving``) read one
``(batch, width)`` embedding per sample, made by the ``pooling`` config group (a
:class:`~lightning_distill.models.pooling.Pooling`, given to the module as its student and
teacher output function). The command then checks the settings before any data or model loads
(:func:`embedding_settings`), refuses causal-LM heads (:func:`check_embedding_models`), reports
similarity agreement per slice instead of perplexity, skips the language-model baseline
(:data:`BASELINE_SKIPPED`) and records the pooling with the exported student.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

__all__ = ["BASELINE_SKIPPED", "check_embedding_models", "embedding_settings", "pooling_record"]

log = logging.getLogger("lightning_distill")

#: Why an embedding run trains no no-teacher baseline (printed, and written to report.json).
BASELINE_SKIPPED = (
    "baseline skipped: the no-teacher baseline trains the student on next-token labels, which an embedding "
    "model has no use for, and lightning-distill has no teacher-free embedding objective; compare against "
    "your own (examples/embedding_distillation.py trains one contrastively), and set baseline=false to "
    "silence this note."
)


def embedding_settings(cfg: DictConfig, losses: Mapping[str, Any]) -> Any:
    """Check the pooling against the loss terms; returns the ``Pooling`` object, or ``None``.

    With terms that read embeddings, a ``CoverageSlices`` callback with ``metric: perplexity``
    (the default) is switched to ``similarity`` in ``cfg`` (the recorded config says so).

    Args:
        cfg: the composed config (its ``pooling`` and ``callbacks`` nodes).
        losses: the built loss terms.

    Raises:
        ValueError: embedding terms without ``pooling``; ``pooling`` with terms that read logits;
            embedding terms without a ``CoverageSlices`` callback, or with ``metric: accuracy``.
    """
    import hydra

    readers = [name for name, term in losses.items() if getattr(term, "reads_embeddings", False)]
    node = cfg.get("pooling")
    if not readers:
        if node:
            raise ValueError(
                f"pooling={node.get('mode', node)} makes one embedding per sample, but the loss terms "
                f"{sorted(losses)} read logits; use an embedding loss (loss=embedding, loss=rkd or "
                "loss=similarity_preserving), or drop the pooling (pooling=null)."
            )
        return None
    if not node:
        raise ValueError(
            f"the loss terms {readers} compare one embedding per sample, but no pooling is set; add "
            "pooling=mean (or pooling=cls) to pool the encoders' token states (docs/relation.md)."
        )
    for side in (
        "teacher",
        "student",
    ):  # configs that always build a language model: refused before it is built
        target = str((cfg.get(side) or {}).get("_target_", ""))
        if target.rsplit(".", 1)[-1] in _CAUSAL_LM_TARGETS:
            raise ValueError(_causal_lm_message(side, f"{_choice(side)}{target}"))
    coverage = {
        name: callback
        for name, callback in (cfg.get("callbacks") or {}).items()
        if callback and str(callback.get("_target_", "")).endswith("CoverageSlices")
    }
    if not coverage:
        raise ValueError(
            f"the loss terms {readers} train an embedding model, which the command scores per slice by "
            "similarity agreement through the CoverageSlices callback, and these callbacks have none; use "
            "callbacks=coverage_similarity (or keep callbacks.coverage)."
        )
    for name, callback in coverage.items():
        if callback.get("metric") == "perplexity":
            with open_dict(cfg):
                OmegaConf.update(cfg, f"callbacks.{name}.metric", "similarity")
            log.info(
                "Embedding loss terms: the coverage report uses similarity agreement (callbacks.%s.metric="
                "similarity).",
                name,
            )
        elif callback.get("metric") != "similarity":
            raise ValueError(
                f"callbacks.{name}.metric={callback.get('metric')} cannot score embedding models; set "
                f"callbacks.{name}.metric=similarity (or callbacks=coverage_similarity)."
            )
    return hydra.utils.instantiate(node)


def check_embedding_models(student: Any, teacher: Any) -> None:
    """Refuse a model with a language-model head in an embedding run (its output has no token states
    to pool), before any training.

    Raises:
        ValueError: naming the model's class and the configs that load an encoder.
    """
    from lightning_distill.models.adapters import is_causal_lm, unwrap_model

    for side, model in (("teacher", teacher), ("student", student)):
        if model is not None and is_causal_lm(model):
            raise ValueError(_causal_lm_message(side, type(unwrap_model(model)).__name__))


#: Config targets that build a causal language model (with its head).
_CAUSAL_LM_TARGETS = (
    "demo_teacher",
    "load_pretrained",
    "causal_lm_from_config",
    "student_from_teacher",
)


def _choice(group: str) -> str:
    """``"<group>=<option>, "`` of the running Hydra job, or ``""`` (a config composed in Python)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return f"{group}={HydraConfig.get().runtime.choices.get(group)}, "
    except (ImportError, ValueError):
        return ""


def _causal_lm_message(side: str, what: str) -> str:
    return (
        f"the {side} is a causal language model ({what}), whose output has logits but no token states to pool "
        f"for embedding distillation; use an encoder without a head: {side}=hf_encoder_pretrained "
        f"{side}.path=<model folder> (transformers' AutoModel), or {side}=hf_encoder to build one from a config."
    )


def pooling_record(module: Any) -> dict[str, Any] | None:
    """How the exported student's embeddings are made (``Pooling.config()``), or ``None``."""
    fn = getattr(module, "student_logits_fn", None)
    config = getattr(fn, "config", None)
    if not getattr(module, "embedding_output", False) or not callable(config):
        return None
    values = config()
    return {
        **values,
        "use": f"lightning_distill.models.Pooling(mode={values['mode']!r}, normalize="
        f"{values['normalize']}) on the output of transformers.AutoModel.from_pretrained("
        "<this folder>) and the batch's attention_mask",
    }
