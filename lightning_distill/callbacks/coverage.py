"""Per-slice student-vs-teacher evaluation with coverage-gap alarms: :class:`CoverageSlices`.

A student copies the teacher's behaviour on the data it was distilled on, not the teacher's whole
capability. This callback scores student and teacher on every slice of the held-out data at each
validation and test, sets that next to how much of each slice the student trained on (its
*coverage*), and raises an alarm for slices where the student kept up badly (*coverage gaps*).

**Retention** is the student's task metric relative to the teacher's, oriented so that 1.0 means
"as good as the teacher" and smaller is worse, for both metric kinds:

* ``metric="perplexity"`` (language models): ``teacher_ppl / student_ppl``
  ``= exp((teacher_nll - student_nll) / tokens)``; 0.5 means twice the teacher's perplexity.
* ``metric="accuracy"`` (classifiers): ``student_acc / teacher_acc``; 0.5 means half the
  teacher's accuracy.
* ``metric="similarity"`` (embedding models, with relation/embedding loss terms): the Spearman
  correlation of the student's and the teacher's pairwise cosine similarities over the slice's eval
  samples (up to ``max_samples_per_slice`` of them, gathered from every rank); 1.0 means the
  student orders every pair of samples as the teacher does.

All sums (tokens, NLL, agreement, KL, correct predictions, training coverage) live in torchmetrics
``Metric`` states reduced with ``sum``, so the numbers are the same on one rank and under DDP.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lightning_distill.alignment import valid_positions
from lightning_distill.reporting import (
    COVERAGE_FIELDS,
    METRICS,
    TABLE_KEYS,
    coverage_rows,
    describe_row,
    effective_metric,
    format_coverage_table,
    plot_retention,
    retention,
    write_coverage_reports,
)
from lightning_distill.similarity import similarity_agreement
from lightning_distill.validation import check_bool, check_choice, check_int, check_number

__all__ = ["COVERAGE_FIELDS", "CoverageGapError", "CoverageSlices", "SliceSums", "coverage_rows",
           "format_coverage_table", "plot_retention", "retention"]

_TRAIN_FIELDS = ("samples", "tokens")
_ON_GAP = ("warn", "error")


class CoverageGapError(RuntimeError):
    """A slice's retention is below the configured threshold and ``on_gap="error"``."""


