"""``TeacherCache``: run the teacher once, store its targets compactly, read them every step after.

The teacher's forward pass is the price of distillation. With this callback a fit first builds
(or finds) a cache of the teacher's targets for every configured split, then releases the
teacher and feeds each batch its targets from disk, by sample id. Later epochs and later runs
with the same teacher, tokenizer, data and kind pay nothing for the teacher.

Kinds (what is stored per position; bytes per token measured in ``benchmarks/teacher_cache.py``):

* ``dense``: the full logits in 16 bits (``2 * V`` bytes per token: small vocabularies only);
* ``topk``: the ``k`` most likely ids, their log-probabilities and the log of the mass outside
  them, so KD sees a tail bucket instead of a silently renormalised head;
* ``sampled``: Sparse Logit Sampling (Anshumann et al., ACL 2025): ``num_samples`` draws from
  the teacher's distribution; the loss uses ``counts / N``, an unbiased estimate of the
  teacher's probabilities.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_distill.cache.builder import SPLITS, CacheBuilder
from lightning_distill.cache.fingerprint import fingerprint_key
from lightning_distill.cache.layout import decoder_tokens, sample_hashes
from lightning_distill.models.adapters import output_vocab_size

__all__ = ["TeacherCache"]

log = logging.getLogger(__name__)


class TeacherCache(CacheBuilder, Callback):
    """Compute the teacher's targets once per sample, store them, and serve them to every later step.

    On ``fit`` (and ``validate``/``test``) the callback opens the cache for each configured
    split, checks that it was built for this teacher, tokenizer, data, kind and parameters
    (refusing it, with what differs, if not), builds the samples it lacks (all ranks share the
    work, each writing its own shards; a killed build resumes), releases the teacher, and from
    then on puts ``batch["teacher_targets"]`` into every batch from disk. The
    :class:`~lightning_distill.module.DistillationModule` and its loss terms read those targets
    exactly as they read a live teacher's; :class:`~lightning_distill.losses.LogitKD` switches to
    the sparse divergences for ``topk``/``sampled`` targets by itself.

    Batches must be mappings with a stable per-sample id (``sample_id_key``); the id, not the
    batch position, finds a sample's targets, so shuffling, batch size and the number of ranks
    may differ between the build and the reads.

    The teacher's output width is checked against the student's before anything is built (the
    module's ``vocab_mismatch``); under ``"slice"`` top-k/sampled targets for a smaller student
    fold the teacher's extra ids (see :class:`~lightning_distill.cache.CacheSpec`). Jobs that
    build one local cache folder at once take turns (file locks): the second builds only what
    is missing.

    Temperature: top-k log-probabilities are stored at temperature 1; any training temperature is
    exact on the top-k entries, and the tail mass is exact at T = 1 and approximated (spread
    evenly over the other ids) otherwise. Sampled targets are exact (``counts / N``, unbiased) at
    ``sample_temperature`` and importance-reweighted at other temperatures. Dense targets are
    exact at every temperature (up to 16-bit rounding). See ``docs/teacher_cache.md``.

    The cache itself (opening, checking, building; no Lightning) is
    :class:`~lightning_distill.cache.builder.CacheBuilder`, whose arguments this callback takes;
    the callback adds the Lightning hooks, the ranks and barriers of the Trainer, the release of
    the teacher and the per-batch :meth:`attach`. ``hidden_layers`` are stored and read back
    (``TeacherTargets.hidden_states``), feeding ``FeatureKD`` as a live teacher's would.

    Cross-tokenizer runs (:class:`~lightning_distill.data.CrossTokenizerDataModule` batches,
    ``CrossTokenizerKD``/``ULDLoss``) are cached in the teacher's own tokens: ``kind="dense"``
    stores the teacher's logits at its positions (``teacher_input_ids``), read back shaped like
    the batch's ``teacher_input_ids`` for the terms to align as they align a live teacher's;
    ``topk``/``sampled`` are refused before anything is built (``docs/cross_tokenizer.md``).

    Args:
        those of :class:`~lightning_distill.cache.builder.CacheBuilder`, documented there:
        ``dirpath`` (``None``: a folder per fingerprint under the cache root), ``kind``, the
        kind's parameters (``k``, ``num_samples``, ``sample_temperature``, ``seed``,
        ``store_logprobs``, ``dtype``, ``hidden_layers``), ``splits``, ``release_teacher``, and
        how it is built and read (``build_batch_size``, ``shard_mb``, ``compression``,
        ``on_mismatch``, ``max_shards_in_memory``, ``sample_id_key``, ``input_key``,
        ``progress``, ``storage_options``), and ``served``: a
        :class:`~lightning_distill.blackbox.ServedTeacher` whose top-k log-probabilities build a
        ``topk`` cache instead of the module's teacher (``docs/blackbox.md``).

    Raises:
        ValueError: on a bad argument (named, with the fix); a ``dirpath`` that is a file or a folder
            of other files; teacher and student vocabularies that ``vocab_mismatch`` does not allow.
        CacheMismatchError: a cache built for another teacher/tokenizer/data/kind/params/format.
        CacheCorruptedError: a shard whose checksum fails when it is read.

    Example:
        >>> cache = TeacherCache("s3://bucket/kd-cache", kind="sampled", num_samples=50)  # doctest: +SKIP
        >>> L.Trainer(callbacks=[cache]).fit(module, datamodule)  # doctest: +SKIP
    """

    def prepare(self, module: Any, datamodule: Any = None, *, trainer: L.Trainer | None = None,
                splits: Sequence[str] | None = None, loaders: Mapping[str, DataLoader] | None = None) -> dict[str, Any]:
        """Open (building what is missing) the cache of each split; usable without a Trainer.

        This is what the callback runs at ``fit``/``validate``/``test`` start: the splits'
        loaders from ``loaders``, the datamodule or the Trainer, the ranks and barriers from the
        Trainer, then :meth:`~lightning_distill.cache.builder.CacheBuilder.build`.

        Args:
            module: a :class:`~lightning_distill.module.DistillationModule` (its teacher runs).
            datamodule: where the splits' dataloaders (and the tokenizer and data fingerprint) come from.
            trainer: the Trainer, for ranks and barriers (``None``: one process).
            splits: splits to prepare (default: this callback's ``splits``).
            loaders: ``{split: DataLoader}`` to use instead of the datamodule's.

        Returns:
            ``{split: {"samples", "positions", "bytes", "bytes_per_token", "built"}}``.

        Raises:
            ValueError: no dataloader for any of the splits (and what :meth:`build` raises).
        """
        world = trainer.world_size if trainer is not None else 1
        return self.build(module, self.split_loaders(datamodule, trainer=trainer, splits=splits, loaders=loaders),
                          tokenizer=getattr(datamodule, "tokenizer", None),
                          data_fingerprint=getattr(datamodule, "data_fingerprint", None),
                          rank=trainer.global_rank if trainer is not None else 0, world_size=world,
                          barrier=trainer.strategy.barrier if trainer is not None else None,
                          teacher_tokenizer=getattr(datamodule, "teacher_tokenizer", None))

    def split_loaders(self, datamodule: Any = None, *, trainer: L.Trainer | None = None,
                      splits: Sequence[str] | None = None,
                      loaders: Mapping[str, DataLoader] | None = None) -> dict[str, DataLoader]:
        """``{split: DataLoader}`` of the splits to cache: ``loaders``, then the datamodule's or the Trainer's.

        Raises:
            ValueError: none of the splits has a dataloader.
        """
        found = dict(loaders or {})
        for split in splits or self.splits:
            if split not in found:
                loader = _split_loader(split, datamodule, trainer)
                if loader is not None:
                    found[split] = loader
        if not found:
            raise ValueError(f"TeacherCache found no dataloader for the splits {list(splits or self.splits)}; "
                             "give the Trainer a datamodule (or pass loaders={'train': ...}).")
        return found

    # ------------------------------------------------------------------ Lightning hooks
    def _prepare_for(self, trainer: L.Trainer, pl_module: L.LightningModule, splits: Sequence[str]) -> None:
        wanted = [s for s in splits if s in self.splits and s not in self.readers]
        if wanted:
            self.prepare(pl_module, trainer.datamodule, trainer=trainer, splits=wanted)
            folded = {f"teacher_cache/{split}/folded_mass_{stat}": float(info["folded_mass"][stat])
                      for split, info in self.config()["splits"].items() if split in wanted and "folded_mass" in info
                      for stat in ("mean", "max")}
            if folded and trainer.is_global_zero:
                for logger in trainer.loggers:
                    logger.log_metrics(folded, step=trainer.global_step)
        self._check_vocab(pl_module)
        if self.release_teacher and getattr(pl_module, "teacher", None) is not None:
            live = [s for s in self._available(trainer) if s not in self.readers]
            if live:
                log.info("Teacher cache: keeping the teacher in memory for the splits %s, not cached yet%s.", live,
                         "" if trainer.datamodule is not None else
                         " (their loaders may come with a later validate/test; call TeacherCache.release(module) "
                         "to free it, or give the Trainer a datamodule)")
            else:
                self.release(pl_module)

    def _available(self, trainer: L.Trainer) -> list[str]:
        """Every split that may still need the teacher: the teacher goes only when all of them are cached.

        With a datamodule, the splits it has a loader for. With loaders passed to ``fit`` (or
        ``validate``/``test``) a later ``trainer.test(module, loader)`` may bring any split, so
        all of them, until each is cached (or the teacher is released by hand with
        :meth:`release`).
        """
        if trainer.datamodule is None:
            return list(SPLITS)
        return [s for s in SPLITS if _split_loader(s, trainer.datamodule, trainer) is not None]

    def _check_vocab(self, pl_module: Any) -> None:
        assert self.spec is not None
        if self.space == "teacher":  # the teacher's own tokens: its vocabulary is not the student's
            return
        student_vocab = output_vocab_size(pl_module.student) if hasattr(pl_module, "student") else None
        if student_vocab is not None and hasattr(pl_module, "check_cached_vocab"):
            pl_module.check_cached_vocab(student_vocab, self.spec.target_vocab, sparse=self.kind != "dense")

    def _check_temperatures(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Sampled targets without log-probabilities are exact only at their sample temperature:
        refuse, before anything is built, a run that would train at another."""
        if self.kind != "sampled" or self.store_logprobs:
            return
        from lightning_distill.callbacks.temperature import TemperatureSchedule

        scheduled = any(isinstance(cb, TemperatureSchedule) and cb.temperature is not None
                        and set(cb.temperature.corners().values()) != {self.sample_temperature}
                        for cb in trainer.callbacks)
        terms = getattr(pl_module, "losses", {})
        other = {n: t.temperature for n, t in terms.items()
                 if getattr(t, "requires_teacher", False) and getattr(t, "temperature", self.sample_temperature)
                 != self.sample_temperature}
        if scheduled or other:
            what = "a TemperatureSchedule changes the temperature" if scheduled else f"terms train at {other}"
            raise ValueError(
                f"TeacherCache(kind='sampled', store_logprobs=False) is exact only at sample_temperature="
                f"{self.sample_temperature:g}, but {what}; pass store_logprobs=True (importance reweighting to "
                f"any temperature) or sample_temperature equal to the training temperature."
            )

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if hasattr(pl_module, "use_cached_targets"):
            pl_module.use_cached_targets()  # default losses without a teacher: KD + task, not the task alone

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check_temperatures(trainer, pl_module)
        if getattr(pl_module, "losses", None) is not None:  # feature terms the cache cannot feed
            from lightning_distill.losses.feature_terms import check_cached_features
            from lightning_distill.models.features import num_layers

            teacher = getattr(pl_module, "teacher", None)
            check_cached_features(pl_module.losses, self.hidden_layers or (),
                                  num_layers(teacher) if teacher is not None else None)
        self._prepare_for(trainer, pl_module, list(self.splits))

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and "val" in self.splits and "val" not in self.readers:
            self._prepare_for(trainer, pl_module, ["val"])

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if "test" in self.splits and "test" not in self.readers:
            self._prepare_for(trainer, pl_module, ["test"])

    def attach(self, split: str, pl_module: L.LightningModule, batch: Any) -> None:
        """Put the cached targets of ``batch`` (a dict on the module's device) into ``batch["teacher_targets"]``.

        Does nothing for a split that is not cached (the live teacher serves it). The callback
        calls this before every train/val/test batch; call it yourself to evaluate outside a
        Trainer (``evaluation.evaluate_slices(..., targets=...)``).
        """
        reader = self.readers.get(split)
        if reader is None:
            return
        if not isinstance(batch, dict) or self.sample_id_key not in batch:
            raise ValueError(f"TeacherCache needs dict batches with {self.sample_id_key!r} to find cached targets; "
                             f"got {type(batch).__name__}.")
        ids = torch.as_tensor(batch[self.sample_id_key])
        layout = self.layouts.get(split, {"layout": "tokens"})
        if layout["layout"] == "teacher_tokens":  # a cross-tokenizer run: the teacher's own positions
            teacher_ids = batch.get("teacher_input_ids")
            if not isinstance(teacher_ids, Tensor) or teacher_ids.dim() != 2:
                raise ValueError(f"the teacher cache's {split!r} split holds the teacher's targets over its own "
                                 "tokens, but this batch has no 'teacher_input_ids'; use the data it was built with "
                                 "(data=cross_tokenizer, or data.teacher_tokenizer=... on your files).")
            batch["teacher_targets"] = reader.read(ids, tuple(teacher_ids.shape), pl_module.device,
                                                   input_ids=teacher_ids if self.input_key else None)
            return
        tokens = batch.get(self.input_key) if self.input_key else None
        if layout["layout"] == "decoder":  # an encoder-decoder: one target per decoder position
            decoder = decoder_tokens(batch)
            shape = tuple(decoder.shape[:2]) if decoder is not None else (ids.numel(),)
        elif layout["layout"] == "tokens" and isinstance(tokens, Tensor):
            shape = tuple(tokens.shape[:2]) if tokens.dim() >= 2 else (ids.numel(),)
        else:
            shape = (ids.numel(),)
        if not isinstance(tokens, Tensor):
            batch["teacher_targets"] = reader.read(ids, shape, pl_module.device)
        elif layout.get("hash") == "inputs":
            batch["teacher_targets"] = reader.read(
                ids, shape, pl_module.device,
                token_hashes=lambda lengths: sample_hashes(batch, self.input_key, layout, lengths))
        else:
            batch["teacher_targets"] = reader.read(ids, shape, pl_module.device, input_ids=tokens)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.attach("train", pl_module, batch)

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        self.attach("val", pl_module, batch)

    def on_test_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                            batch_idx: int, dataloader_idx: int = 0) -> None:
        self.attach("test", pl_module, batch)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint records of the cache: its kind, folder and fingerprint key."""
        return {"kind": self.kind, "dirpath": self.storage.url if self.storage else self.dirpath,
                "fingerprint": fingerprint_key(self.fingerprint) if self.fingerprint else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the cache a checkpoint's run read: a resumed fit with ``dirpath=None`` and no
        teacher (it was released) opens that folder instead of refusing to name one."""
        self.restored_dirpath = state_dict.get("dirpath")


