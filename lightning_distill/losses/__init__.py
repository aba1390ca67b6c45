"""Loss terms and the pure divergence functions they wrap."""

from lightning_distill.losses import functional
from lightning_distill.losses.cross_tokenizer import CrossTokenizerKD, ULDLoss
from lightning_distill.losses.feature_terms import AttentionTransfer, FeatureKD
from lightning_distill.losses.relation import (
           EmbeddingKD,
           RKDAngle,
           RKDDistance,
           SimilarityPreserving,
)
from lightning_distill.losses.terms import LogitKD, LossTerm, TaskLoss

__all__ = ["AttentionTransfer", "CrossTokenizerKD", "EmbeddingKD", "FeatureKD", "LogitKD", "LossTerm", "RKDAngle",
           "RKDDistance", "SimilarityPreserving", "TaskLoss", "ULDLoss", "functional"]