class SliceSums(Metric):
    """Per-slice sums of named quantities: one ``(num_slices,)`` float64 state per field.

    States reduce with ``sum`` across processes, so :meth:`compute` returns the global sums.
    """

    full_state_update = False

    def __init__(self, slices: Sequence[str], fields: Sequence[str]) -> None:
        super().__init__()
        self.slices = list(slices)
        self.fields = list(fields)
        self._index = {name: i for i, name in enumerate(self.slices)}
        for field in self.fields:
            self.add_state(field, default=torch.zeros(len(self.slices), dtype=torch.float64),
                           dist_reduce_fx="sum")

    def slice_index(self, names: Sequence[str], device: torch.device, where: str = "an evaluation batch") -> Tensor:
        unknown = sorted({str(n) for n in names} - self._index.keys())
        if unknown:
            raise ValueError(f"unknown slice(s) {unknown} in {where}; the known slices are "
                             f"{self.slices}. Pass CoverageSlices(slices=[...]) with every slice name.")
        return torch.tensor([self._index[str(n)] for n in names], dtype=torch.long, device=device)

    def update(self, names: Sequence[str], values: Mapping[str, Tensor],  # type: ignore[override]
               where: str = "an evaluation batch", skip_unknown: bool = False) -> None:
        device = getattr(self, self.fields[0]).device
        keep = None
        if skip_unknown:
            rows = [i for i, n in enumerate(names) if str(n) in self._index]
            if len(rows) < len(names):
                keep = torch.tensor(rows, dtype=torch.long)
                names = [names[i] for i in rows]
        index = self.slice_index(names, device, where)
        for field in self.fields:
            value = values.get(field)
            if value is None:
                continue
            value = value.detach().reshape(-1)
            if keep is not None:
                value = value[keep.to(value.device)]
            getattr(self, field).index_add_(0, index, value.to(device=device, dtype=torch.float64))

    def compute(self) -> dict[str, Tensor]:
        return {field: getattr(self, field).clone() for field in self.fields}

    def sums(self) -> dict[str, Tensor]:
        """:meth:`compute` as ``(num_slices,)`` tensors (torchmetrics squeezes a single slice to 0-d)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return {field: value.reshape(-1) for field, value in self.compute().items()}


class SliceEmbeddings(Metric):
    """The student's and the teacher's embeddings of up to ``max_per_slice`` eval samples per slice.

    States are lists concatenated across processes, so :meth:`compute` sees every rank's samples
    (each rank keeps its first ``max_per_slice`` of a slice; after the gather, the first
    ``max_per_slice`` in rank order are compared).
    """

    full_state_update = False

    def __init__(self, slices: Sequence[str], max_per_slice: int) -> None:
        super().__init__()
        self.slices = list(slices)
        self.max_per_slice = max_per_slice
        for name in ("index", "student", "teacher"):
            self.add_state(name, default=[], dist_reduce_fx="cat")
        self._kept = [0] * len(self.slices)

    def update(self, index: Tensor, student: Tensor, teacher: Tensor | None) -> None:  # type: ignore[override]
        keep = []
        for row, i in enumerate(index.tolist()):
            if self._kept[i] < self.max_per_slice:
                keep.append(row)
                self._kept[i] += 1
        if not keep:
            return
        rows = torch.tensor(keep, dtype=torch.long, device=student.device)
        self.index.append(index[rows.to(index.device)])
        self.student.append(student.detach()[rows].float())
        if teacher is not None:
            self.teacher.append(teacher.detach()[rows].float())

    def reset(self) -> None:
        super().reset()
        self._kept = [0] * len(self.slices)

    def compute(self) -> dict[str, dict[str, float | None]]:
        """``{slice: {"similarity": Spearman agreement or None, "pairs": pairs compared}}``."""
        out: dict[str, dict[str, float | None]] = {n: {"similarity": None, "pairs": 0} for n in self.slices}
        if isinstance(self.index, list) and not self.index:
            return out
        index = dim_zero_cat(self.index)
        student = dim_zero_cat(self.student)
        has_teacher = not (isinstance(self.teacher, list) and not self.teacher)
        teacher = dim_zero_cat(self.teacher) if has_teacher else None
        for i, name in enumerate(self.slices):
            rows = (index == i).nonzero().reshape(-1)[: self.max_per_slice]
            n = int(rows.numel())
            out[name]["pairs"] = n * (n - 1) // 2
            if teacher is not None and n >= 3:
                out[name]["similarity"] = similarity_agreement(student[rows], teacher[rows])
        return out


class CoverageSlices(Callback):
    """Evaluate student and teacher per data slice; report coverage, retention and gaps.

    At the end of every validation (not the sanity check) and test, it writes ``coverage.json``,
    ``coverage.md`` (a table) and ``coverage.png`` (retention per slice, gaps in red, thresholds as
    lines) to ``dirpath``; logs ``coverage/<slice>/{retention,gap,student_metric,teacher_metric,
    agreement,kl,train_tokens}`` and ``coverage/gaps`` (``test_coverage/...`` at test time)
    through ``pl_module.log``; and, with a ``WandbLogger``, a ``wandb.Table`` plus a bar chart of
    retention. Slices whose retention is below the thresholds are *coverage gaps*: a warning
    names each one with its numbers, and with ``on_gap="error"`` a :class:`CoverageGapError`
    is raised at the end of ``fit`` / ``test``, after the reports are written.

    Evaluation numbers come from the module's own validation/test step, one forward per batch:
    the callback switches on ``DistillationModule.eval_sample_sums`` and adds up the per-sample
    sums the step returns (its ``outputs``); it needs no forward of its own.

    Training coverage: ``on_train_batch_end`` counts the valid label positions (``tokens``, the
    count evaluation uses) and samples of each slice the student trained on; the counts
    are summed across ranks and kept in checkpoints, so a resumed run keeps them.

    Args:
        slices: every slice name, in report order. ``None``: ``trainer.datamodule.slices`` at
            setup (with ``dataloader_names``: those names).
        slice_key: the batch key holding each sample's slice name (a list of strings).
        slice_fn: ``slice_fn(batch) -> list[str]`` instead of ``slice_key``.
        dataloader_names: one slice name per eval dataloader (``dataloader_idx`` -> name): every
            sample of dataloader *i* belongs to slice ``dataloader_names[i]``. Training batches
            still use ``slice_fn`` / ``slice_key`` (uncounted if the key is missing); names
            outside these and the datamodule's slices are skipped, with one warning.
        metric: ``"perplexity"`` (language models), ``"accuracy"`` (classifiers) or ``"similarity"``
            (embedding models: a module whose terms read embeddings, e.g. ``RKDDistance``; the
            thresholds then apply to the similarity agreement).
        min_retention: a slice with retention below this is a gap (``None``: no absolute rule).
            The default, 0.3, flags a slice where the student's perplexity is more than 3.3x the
            teacher's (or its accuracy under 30% of the teacher's).
        min_relative_retention: a slice with retention below this fraction of the best slice's
            retention is a gap (``None``: no relative rule).
        max_gap_to_best: a slice with retention below ``best - max_gap_to_best`` is a gap.
        on_gap: ``"warn"`` or ``"error"``.
        dirpath: where reports go; default: ``trainer.default_root_dir``.
        count_training: count training coverage per slice.
        max_samples_per_slice: ``metric="similarity"``: how many eval samples per slice are kept
            for the pairwise comparison (memory ``n * width`` per slice, time ``n²``).

    Raises:
        ValueError: on a bad argument (the message names the value), on a slice name that is not
            among the known ones, or when no slice names can be found.
        CoverageGapError: at the end of fit or test with ``on_gap="error"`` and a gap.

    Example::

        trainer = L.Trainer(callbacks=[CoverageSlices(min_retention=0.3, on_gap="error")])
        trainer.fit(module, datamodule)   # datamodule batches carry batch["slice"]
    """

    def __init__(
        self,
        slices: Sequence[str] | None = None,
        slice_key: str = "slice",
        slice_fn: Callable[[Any], Sequence[str]] | None = None,
        dataloader_names: Sequence[str] | None = None,
        metric: str = "perplexity",
        min_retention: float | None = 0.3,
        min_relative_retention: float | None = None,
        max_gap_to_best: float | None = None,
        on_gap: str = "warn",
        dirpath: str | os.PathLike[str] | None = None,
        count_training: bool = True,
        max_samples_per_slice: int = 1024,
    ) -> None:
        super().__init__()
        if isinstance(slices, str):
            slices = [slices]
        if slices is not None:
            slices = [str(s) for s in slices]
            if not slices or len(set(slices)) != len(slices):
                raise ValueError(f"slices must be a non-empty list of distinct names, got {slices!r}.")
        if not isinstance(slice_key, str):
            raise TypeError(f"slice_key must be a string, got {slice_key!r} ({type(slice_key).__name__}).")
        if not slice_key:
            raise ValueError(f"slice_key must be a non-empty string, got {slice_key!r}.")
        if slice_fn is not None and not callable(slice_fn):
            raise TypeError(f"slice_fn must be callable (batch -> list of slice names), got {slice_fn!r}.")
        if dataloader_names is not None:
            dataloader_names = [str(n) for n in dataloader_names]
            if not dataloader_names:
                raise ValueError("dataloader_names=[] names no dataloader; pass None or one name per "
                                 "eval dataloader.")
            if slices is not None and set(dataloader_names) - set(slices):
                raise ValueError(f"dataloader_names {sorted(set(dataloader_names) - set(slices))} are not "
                                 f"among slices={slices}.")
        check_choice("metric", metric, METRICS)
        check_choice("on_gap", on_gap, _ON_GAP)
        check_bool("count_training", count_training)
        self.slices = slices
        self.slice_key = slice_key
        self.slice_fn = slice_fn
        self.dataloader_names = dataloader_names
        self.metric = metric
        self.min_retention = check_number("min_retention", min_retention, low=0.0, allow_none=True)
        self.min_relative_retention = check_number("min_relative_retention", min_relative_retention,
                                                   low=0.0, high=1.0, allow_none=True)
        self.max_gap_to_best = check_number("max_gap_to_best", max_gap_to_best, low=0.0, allow_none=True)
        self.on_gap = on_gap
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.count_training = count_training
        self.max_samples_per_slice = check_int("max_samples_per_slice", max_samples_per_slice, low=3)
        self._embeddings: SliceEmbeddings | None = None
        self._eval: SliceSums | None = None
        self._train: SliceSums | None = None
        self._restored_train: dict[str, dict[str, float]] = {}
        self._warned_other = False
        #: The rows of the last evaluation (see :func:`coverage_rows`), and its stage and step.
        self.last_rows: list[dict[str, Any]] = []
        self.last_stage: str | None = None
        self.last_step: int | None = None
        #: Per-slice sums (``COVERAGE_FIELDS``) of the last evaluation, summed over ranks.
        self.last_sums: dict[str, dict[str, float | None]] = {}
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ config / state
    def config(self) -> dict[str, Any]:
        """The settings, as plain values (for records and cards)."""
        return {"slices": self.slices, "slice_key": self.slice_key,
                "slice_fn": getattr(self.slice_fn, "__qualname__", None) if self.slice_fn else None,
                "dataloader_names": self.dataloader_names, "metric": self.metric,
                "min_retention": self.min_retention, "min_relative_retention": self.min_relative_retention,
                "max_gap_to_best": self.max_gap_to_best, "on_gap": self.on_gap,
                "max_samples_per_slice": self.max_samples_per_slice}

    def train_coverage(self) -> dict[str, dict[str, float]]:
        """Training samples and tokens seen per slice, summed over ranks (a collective under DDP)."""
        names = list(dict.fromkeys([*(self.slices or []), *self._restored_train]))
        totals = {n: {f: float(self._restored_train.get(n, {}).get(f, 0.0)) for f in _TRAIN_FIELDS}
                  for n in names}
        if self._train is not None:
            sums = self._train.sums()
            for i, n in enumerate(self._train.slices):
                for f in _TRAIN_FIELDS:
                    totals.setdefault(n, {g: 0.0 for g in _TRAIN_FIELDS})[f] += float(sums[f][i])
        return totals

    def state_dict(self) -> dict[str, Any]:
        return {"train_coverage": self.train_coverage(), "last_rows": self.last_rows,
                "last_stage": self.last_stage, "last_step": self.last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored_train = {str(k): {f: float(v.get(f, 0.0)) for f in _TRAIN_FIELDS}
                                for k, v in dict(state_dict.get("train_coverage") or {}).items()}
        self.last_rows = list(state_dict.get("last_rows") or [])
        self.last_stage = state_dict.get("last_stage")
        self.last_step = state_dict.get("last_step")
        if self._train is not None:
            self._train.reset()  # the restored totals already hold what was counted

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.slices is None:
            if self.dataloader_names is not None:
                self.slices = list(dict.fromkeys(self.dataloader_names))
            else:
                found = getattr(trainer.datamodule, "slices", None) if trainer.datamodule is not None else None
                if not found:
                    raise ValueError(
                        "CoverageSlices needs the slice names up front (DDP-safe sums): pass "
                        "slices=[...] or dataloader_names=[...], or use a datamodule with a .slices list."
                    )
                self.slices = [str(s) for s in found]
        if not hasattr(pl_module, "evaluate_batch"):
            raise ValueError(f"CoverageSlices needs a module with evaluate_batch(batch) (a "
                             f"DistillationModule), got {type(pl_module).__name__}.")
        # The module's eval step returns the per-sample sums of its own forward: one forward per batch.
        pl_module.eval_sample_sums = True
        if self._eval is None:
            self._eval = SliceSums(self.slices, COVERAGE_FIELDS)
        if self._train is None and self.count_training:
            train_slices = list(self.slices)
            if self.dataloader_names is not None and trainer.datamodule is not None:
                # Training batches name the datamodule's slices, which the eval loaders need not have.
                found = getattr(trainer.datamodule, "slices", None) or []
                train_slices += [str(n) for n in found if str(n) not in train_slices]
            self._train = SliceSums(train_slices, _TRAIN_FIELDS)
        if self.metric == "similarity" and self._embeddings is None:
            self._embeddings = SliceEmbeddings(self.slices, self.max_samples_per_slice)
        self._eval.to(pl_module.device)
        if self._embeddings is not None:
            self._embeddings.to(pl_module.device)
        if self._train is not None:
            self._train.to(pl_module.device)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        pl_module.eval_sample_sums = False  # a later run without this callback skips the sums

    # ------------------------------------------------------------------ slice names
    def _names(self, batch: Any, dataloader_idx: int | None, n: int) -> list[str] | None:
        if dataloader_idx is not None and self.dataloader_names is not None:
            if dataloader_idx >= len(self.dataloader_names):
                raise ValueError(f"eval dataloader {dataloader_idx} has no name; dataloader_names="
                                 f"{self.dataloader_names} names only {len(self.dataloader_names)}.")
            return [self.dataloader_names[dataloader_idx]] * n
        if self.slice_fn is not None:
            names = list(self.slice_fn(batch))
        elif isinstance(batch, Mapping) and self.slice_key in batch:
            names = list(batch[self.slice_key])
        else:
            return None
        if len(names) != n:
            raise ValueError(f"the batch has {n} samples but {len(names)} slice names.")
        return [str(x) for x in names]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Before the first step, the first validation batch must name its slices: otherwise the first
        validation, after ``val_check_interval`` training steps, would be the first to fail."""
        if self.dataloader_names is not None or self.slice_fn is not None or trainer.datamodule is None \
                or not trainer.limit_val_batches:
            return
        try:
            loaders = trainer.datamodule.val_dataloader()
        except Exception:  # no validation data: nothing to check here
            return
        if isinstance(loaders, Mapping):
            loaders = list(loaders.values())
        first = loaders[0] if isinstance(loaders, list | tuple) and loaders else loaders
        batch = next(iter(first), None) if first is not None else None
        if isinstance(batch, Mapping) and self.slice_key not in batch:
            raise ValueError(f"the validation batches have no slice names: no {self.slice_key!r} key (they have "
                             f"{sorted(map(str, batch))}), no slice_fn and no dataloader_names; set slice_key to "
                             "the key that names each sample's slice, or configure one of the others. "
                             "(Checked before training.)")

    # ------------------------------------------------------------------ training coverage
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._train is None:
            return
        tokens = valid_positions(batch, shift_labels=pl_module.shift_labels, ignore_index=pl_module.ignore_index)
        names = self._names(batch, None, tokens.shape[0])
        if names is None:
            return
        # With dataloader_names the eval slices are the loaders; training batches may name other
        # slices: the datamodule's are counted too, names known nowhere are skipped (one warning).
        skip = self.dataloader_names is not None
        if skip and not self._warned_other:
            other = sorted({str(n) for n in names} - set(self._train.slices))
            if other:
                self._warned_other = True
                rank_zero_warn(f"CoverageSlices: training batches name slice(s) {other} that no eval dataloader "
                               f"has (dataloader_names={self.dataloader_names}); their training coverage is "
                               "not counted.", category=UserWarning)
        self._train.update(names, {"samples": torch.ones_like(tokens), "tokens": tokens},
                           where="a training batch", skip_unknown=skip)

    # ------------------------------------------------------------------ evaluation
    def _start(self) -> None:
        if self._eval is not None:
            self._eval.reset()
        if self._embeddings is not None:
            self._embeddings.reset()

    def _batch(self, pl_module: L.LightningModule, outputs: Any, batch: Any, dataloader_idx: int) -> None:
        assert self._eval is not None
        # The eval step's per-sample sums (DistillationModule.sample_sums); a module whose step
        # returns none (e.g. a subclass's own validation_step) is scored by a forward of its own.
        out = outputs if isinstance(outputs, Mapping) and "tokens" in outputs else pl_module.evaluate_batch(batch)
        n = out["tokens"].shape[0]
        names = self._names(batch, dataloader_idx, n)
        if names is None:
            raise ValueError(f"an evaluation batch has no slice names: no {self.slice_key!r} key, no "
                             "slice_fn and no dataloader_names; configure one of them.")
        self._eval.update(names, {"samples": torch.ones_like(out["tokens"]), **out})
        if self._embeddings is not None:
            if "student_embeddings" not in out:
                raise ValueError("CoverageSlices(metric='similarity') needs embeddings from the eval step: give the "
                                 "DistillationModule embedding terms (RKDDistance, EmbeddingKD, ...) and an output "
                                 "function that pools (student_logits_fn=Pooling()), or use metric='perplexity'.")
            index = self._eval.slice_index(names, out["student_embeddings"].device)
            self._embeddings.update(index, out["student_embeddings"], out.get("teacher_embeddings"))

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start()

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start()

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                                batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if not trainer.sanity_checking:
            self._batch(pl_module, outputs, batch, dataloader_idx)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batch(pl_module, outputs, batch, dataloader_idx)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._finish(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer, pl_module, "test")

    def compute_rows(self) -> list[dict[str, Any]]:
        """Per-slice rows of the current evaluation (a collective under DDP)."""
        assert self._eval is not None and self.slices is not None
        sums = self._eval.sums()
        has_teacher = bool(sums["teacher_nll"].abs().sum() > 0 or sums["teacher_correct"].sum() > 0)
        per_slice = {name: {f: float(sums[f][i]) for f in COVERAGE_FIELDS} for i, name in enumerate(self.slices)}
        if not has_teacher:
            for entry in per_slice.values():
                for f in ("teacher_nll", "agreement", "kl", "teacher_correct"):
                    entry[f] = None
        if self._embeddings is not None:
            for name, values in self._embeddings.compute().items():
                per_slice[name].update(values)
        self.last_sums = per_slice
        return coverage_rows(per_slice, self.train_coverage(), metric=self.metric,
                             min_retention=self.min_retention,
                             min_relative_retention=self.min_relative_retention,
                             max_gap_to_best=self.max_gap_to_best)

    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        rows = self.compute_rows()
        self.last_rows, self.last_stage, self.last_step = rows, stage, trainer.global_step
        prefix = "coverage" if stage == "val" else "test_coverage"
        gaps = [r for r in rows if r["gap"]]
        for r in rows:
            if r["tokens"] <= 0:
                continue
            values = {"gap": float(r["gap"]), "train_tokens": r["train_tokens"]}
            for key in ("retention", "student_metric", "teacher_metric", "agreement", "kl"):
                if r[key] is not None:
                    values[key] = r[key]
            for key, value in values.items():
                pl_module.log(f"{prefix}/{r['slice']}/{key}", float(value), on_step=False, on_epoch=True,
                              rank_zero_only=True)
        pl_module.log(f"{prefix}/gaps", float(len(gaps)), on_step=False, on_epoch=True, rank_zero_only=True)
        metric = effective_metric(self.metric, self.last_sums)  # bits per byte across tokenizers
        record = {"stage": stage, "step": trainer.global_step, "metric": metric,
                  "thresholds": {"min_retention": self.min_retention,
                                 "min_relative_retention": self.min_relative_retention,
                                 "max_gap_to_best": self.max_gap_to_best},
                  "slices": rows, "gaps": [r["slice"] for r in gaps]}
        self.history.append({"stage": stage, "step": trainer.global_step,
                             "retention": {r["slice"]: r["retention"] for r in rows}})
        if trainer.is_global_zero:
            directory = self.dirpath or Path(trainer.default_root_dir)
            self.write_reports(directory, record)
            self._log_wandb(trainer, rows, stage)
        if stage != "val":
            self._warn_gaps(stage, trainer.global_step)

    def _warn_gaps(self, stage: str, step: int) -> None:
        # Validations inside a fit are progress reports (every slice starts far from the teacher):
        # they log the gap flag and rewrite the reports; the warning comes at the end of the fit
        # (from the last validation) and after test.
        for r in self.last_rows:
            if r["gap"]:
                rank_zero_warn(f"coverage gap on slice {r['slice']!r} ({stage}, step {step}): "
                               f"{describe_row(r, effective_metric(self.metric, self.last_sums))}; {r['gap_reason']}. The distillation data "
                               f"covered {int(r['train_tokens'])} training tokens of it.")

    def write_reports(self, directory: str | os.PathLike[str], record: Mapping[str, Any]) -> None:
        """Write ``coverage.json``, ``coverage.md`` and ``coverage.png`` into ``directory``."""
        write_coverage_reports(directory, record, self.history)

    def _log_wandb(self, trainer: L.Trainer, rows: list[dict[str, Any]], stage: str) -> None:
        try:
            from lightning.pytorch.loggers import WandbLogger
        except ImportError:  # pragma: no cover
            return
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers:
            return
        import wandb

        columns = list(TABLE_KEYS)
        data = [[r[k] for k in columns] for r in rows]
        for logger in loggers:
            table = wandb.Table(columns=columns, data=data)
            logger.experiment.log({
                f"coverage/{stage}_table": table,
                f"coverage/{stage}_retention": wandb.plot.bar(table, "slice", "retention",
                                                              title=f"retention per slice ({stage})"),
                "trainer/global_step": trainer.global_step,
            })

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.last_stage == "val":
            self._warn_gaps("end of fit, last validation", self.last_step)
        self._raise_if_gaps("fit")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._raise_if_gaps("test")

    def _raise_if_gaps(self, stage: str) -> None:
        gaps = [r for r in self.last_rows if r["gap"]]
        if self.on_gap == "error" and gaps:
            details = "; ".join(f"{r['slice']}: {describe_row(r, effective_metric(self.metric, self.last_sums))}, {r['gap_reason']}" for r in gaps)
            raise CoverageGapError(f"coverage gap(s) after {stage} on slice(s) "
                                   f"{[r['slice'] for r in gaps]} — {details}. Reports are written; add "
                                   "training data for these slices or lower the thresholds.")