# ---------------------------------------------------------------------------------- helpers
def _split_loader(split: str, datamodule: Any, trainer: L.Trainer | None) -> DataLoader | None:
    """The split's DataLoader: from the datamodule, else from where the Trainer gets it."""
    loader = None
    if datamodule is not None:
        hook = f"{split}_dataloader"
        if isinstance(datamodule, L.LightningDataModule) and not is_overridden(hook, datamodule, L.LightningDataModule):
            return None  # the base class's hook only raises
        fn = getattr(datamodule, hook, None)
        try:
            loader = fn() if fn is not None else None
        except (NotImplementedError, AttributeError, MisconfigurationException):
            loader = None
    elif trainer is not None:
        loader = _trainer_loader(split, trainer)
    if isinstance(loader, (list, tuple)):
        loader = loader[0] if loader else None
    return loader if isinstance(loader, DataLoader) else None


def _trainer_loader(split: str, trainer: L.Trainer) -> Any:
    """The loader the Trainer runs ``split`` with, through its public API only.

    ``trainer.train_dataloader``/``val_dataloaders``/``test_dataloaders`` are set once the
    running loop has set up its data; at ``on_fit_start`` (before that) the fit loop's own
    ``setup_data()`` is asked first: it is the call Lightning makes next, and it does nothing
    when called again.
    """
    fitting = trainer.state.fn == "fit"
    if split == "train":
        if fitting:
            trainer.fit_loop.setup_data()
        return trainer.train_dataloader
    if split == "val":
        if fitting and trainer.val_dataloaders is None:
            trainer.fit_loop.epoch_loop.val_loop.setup_data()
        return trainer.val_dataloaders
    return trainer.test_dataloaders
