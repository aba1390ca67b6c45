"""Loss terms and the pure divergence functions they wrap."""

from lightning_distill.losses import functional
from lightning_distill.losses.cross_tokenizer import CrossTokenizerKD, ULDLoss
from lightning_distill.losses.terms import LogitKD, LossTerm, TaskLoss

__all__ = ["CrossTokenizerKD", "LogitKD", "LossTerm", "TaskLoss", "ULDLoss", "functional"]
