"""``DistillationModule``: a LightningModule that trains a student to imitate a frozen teacher.

The one path a batch takes::

    batch -> teacher targets -> student forward -> loss terms -> total loss -> logs
             (live frozen teacher, or targets already in the batch, e.g. from a cache)

This file holds the path and the Lightning hooks; the concerns it calls live apart:
:mod:`~lightning_distill.teacher` (the live teacher's NaN/inf check, vocabulary alignment),
:mod:`~lightning_distill.scoring` (per-sample sums, agreement and KL),
:mod:`~lightning_distill.step_mean` (the step-wide token mean), :mod:`~lightning_distill.optim`,
:func:`~lightning_distill.losses.terms.check_terms` and :mod:`~lightning_distill.checkpoint`
(checkpoint keys, recorded loss terms).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities.types import OptimizerLRScheduler
from torch import Tensor, nn
from torchmetrics import MeanMetric

from lightning_distill import __version__
from lightning_distill.alignment import align_labels, split_batch, teacher_inputs
from lightning_distill.checkpoint import (
    CheckedCheckpointIO,
    checkpoint_errors,
    losses_differ_message,
    rebuild_terms,
    rename_keys,
    restore_rng_states,
    rng_states,
    wrapper_prefixes,
)
from lightning_distill.engines import reshard
from lightning_distill.losses import functional as LF
from lightning_distill.losses.cross_tokenizer import attach_tokenizers, cross_tokenizer_batch
from lightning_distill.losses.terms import LogitKD, LossTerm, TaskLoss, check_terms, fused_pair
from lightning_distill.models.adapters import (
    call_model,
    check_data_positions,
    check_positions,
    is_causal_lm,
    logits_from_output,
    unwrap_model,
)
from lightning_distill.models.features import FeatureRequest, capture
from lightning_distill.models.hf import freeze
from lightning_distill.models.identity import describe_model
from lightning_distill.optim import default_optimizer, optimizers_config
from lightning_distill.scoring import agreement_and_kl, embedding_sums
from lightning_distill.scoring import sample_sums as _sample_sums
from lightning_distill.step_mean import StepMean
from lightning_distill.teacher import (
    TeacherLogitsCheck,
    check_cached_vocab,
    check_model_vocabs,
    match_sparse_vocab,
    match_vocab,
)
from lightning_distill.types import LossInputs, TeacherTargets
from lightning_distill.validation import check_choice, check_int

__all__ = ["DistillationModule"]

Stage = Literal["train", "val", "test"]
_VOCAB_POLICIES = ("error", "slice")


class DistillationModule(L.LightningModule):
    """Distil a frozen ``teacher`` into a ``student`` with named, weighted loss terms.

    Batches are either mappings (Hugging Face style: ``input_ids``, ``attention_mask``,
    ``labels``; extra keys such as ``slice`` stay in the batch and are not passed to the
    models) or ``(inputs, target)`` tuples for plain modules.

    The teacher is frozen: ``requires_grad`` off, eval mode for the whole fit (``.train()``
    on this module leaves it in eval), forward under ``no_grad``, never in the optimizer,
    moved with the module, and left out of checkpoints (its identity is written instead). A
    teacher handed over in train mode or with trainable parameters is frozen here with one
    warning (pass ``lightning_distill.models.freeze(teacher)`` to say it is meant).

    For Hugging Face causal LMs the labels are shifted once, the way transformers does it
    (logits at ``t`` score token ``t + 1``), and the same alignment feeds every term.
    Encoder-decoders (T5, BART) take ordinary ``{input_ids, attention_mask, labels}`` batches:
    both models get ``decoder_input_ids`` from the labels by their own shift, and the labels are
    not shifted. Wrapped models (``torch.compile``, DDP, peft) are treated as the model inside.
    Positions whose label is ``ignore_index`` count nowhere.

    Every term returns a sum over valid positions; the total is divided by the number of valid
    positions in the *whole optimizer step* (all accumulated micro-batches, all ranks), so
    gradient accumulation and DDP give the same gradients as one big batch. The gradients take
    that final scale in this module's ``on_before_optimizer_step`` (before clipping); Lightning
    calls callbacks' ``on_after_backward``/``on_before_optimizer_step`` first, so a callback that
    reads gradient norms sees them before the rescale. A subclass that logs gradient norms in
    ``on_before_optimizer_step`` should call ``super().on_before_optimizer_step(optimizer)`` first.

    Args:
        student: the model being trained (any ``nn.Module`` or Hugging Face model).
        teacher: the model to imitate, or ``None`` when targets come with the batch
            (``batch["teacher_targets"]``, e.g. from a
            :class:`~lightning_distill.callbacks.TeacherCache`) or no term needs them.
        losses: ``{name: LossTerm}``. Default: ``{"kd": LogitKD(weight=0.5), "task":
            TaskLoss(weight=0.5)}`` with a teacher or a ``TeacherCache`` callback (decided when
            the Trainer sets up), ``{"task": TaskLoss()}`` without.
        optimizer: ``params -> Optimizer``, e.g. ``functools.partial(torch.optim.AdamW, lr=3e-4)``
            (that is the default).
        lr_scheduler: ``optimizer -> LRScheduler`` or ``None``. A ``num_training_steps``
            argument left unset is filled with the trainer's estimated stepping batches.
        lr_scheduler_interval: ``"step"`` or ``"epoch"``.
        student_logits_fn: ``student_output -> logits`` for outputs the adapters can't read; a
            callable with ``reads_inputs = True`` is called ``fn(output, inputs)``. With embedding
            terms (``reads_embeddings``: RKD, similarity-preserving, ``EmbeddingKD``) it gives one
            ``(B, D)`` embedding per sample, e.g. :class:`~lightning_distill.models.pooling.Pooling`
            (docs/relation.md).
        teacher_logits_fn: the same for the teacher.
        shift_labels: shift labels for next-token prediction; default: on for Hugging Face
            causal LMs, off otherwise.
        ignore_index: label value that masks a position.
        vocab_mismatch: ``"error"`` (default) or ``"slice"``: compare over the shared first
            ``min(V_student, V_teacher)`` entries when one vocabulary extends the other.
        metrics_every_n_steps: how often training logs each term and computes student-vs-teacher
            agreement and KL (one extra pass over the logits); default: on the batches where the
            trainer writes logs (``log_every_n_steps``). ``train/loss`` is logged every step.
        save_teacher_weights: also write the teacher's weights into checkpoints.

    Raises:
        TypeError: a student/teacher that is not an ``nn.Module``, or a term that is not a
            ``LossTerm``.
        ValueError: bad term names, all weights zero, a teacher-needing term without a
            teacher source, an unknown ``vocab_mismatch``; and, before the first optimizer
            step, vocabularies that differ, sequences longer than a model's
            ``max_position_embeddings`` (the data's ``seq_len`` at setup, the first batch before
            the forward) and a first batch without labels that a term reads. During a run: a live
            teacher's NaN/+inf logits (or a
            row of only -inf; any -inf for ``reverse_kl``/``logit_mse``), naming the global step
            and the batch's ``sample_id`` values (on CUDA one step later, to avoid a host sync).

    Example:
        >>> module = DistillationModule(student, teacher,  # doctest: +SKIP
        ...     losses={"kd": LogitKD("forward_kl", temperature=2.0, weight=0.5),
        ...             "task": TaskLoss(weight=0.5)},
        ...     optimizer=functools.partial(torch.optim.AdamW, lr=3e-4))
        >>> lightning.Trainer(max_steps=100).fit(module, datamodule)  # doctest: +SKIP
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        losses: Mapping[str, LossTerm] | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        lr_scheduler: Callable[..., Any] | None = None,
        *,
        lr_scheduler_interval: Literal["step", "epoch"] = "step",
        student_logits_fn: Callable[[Any], Tensor] | None = None,
        teacher_logits_fn: Callable[[Any], Tensor] | None = None,
        shift_labels: bool | None = None,
        ignore_index: int = -100,
        vocab_mismatch: Literal["error", "slice"] = "error",
        metrics_every_n_steps: int | None = None,
        save_teacher_weights: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(student, nn.Module):
            raise TypeError(f"student must be a torch.nn.Module, got {type(student).__name__}.")
        if teacher is not None and not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be a torch.nn.Module or None, got {type(teacher).__name__}.")
        if teacher is not None and unwrap_model(teacher) is unwrap_model(student):
            raise ValueError("teacher and student are the same object; pass a separate (copied) teacher.")
        check_choice("vocab_mismatch", vocab_mismatch, _VOCAB_POLICIES)
        check_choice("lr_scheduler_interval", lr_scheduler_interval, ("step", "epoch"))
        check_int("metrics_every_n_steps", metrics_every_n_steps, low=1, allow_none=True)
        check_int("ignore_index", ignore_index)

        self.save_hyperparameters(
            "lr_scheduler_interval", "shift_labels", "ignore_index", "vocab_mismatch",
            "metrics_every_n_steps", "save_teacher_weights",
        )
        self.student = student
        if teacher is not None:
            _warn_if_trainable(teacher)
        self.teacher = freeze(teacher) if teacher is not None else None
        self._losses_given = losses is not None  # else: recorded terms on load, KD + task with a TeacherCache
        self._resumed_rng: dict[str, Any] | None = None  # set before the first step after a resume
        self._rng_after_step: dict[str, Any] | None = None  # the generators after the last training step
        self._rng_at_batch_start: dict[str, Any] | None = None  # ... when this training step started
        self._rng_for_checkpoint: dict[str, Any] | None = None  # set by SaveOnInterrupt for a step cut short
        self._in_fit_eval = False
        if losses is None:
            losses = ({"kd": LogitKD(weight=0.5), "task": TaskLoss(weight=0.5)} if teacher is not None
                      else {"task": TaskLoss()})
        self.losses = nn.ModuleDict(check_terms(losses))
        for term in self.losses.values():  # layer maps, widths (projectors), module paths
            term.bind(self.student, self.teacher)
        self.optimizer_factory = optimizer or default_optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.student_logits_fn = student_logits_fn
        self.teacher_logits_fn = teacher_logits_fn
        self.shift_labels = is_causal_lm(student) if shift_labels is None else bool(shift_labels)
        self.ignore_index = int(ignore_index)
        self.vocab_mismatch = vocab_mismatch
        self.metrics_every_n_steps = metrics_every_n_steps
        self.save_teacher_weights = bool(save_teacher_weights)
        #: Validation/test steps return per-sample sums (:meth:`sample_sums`); CoverageSlices turns it on.
        self.eval_sample_sums = False

        # Eval metrics per stage and dataloader (``val``, ``val_1``, ...), made on first use.
        self.metrics = nn.ModuleDict()
        # Step-wide normalisation (training_step, on_before_optimizer_step).
        self._step_mean = StepMean()
        self._checked_batch = False
        self._teacher_identity: dict[str, Any] | None = None
        # A live teacher's non-finite check (on CUDA: inspected a step later).
        self._teacher_check = TeacherLogitsCheck()

    # ------------------------------------------------------------------ set-up and identity
    def use_cached_targets(self) -> None:
        """Called by a :class:`~lightning_distill.callbacks.TeacherCache` at setup: its targets are meant
        to be used. Without a teacher the default losses were the task loss alone; they become KD +
        task. Explicit losses that no teacher target feeds get a warning (the cache would be read
        for nothing)."""
        if self.embedding_output:
            raise ValueError(f"a TeacherCache stores per-position teacher logits, but the loss terms "
                             f"{[n for n, t in self.losses.items() if t.reads_embeddings]} read embeddings; run "
                             "them with the live teacher (drop the TeacherCache callback).")
        if not self._losses_given and self.teacher is None and "kd" not in self.losses:
            self.losses = nn.ModuleDict({"kd": LogitKD(weight=0.5), "task": TaskLoss(weight=0.5)})
            self.metrics = nn.ModuleDict()  # remade for the new terms on first use
        elif not any(term.requires_teacher for term in self.losses.values()):
            warnings.warn(f"a TeacherCache supplies teacher targets but no loss term uses them "
                          f"({', '.join(self.losses)}); add a teacher term such as LogitKD, or drop the cache.",
                          stacklevel=2)

    @property
    def teacher_identity(self) -> dict[str, Any] | None:
        """Plain values that identify the teacher (class, name/revision, weight fingerprint)."""
        if self._teacher_identity is None and self.teacher is not None:
            self._teacher_identity = describe_model(self.teacher)
        return self._teacher_identity

    def train(self, mode: bool = True) -> DistillationModule:
        """Switch the student (and terms) to ``mode``; the teacher always stays in eval mode."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The student's forward."""
        return self.student(*args, **kwargs)

    # ------------------------------------------------------------------ the data path
    def _aligned_labels(self, labels: Tensor | None, inputs: Any, logits: Tensor) -> Tensor | None:
        return align_labels(labels, inputs, logits, shift_labels=self.shift_labels, ignore_index=self.ignore_index)

    def _teacher_needed(self, stage: Stage, active: Mapping[str, LossTerm]) -> bool:
        return stage != "train" or self._metrics_step() or any(t.requires_teacher for t in active.values())

    def teacher_targets(self, batch: Any, inputs: Any) -> TeacherTargets | None:
        """The teacher's targets for ``batch``: from the batch itself, else the live teacher."""
        if isinstance(batch, Mapping) and batch.get("teacher_targets") is not None:
            targets = batch["teacher_targets"]
            if self.embedding_output and not isinstance(targets, TeacherTargets):
                return TeacherTargets(embeddings=targets)
            return targets if isinstance(targets, TeacherTargets) else TeacherTargets(logits=targets)
        if self.teacher is None:
            return None
        inputs = teacher_inputs(batch, inputs)  # two tokenizers: the same text in the teacher's own tokens
        request = FeatureRequest.of([t for t in self.losses.values() if t.weight > 0], "teacher")
        with torch.no_grad(), capture(self.teacher, request.paths) as hooked:
            output = call_model(self.teacher, inputs, **request.flags(self.teacher))
            logits = logits_from_output(output, self.teacher_logits_fn, who="teacher", inputs=inputs)
            self._teacher_check.check(logits, batch, inputs, strict=any(t.no_neg_inf for t in self.losses.values()),
                                      step=self.trainer.global_step if self._trainer is not None else None)
        reshard(self.teacher)  # FSDP2: the teacher's gathered root parameters are freed (no backward follows)
        if self.embedding_output:
            return TeacherTargets(embeddings=logits)
        if not request:
            return TeacherTargets(logits=logits)
        features = request.collect(output, hooked)
        return TeacherTargets(logits=logits, hidden_states=features.hidden_states, attentions=features.attentions,
                              modules=features.modules)

    @property
    def embedding_output(self) -> bool:
        """The terms read one ``(B, D)`` embedding per sample (``reads_embeddings``): the output functions
        give embeddings, not logits; no labels are read and the step mean counts samples."""
        return any(t.reads_embeddings for t in self.losses.values())

    def _check_first_batch(self, inputs: LossInputs) -> None:
        """One-off checks on the first batch, before any optimizer step (one host sync)."""
        if self._checked_batch:
            return
        self._checked_batch = True
        vocab = inputs.student_logits.shape[-1]
        if inputs.labels is not None and any(t.reads_labels for t in self.losses.values()):
            valid = inputs.labels[inputs.labels != self.ignore_index]
            if valid.numel():
                low, high = int(valid.min()), int(valid.max())
                if low < 0 or high >= vocab:
                    raise ValueError(
                        f"label id {high if high >= vocab else low} is outside the student's {vocab} "
                        "output classes; the tokenizer and the student's vocab_size must match (or mark "
                        f"the position with {self.ignore_index})."
                    )
        if not torch.isfinite(inputs.student_logits.detach()).all():
            raise ValueError("the student's logits contain NaN or inf on the first batch; check the "
                             "model's initialisation and inputs.")

    def _metrics_step(self) -> bool:
        """Whether this training batch logs per-term values and computes agreement and KL.

        By default: exactly the batches on which the trainer writes logs (``log_every_n_steps``),
        so the extra pass and the logging calls cost nothing on the other steps.
        """
        if self._trainer is None:
            return False
        if self.metrics_every_n_steps is not None:
            return self.trainer.global_step % self.metrics_every_n_steps == 0
        connector = getattr(self.trainer, "_logger_connector", None)
        return bool(getattr(connector, "should_update_logs", True))

    def _shared_step(self, batch: Any, stage: Stage) -> dict[str, Any]:
        inputs, labels = split_batch(batch)
        if not self._checked_batch and isinstance(inputs, Mapping) and isinstance(inputs.get("input_ids"), Tensor):
            t_ids = batch.get("teacher_input_ids") if isinstance(batch, Mapping) else None  # two tokenizers
            same = {"student": self.student, **({"teacher": self.teacher} if t_ids is None else {})}
            check_positions(same, inputs["input_ids"].shape[-1],
                            f"the first {stage} batch's input_ids (length {inputs['input_ids'].shape[-1]})")
            if t_ids is not None:
                check_positions({"teacher": self.teacher}, t_ids.shape[-1],
                                f"the first {stage} batch's teacher_input_ids (length {t_ids.shape[-1]})",
                                setting="data.teacher_seq_len")
        active = {n: t for n, t in self.losses.items() if t.weight > 0}
        request = FeatureRequest.of(active.values(), "student")  # hidden states, attentions, hooks
        with capture(self.student, request.paths) as hooked:
            student_output = call_model(self.student, inputs, **request.flags(self.student))
        student_features = request.collect(student_output, hooked) if request else None
        student_logits = logits_from_output(student_output, self.student_logits_fn, who="student", inputs=inputs)
        # Embedding terms: one output per sample, no labels; the step mean counts samples.
        embedding = self.embedding_output
        labels = None if embedding else self._aligned_labels(labels, inputs, student_logits)
        if labels is None and not embedding and any(t.reads_labels for t in active.values()):
            raise ValueError(
                f"the {stage} batch has no labels, but the loss terms {[n for n, t in active.items() if t.reads_labels]} "
                "read them; put 'labels' in each batch (or yield (inputs, target) pairs), or drop those terms "
                "(e.g. loss=kd_only)."
            )

        teacher = self.teacher_targets(batch, inputs) if self._teacher_needed(stage, active) else None
        targets = teacher  # as they came, for the per-sample evaluation sums
        kd_logits = student_logits
        cross = cross_tokenizer_batch(batch, active)  # teacher logits in the teacher's own positions
        if teacher is not None and teacher.logits is not None and not cross:
            kd_logits, teacher_logits = match_vocab(student_logits, teacher.logits, self.vocab_mismatch)
            if teacher_logits.dtype.itemsize < student_logits.dtype.itemsize and teacher_logits.is_floating_point():
                teacher_logits = teacher_logits.to(student_logits.dtype)  # a bf16 teacher, an fp32 student
            teacher = dataclasses.replace(teacher, logits=teacher_logits)
        elif teacher is not None and teacher.sparse is not None:
            kd_logits = match_sparse_vocab(student_logits, teacher.sparse, self.vocab_mismatch)
        # Terms that compare with the teacher see the shared vocabulary; the others (task loss) the
        # student's full output.
        full_inputs = LossInputs(student_logits=student_logits, labels=labels, teacher=teacher,
                                 ignore_index=self.ignore_index, student_output=student_output, batch=batch,
                                 student_features=student_features,
                                 student_embeddings=student_logits if embedding else None)
        loss_inputs = (full_inputs if kd_logits is student_logits
                       else dataclasses.replace(full_inputs, student_logits=kd_logits))
        self._check_first_batch(full_inputs)  # the first batch of any stage (sanity checks run val first)

        sums: dict[str, Tensor] = {}
        fused = fused_pair(active, loss_inputs, same_vocab=kd_logits is student_logits and not cross)
        if fused is not None:
            # Forward KL at T=1 and the task loss share one softmax of the student and one
            # gradient buffer (same values and gradients as the two terms apart).
            kd_name, task_name = fused
            target = teacher.logits if teacher.logits is not None else teacher.sparse
            sums[kd_name], sums[task_name], _ = LF.fused_forward_kl_and_ce(
                student_logits, target, labels, ignore_index=self.ignore_index,
                chunk_size=getattr(active[kd_name], "chunk_size", None))
        for name, term in active.items():
            if name in sums:
                continue
            if term.requires_teacher and teacher is None:
                raise ValueError(
                    f"loss term {name!r} ({type(term).__name__}) needs teacher targets but there is no "
                    "teacher; pass teacher=... or put 'teacher_targets' in the batch (teacher cache)."
                )
            sums[name] = term(loss_inputs if term.requires_teacher else full_inputs)
        sums = {name: sums[name] for name in active}
        if labels is None:
            count = torch.tensor(student_logits[..., 0].numel(), device=student_logits.device)
        else:
            count = (labels != self.ignore_index).sum()
        weighted = sum(self.losses[n].weight * s for n, s in sums.items())
        # The fused KD term is forward KL at T=1: the same number the agreement/KL metrics report.
        kl = sums[fused[0]].detach() if fused is not None else None
        return {"sums": sums, "weighted": weighted, "count": count, "loss_inputs": loss_inputs,
                "batch_size": _batch_size(labels, student_logits), "kl": kl,
                "student_logits": student_logits, "labels": labels, "targets": targets}

    def check_cached_vocab(self, vs: int, vt: int, *, sparse: bool) -> None:
        """Raise when cached targets over ``vt`` ids cannot meet a student over ``vs`` ids (under this
        module's ``vocab_mismatch``; see :func:`lightning_distill.teacher.check_cached_vocab`).
        The teacher cache calls this at fit start, the module on every cached batch."""
        check_cached_vocab(vs, vt, sparse=sparse, policy=self.vocab_mismatch)

    @torch.no_grad()
    def evaluate_batch(self, batch: Any) -> dict[str, Tensor]:
        """Per-sample evaluation numbers for one batch (one forward; see :meth:`sample_sums`).

        Raises:
            ValueError: the batch has no labels (nor ``input_ids`` for a causal LM).
        """
        inputs, labels = split_batch(batch)
        student_logits = logits_from_output(call_model(self.student, inputs), self.student_logits_fn,
                                            who="student", inputs=inputs)
        if self.embedding_output:
            return self.sample_sums(student_logits, None, self.teacher_targets(batch, inputs))
        labels = self._aligned_labels(labels, inputs, student_logits)
        if labels is None:
            raise ValueError("evaluate_batch needs labels (or input_ids for a causal LM) to score the student.")
        return self.sample_sums(student_logits, labels, self.teacher_targets(batch, inputs), batch)

    @torch.no_grad()
    def sample_sums(self, student_logits: Tensor, labels: Tensor | None,
                    teacher: TeacherTargets | None, batch: Any = None) -> dict[str, Tensor]:
        """Per-sample evaluation sums from one forward's logits, with the same alignment as training.

        The validation/test step returns these when :attr:`eval_sample_sums` is on (as
        :class:`~lightning_distill.callbacks.CoverageSlices` sets it), and :meth:`evaluate_batch`
        when called on its own, so a batch is scored by one forward either way.

        Args:
            student_logits: the student's logits, ``(..., V)``.
            labels: labels aligned to the logits (:func:`~lightning_distill.alignment.align_labels`).
            teacher: the teacher's targets for the batch as they came (before any vocabulary
                slicing), or ``None``.
            batch: the batch; a cross-tokenizer batch adds ``bytes`` and scores the teacher on
                its own tokens (:func:`lightning_distill.scoring.sample_sums`).

        Returns:
            A dict of 1-D tensors over the batch's samples: ``tokens`` (valid positions),
            ``student_nll`` and ``teacher_nll`` (summed cross-entropy against the labels, in nats),
            ``agreement`` (positions whose top-1 tokens match) and ``kl`` (summed forward KL at
            temperature 1), ``correct`` and ``teacher_correct`` (valid positions whose argmax is the
            label: accuracy = correct / tokens). Teacher entries are absent when there is no teacher.
            Slice-wise reports (perplexity = exp(nll / tokens)) are sums of these.

            With embedding terms (:attr:`embedding_output`): ``tokens`` (1 per sample),
            ``student_embeddings`` and ``teacher_embeddings`` (``(B, D)``, for
            ``CoverageSlices(metric="similarity")``).

        Raises:
            ValueError: no labels; labels a smaller teacher vocabulary cannot score.
        """
        if self.embedding_output:
            return embedding_sums(student_logits, teacher)
        return _sample_sums(student_logits, labels, teacher, ignore_index=self.ignore_index,
                            vocab_mismatch=self.vocab_mismatch, batch=batch)

    # ------------------------------------------------------------------ Lightning hooks
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        out = self._shared_step(batch, "train")
        count, weighted, bs = out["count"], out["weighted"], out["batch_size"]
        denom = count.clamp_min(1)
        self.log("train/loss", weighted.detach() / denom, on_step=True, on_epoch=False, prog_bar=True,
                 batch_size=bs)
        if self._metrics_step():
            for name, value in out["sums"].items():
                self.log(f"train/{name}", value.detach() / denom, on_step=True, on_epoch=False, batch_size=bs)
            extra = agreement_and_kl(out["loss_inputs"], kl=out["kl"])
            if extra is not None:
                self.log("train/agreement", extra[0] / denom, on_step=True, on_epoch=False, batch_size=bs)
                self.log("train/kl", extra[1] / denom, on_step=True, on_epoch=False, batch_size=bs)
        if self._trainer is None or self.automatic_optimization is False:
            return weighted / denom
        # Sum-normalised backward; on_before_optimizer_step divides by the step's token count.
        return self._step_mean.loss(weighted, count, self.trainer)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Turn the accumulated gradient of sums into the gradient of the step-wide mean
        (:meth:`lightning_distill.step_mean.StepMean.rescale_gradients`)."""
        self._step_mean.rescale_gradients(optimizer, self.trainer)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor] | None:
        return self._eval_step(batch, "val", dataloader_idx)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor] | None:
        return self._eval_step(batch, "test", dataloader_idx)

    def _eval_metrics(self, stage: Stage, dataloader_idx: int) -> tuple[str, nn.ModuleDict]:
        """The metrics of one eval dataloader (``val``, ``val_1``, ...), made on first use."""
        key = stage if dataloader_idx == 0 else f"{stage}_{dataloader_idx}"
        if key not in self.metrics:
            names = [*self.losses, "loss", "agreement", "kl"]
            self.metrics[key] = nn.ModuleDict({n: MeanMetric() for n in names}).to(self.device)
        return key, self.metrics[key]

    def _eval_step(self, batch: Any, stage: Stage, dataloader_idx: int = 0) -> dict[str, Tensor] | None:
        """Log the eval metrics; return :meth:`sample_sums` of the same forward when
        :attr:`eval_sample_sums` is on (not in the sanity check), else ``None``."""
        out = self._shared_step(batch, stage)
        # One metric object per (stage, dataloader, term): Lightning adds /dataloader_idx_k to the key.
        key, metrics = self._eval_metrics(stage, dataloader_idx)

        def log(name: str, **kwargs: Any) -> None:
            self.log(f"{stage}/{name}", metrics[name], on_step=False, on_epoch=True,
                     metric_attribute=f"metrics.{key}.{name}", **kwargs)

        wanted = self.eval_sample_sums and not (self._trainer is not None and self.trainer.sanity_checking)
        per_sample = self.sample_sums(out["student_logits"], out["labels"], out["targets"], batch) if wanted else None
        count = out["count"]
        weight = count.float().clamp_min(1e-12)
        for name, value in out["sums"].items():
            metrics[name].update(value / weight, weight)
            log(name)
        metrics["loss"].update(out["weighted"] / weight, weight)
        log("loss", prog_bar=stage == "val")
        if (per_sample is not None and out["targets"] is not None and out["targets"].logits is not None
                and "agreement" in per_sample):
            # Dense targets: the per-sample agreement and KL are the same functions on the same
            # (vocabulary-matched) logits; their totals serve the batch metrics (no second pass).
            extra = (per_sample["agreement"].sum(), out["kl"] if out["kl"] is not None else per_sample["kl"].sum())
        else:
            extra = agreement_and_kl(out["loss_inputs"], kl=out["kl"])
        if extra is not None:
            metrics["agreement"].update(extra[0] / weight, weight)
            metrics["kl"].update(extra[1] / weight, weight)
            log("agreement")
            log("kl")
        return per_sample

    def configure_optimizers(self) -> OptimizerLRScheduler:
        params = [p for p in self.student.parameters() if p.requires_grad]
        params += [p for p in self.losses.parameters() if p.requires_grad]
        return optimizers_config(params, self.optimizer_factory, self.lr_scheduler_factory,
                                 interval=self.hparams.lr_scheduler_interval,
                                 training_steps=lambda: self.trainer.estimated_stepping_batches)

    def configure_model(self) -> None:
        """Under Lightning's ``ModelParallelStrategy`` (FSDP2): shard the student and the frozen teacher
        (:func:`lightning_distill.engines.shard_fsdp2`); other strategies wrap the models themselves."""
        from lightning.pytorch.strategies import ModelParallelStrategy

        if self._trainer is None or not isinstance(self.trainer.strategy, ModelParallelStrategy):
            return
        from torch.distributed.fsdp import FSDPModule

        from lightning_distill.engines import shard_fsdp2

        if not isinstance(self.student, FSDPModule):  # called again by a later fit/test: already sharded
            _ = self.teacher_identity  # fingerprinted while whole (checkpoints, caches name the teacher)
            shard_fsdp2({"student": self.student, "teacher": self.teacher}, self.device_mesh)

    def on_fit_start(self) -> None:
        """Check, before any step, what can be checked without a batch."""
        # eval metrics made by an earlier `validate`/`test` hold inference tensors, which fit's
        # validation (grad off, not inference mode) cannot update in place: made again on first use
        self.metrics = nn.ModuleDict()
        if self.teacher is not None:
            self.teacher.eval()
        if (self.teacher is not None and not self.embedding_output
                and not any(getattr(t, "cross_tokenizer", False) for t in self.losses.values())):
            check_model_vocabs(self.student, self.teacher, self.vocab_mismatch)  # cross-tokenizer: differ
        if self._uses_deepspeed():
            warnings.warn("DeepSpeed manages gradients itself; the loss is normalised per micro-batch "
                          "instead of per optimizer step.", stacklevel=2)
        self._step_mean.count = None

    def on_train_epoch_end(self) -> None:
        self._teacher_check.flush()

    def on_validation_epoch_end(self) -> None:
        self._teacher_check.flush()

    def on_test_epoch_end(self) -> None:
        self._teacher_check.flush()

    def _uses_deepspeed(self) -> bool:
        return self._trainer is not None and "DeepSpeed" in type(self.trainer.strategy).__name__

    # ------------------------------------------------------------------ checkpoints
    def _wrapper_prefixes(self) -> dict[str, str]:
        return wrapper_prefixes({name: getattr(self, name, None) for name in ("student", "teacher")})

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> DistillationModule:  # type: ignore[override]
        """Lightning's ``load_from_checkpoint`` (pass ``student=``, and ``teacher=`` to keep one).

        Without ``losses=``, the loss terms recorded in the checkpoint are rebuilt (temperature,
        weights, divergence); with ``losses=`` that differ from the recorded ones, a warning says how.

        Raises:
            CheckpointError: a damaged/truncated file, or one this library did not write.
        """
        with checkpoint_errors(checkpoint_path):
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def setup(self, stage: str) -> None:
        """Read checkpoints (``fit(ckpt_path=...)``) through :class:`CheckedCheckpointIO`."""
        strategy = self.trainer.strategy
        io = getattr(strategy, "_checkpoint_io", None)
        if hasattr(strategy, "checkpoint_io") and not isinstance(io, CheckedCheckpointIO):
            strategy.checkpoint_io = CheckedCheckpointIO(strategy.checkpoint_io)
        attach_tokenizers(self.losses.values(), getattr(self.trainer, "datamodule", None))
        # Before a teacher cache runs the teacher; two tokenizers: the teacher's own teacher_seq_len.
        check_data_positions(self.student, self.teacher, getattr(self.trainer, "datamodule", None))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict", {})
        if not self.save_teacher_weights:
            for key in [k for k in state if k.startswith("teacher.")]:
                del state[key]
        # Keys name the unwrapped models, so a compiled run's checkpoint loads into a plain
        # student and the other way round.
        rename_keys(state, self._wrapper_prefixes(), wrap=False)
        checkpoint["lightning_distill"] = {
            "version": __version__,
            "teacher": self.teacher_identity,
            "losses": {name: term.config() for name, term in self.losses.items()},
            # a resumed fit draws what the uninterrupted one would have (validation draws nothing)
            "rng": (self._rng_for_checkpoint if self._rng_for_checkpoint is not None
                    else self._rng_after_step if self._in_fit_eval else rng_states()),
            "step_mean_scale": self._step_mean.scale,  # C, fixed at the first step: kept for a resume
        }

    def _restore_losses(self, recorded: Mapping[str, Any]) -> None:
        """Rebuild the recorded loss terms (default terms), or warn where given ones differ."""
        current = {name: term.config() for name, term in self.losses.items()}
        if current == dict(recorded):
            return
        rebuilt = None if self._losses_given else rebuild_terms(recorded)
        if rebuilt is not None:
            if self.teacher is None and any(t.requires_teacher for t in rebuilt.values()):
                return  # a student-only load keeps the task term; KD terms need a teacher
            for term in rebuilt.values():
                term.bind(self.student, self.teacher)
            self.losses = nn.ModuleDict(check_terms(rebuilt))
            self.metrics = nn.ModuleDict()  # remade for the recorded terms on first use
            return
        warnings.warn(losses_differ_message(recorded, current), UserWarning, stacklevel=2)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._rng_after_step = rng_states()  # validation puts it back: training draws as if none ran

    def on_validation_start(self) -> None:
        self._in_fit_eval = self._trainer is not None and self.trainer.state.fn == "fit"

    def on_validation_end(self) -> None:
        if self._in_fit_eval and self._rng_after_step is not None:
            restore_rng_states(self._rng_after_step)  # the val loaders' and any other draws undone
        self._in_fit_eval = False

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._resumed_rng is not None:  # after Lightning's restore, loaders and callbacks' setup
            restore_rng_states(self._resumed_rng)
            self._resumed_rng = None
        self._rng_at_batch_start = rng_states()  # a Ctrl-C inside this step saves these (SaveOnInterrupt)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        recorded = (checkpoint.get("lightning_distill") or {}).get("losses")
        if self._trainer is None and isinstance(recorded, Mapping):  # load_from_checkpoint, not a resume
            self._restore_losses(recorded)
        if self._trainer is not None:  # a resume: the generators are set just before its first step
            self._resumed_rng = (checkpoint.get("lightning_distill") or {}).get("rng")
            self._step_mean.scale = (checkpoint.get("lightning_distill") or {}).get("step_mean_scale")
        state = checkpoint.get("state_dict")
        if state is not None:
            rename_keys(state, self._wrapper_prefixes(), wrap=True)
        if self.teacher is not None and state is not None and not any(k.startswith("teacher.") for k in state):
            # The checkpoint left the teacher out on purpose; keep the live one.
            state.update({f"teacher.{k}": v for k, v in self.teacher.state_dict().items()})


def _warn_if_trainable(teacher: nn.Module) -> None:
    """One warning when a teacher arrives in train mode or with trainable parameters (it is frozen next)."""
    trainable = sum(p.numel() for p in teacher.parameters() if p.requires_grad)
    if teacher.training or trainable:
        how = " and ".join(x for x in ("in train mode" if teacher.training else "",
                                       f"with {trainable} trainable parameters" if trainable else "") if x)
        warnings.warn(f"the teacher was handed over {how}; DistillationModule freezes it (eval mode, "
                      "requires_grad=False) and never trains it. Pass lightning_distill.models.freeze(teacher) "
                      "to make that explicit and drop this warning.", UserWarning, stacklevel=3)


def _batch_size(labels: Tensor | None, logits: Tensor) -> int:
    return int(labels.shape[0]) if labels is not None and labels.dim() else int(logits.shape[0])
