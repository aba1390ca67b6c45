"""Open, verify and build a teacher cache: the teacher's targets for every sample, on every rank.

:class:`CacheBuilder` needs no Lightning: it takes the module (its teacher, its label
alignment), the splits' DataLoaders, and this process's rank, the world size and a barrier.
:class:`~lightning_distill.callbacks.TeacherCache` is a builder with the Lightning hooks and
the per-batch attach; ``lightning-distill ... +build_cache_only=true`` calls :meth:`CacheBuilder.build`
directly.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from lightning_distill.alignment import (
    align_labels,
    has_teacher_tokens,
    split_batch,
    teacher_inputs,
)
from lightning_distill.cache.fingerprint import (
    CacheMismatchError,
    cache_fingerprint,
    check_fingerprint,
    fingerprint_key,
    tokenizer_fingerprint,
)
from lightning_distill.cache.format import KINDS, CacheSpec, encode_sample, encode_topk_logprobs
from lightning_distill.cache.layout import (
    dataset_sample_ids,
    decoder_lengths,
    positions,
    sample_hashes,
)
from lightning_distill.cache.reader import SplitReader
from lightning_distill.cache.storage import CacheStorage
from lightning_distill.cache.writer import (
    MANIFEST,
    ShardWriter,
    completed_sample_ids,
    merge_index,
    write_manifest,
)
from lightning_distill.models.adapters import (
    call_model,
    is_seq2seq,
    logits_from_output,
    output_vocab_size,
    vocab_mismatch_message,
)
from lightning_distill.paths import cache_root, check_writable
from lightning_distill.validation import check_int, check_number

__all__ = ["DENSE_WARN_VOCAB", "SPLITS", "CacheBuilder"]

log = logging.getLogger(__name__)

#: Dense caches above this vocabulary get a warning: 2 * V bytes per token is 16 KiB at V = 8192,
#: 16 GB per million tokens, where ``sampled`` with N = 50 stays under 100 bytes per token.
DENSE_WARN_VOCAB = 8192
#: The splits a cache may hold.
SPLITS = ("train", "val", "test")

Barrier = Callable[[str], None]


class CacheBuilder:
    """The teacher cache without Lightning: open it, check it is of this teacher, build what it lacks.

    :meth:`build` opens the cache folder (creating it, or checking its fingerprint: teacher,
    tokenizer, data, kind, parameters, format), then for each split builds the samples no
    complete shard holds (every rank a share, each writing its own shards; a killed build
    resumes) and keeps a :class:`~lightning_distill.cache.SplitReader` per split in
    :attr:`readers`. Jobs that build one local cache folder at once take turns (file locks).

    A cross-tokenizer run (a term with ``cross_tokenizer = True``, or data whose items carry
    ``teacher_input_ids``) is cached in the teacher's own tokens: the teacher reads
    ``teacher_input_ids``/``teacher_attention_mask`` as it does live, each sample stores its
    teacher positions (layout ``teacher_tokens``, hashed over its teacher ids), and the
    fingerprint records ``space: teacher`` and the teacher tokenizer's fingerprint. Only
    ``dense`` targets hold what those terms compare (the teacher's whole distribution);
    ``topk``/``sampled`` are refused before anything is written.

    The module is used duck-typed: ``teacher``, ``student``, ``teacher_identity``,
    ``teacher_logits_fn``, ``shift_labels``, ``ignore_index`` and ``vocab_mismatch``, as a
    :class:`~lightning_distill.module.DistillationModule` has them; labels are aligned by
    :mod:`lightning_distill.alignment`, as in the module.

    Args:
        dirpath: cache folder, local path or fsspec URL (``s3://bucket/cache``, ``memory://c``).
            ``None``: ``<cache root>/teacher_targets/<fingerprint>`` (a new folder per
            fingerprint, so nothing is ever refused there).
        kind: ``"dense"``, ``"topk"`` or ``"sampled"``.
        k: ``topk``: ids per position.
        num_samples: ``sampled``: draws per position (``N``; 50 is the paper's setting).
        sample_temperature: ``sampled``: temperature of the teacher distribution drawn from.
        seed: ``sampled``: seed of the draws.
        store_logprobs: ``sampled``: also store each drawn id's log-probability (+2 bytes per
            entry) so training may use a temperature other than ``sample_temperature``
            (importance-reweighted); without them the cache is exact at ``sample_temperature``
            and training at another temperature is refused.
        dtype: ``"float16"`` or ``"bfloat16"`` for dense logits and hidden states.
        hidden_layers: also store the teacher's ``hidden_states[i]`` for these ``i`` (read back
            as ``TeacherTargets.hidden_states``, with ``hidden_layers`` saying which), the indices
            of ``FeatureKD``'s layer map (0 = embeddings, ``-1`` = the last hidden state).
        splits: splits to cache, of ``train``, ``val``, ``test``; a split whose dataloader is
            missing is skipped. Splits left out keep a live teacher.
        build_batch_size: batch size of the teacher during the build (default: the loader's).
        shard_mb: a shard is written every this many MiB (before compression).
        compression: ``"zlib"`` (default; sparse targets shrink by about a third to a half)
            or ``None``.
        on_mismatch: ``"error"`` (default) or ``"rebuild"``: wipe a cache built for something
            else and build it anew.
        release_teacher: drop the teacher from the module once every split that may need it is
            cached (:class:`~lightning_distill.callbacks.TeacherCache` does; :meth:`release`).
        max_shards_in_memory: loaded shards kept per split.
        sample_id_key: the batch key holding the stable sample ids.
        input_key: the batch key holding token ids (hashed per sample to catch changed data);
            ``None`` skips that check. A cross-tokenizer cache hashes ``teacher_input_ids``.
        progress: show a progress bar while building (rank 0).
        storage_options: passed to fsspec (credentials, endpoints).
        served: a :class:`~lightning_distill.blackbox.ServedTeacher`: build the cache from a teacher
            served elsewhere (its top-k prompt log-probabilities over HTTP) instead of the module's
            teacher, which must then be ``None``. Needs ``kind="topk"``, a causal-LM student that
            shares the teacher's tokenizer, and the tokenizer (the data module's, else the served
            teacher's ``tokenizer``).

    Raises:
        ValueError: on a bad argument (named, with the fix).
    """

    def __init__(
        self,
        dirpath: str | None = None,
        kind: str = "sampled",
        *,
        k: int = 32,
        num_samples: int = 50,
        sample_temperature: float = 1.0,
        seed: int = 0,
        store_logprobs: bool = False,
        dtype: str = "float16",
        hidden_layers: Sequence[int] | None = None,
        splits: Sequence[str] = SPLITS,
        build_batch_size: int | None = None,
        shard_mb: float = 256.0,
        compression: str | None = "zlib",
        on_mismatch: str = "error",
        release_teacher: bool = True,
        max_shards_in_memory: int = 8,
        sample_id_key: str = "sample_id",
        input_key: str | None = "input_ids",
        progress: bool = True,
        storage_options: Mapping[str, Any] | None = None,
        served: Any = None,
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r} is not a cache kind; use one of {list(KINDS)}.")
        check_int("k", k, low=1)
        check_int("num_samples", num_samples, low=1, high=65535)
        check_number("sample_temperature", sample_temperature, low=0.0, low_open=True,
                     hint="1.0 samples the teacher's own distribution.")
        check_int("seed", seed, low=0)
        if dtype not in ("float16", "bfloat16"):
            raise ValueError(f"dtype={dtype!r} is invalid; use 'float16' or 'bfloat16'.")
        if isinstance(splits, str):
            splits = [splits]
        unknown = [s for s in splits if s not in SPLITS]
        if unknown or not splits:
            raise ValueError(f"splits={list(splits)!r} is invalid; choose from {list(SPLITS)}.")
        if build_batch_size is not None:
            check_int("build_batch_size", build_batch_size, low=1)
        check_number("shard_mb", shard_mb, low=0.0, low_open=True, hint="It is a shard's size in MiB.")
        if compression not in (None, "zlib"):
            raise ValueError(f"compression={compression!r} is invalid; use 'zlib' or None.")
        if on_mismatch not in ("error", "rebuild"):
            raise ValueError(f"on_mismatch={on_mismatch!r} is invalid; use 'error' or 'rebuild'.")
        check_int("max_shards_in_memory", max_shards_in_memory, low=1)
        layers = tuple(check_int("hidden_layers[i]", i) for i in (hidden_layers or ()))
        self.dirpath = None if dirpath is None else str(dirpath)
        self.kind = kind
        self.k = k
        self.num_samples = num_samples
        self.sample_temperature = float(sample_temperature)
        self.seed = seed
        self.store_logprobs = bool(store_logprobs)
        self.compression = compression
        self.dtype = dtype
        self.hidden_layers = layers
        self.splits = tuple(dict.fromkeys(splits))
        self.build_batch_size = build_batch_size
        self.shard_bytes = int(shard_mb * 2**20)
        self.on_mismatch = on_mismatch
        self.release_teacher = bool(release_teacher)
        self.max_shards_in_memory = max_shards_in_memory
        self.sample_id_key = sample_id_key
        self.input_key = input_key
        self.progress = bool(progress)
        self.storage_options = dict(storage_options or {})
        self.served: Any = None
        self._served_tokenizer: Any = None
        self._served_checked = False
        if served is not None:
            self.use_served(served)

        self.storage: CacheStorage | None = None
        self.spec: CacheSpec | None = None
        self.fingerprint: dict[str, Any] | None = None
        self.readers: dict[str, SplitReader] = {}
        self.built: dict[str, int] = {}  # samples this process's build wrote, per split
        self.layouts: dict[str, dict[str, str]] = {}  # per split: layout.json (positions, token hash scheme)
        self.restored_dirpath: str | None = None  # the folder a resumed checkpoint's run read
        # "teacher": targets in the teacher's own tokens (a cross-tokenizer run), set by build.
        self.space = "student"
        self._teacher_tokenizer: str | None = None  # that tokenizer's fingerprint

    # ------------------------------------------------------------------ identity
    def config(self) -> dict[str, Any]:
        """Plain values describing the cache (for the distillation card)."""
        out: dict[str, Any] = {"kind": self.kind, "dirpath": self.storage.url if self.storage else self.dirpath,
                               "params": self.spec.params() if self.spec else None,
                               "fingerprint": fingerprint_key(self.fingerprint) if self.fingerprint else None}
        if self.served is not None:
            out["teacher"] = self.served.identity()
        if self.space == "teacher":  # targets over the teacher's own tokens (a cross-tokenizer run)
            out["space"] = "teacher"
        out["splits"] = {name: {**reader.describe(), "built_now": self.built.get(name, 0)}
                         for name, reader in self.readers.items()}
        return out

    def _spec(self, vocab_size: int, fold_vocab: int | None = None) -> CacheSpec:
        return CacheSpec(kind=self.kind, vocab_size=int(vocab_size), k=self.k if self.kind == "topk" else None,
                         num_samples=self.num_samples if self.kind == "sampled" else None,
                         sample_temperature=self.sample_temperature if self.kind == "sampled" else 1.0,
                         seed=self.seed if self.kind == "sampled" else 0, dtype=self.dtype,
                         hidden_layers=self.hidden_layers,
                         store_logprobs=self.store_logprobs if self.kind == "sampled" else True,
                         compression=self.compression, fold_vocab=fold_vocab)

    def _fingerprint(self, module: Any, tokenizer: Any, data_fingerprint: Any,
                     spec_params: dict[str, Any]) -> dict[str, Any]:
        params = self._space_params({**spec_params, "shift_labels": bool(getattr(module, "shift_labels", False)),
                                     "ignore_index": int(getattr(module, "ignore_index", -100))})
        teacher = self.served.identity() if self.served is not None else module.teacher_identity
        return cache_fingerprint(teacher=teacher, tokenizer=_tokenizer_digest(tokenizer), data=data_fingerprint,
                                 kind=self.kind, params=params)

    def _space_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """``params`` with this cache's token space: a cache in the teacher's own tokens records
        ``space: teacher`` and the teacher tokenizer's fingerprint (a student-space cache neither,
        so the fingerprints of caches built before token spaces existed are unchanged)."""
        out = {k: v for k, v in params.items() if k not in ("space", "teacher_tokenizer")}
        if self.space == "teacher":
            out["space"] = "teacher"
            out["teacher_tokenizer"] = self._teacher_tokenizer
        return out

    def _space_of(self, module: Any, loaders: Mapping[str, DataLoader], teacher_tokenizer: Any) -> None:
        """Set :attr:`space`: ``"teacher"`` when the module has a cross-tokenizer term or the data
        carries the teacher's own tokens (``teacher_input_ids``), else ``"student"``.

        Raises:
            ValueError: a ``topk``/``sampled`` cache in the teacher's tokens (before anything is written).
        """
        losses = getattr(module, "losses", None) or {}
        crossed = [n for n, t in losses.items() if getattr(t, "cross_tokenizer", False)]
        self.space = "teacher" if crossed or _carries_teacher_tokens(loaders) else "student"
        if self.space == "student":
            return
        if self.kind != "dense":
            why = f"the loss terms {crossed}" if crossed else "the batches (teacher_input_ids)"
            raise ValueError(
                f"TeacherCache(kind={self.kind!r}) keeps a few of the teacher's ids per position, but {why} "
                "compare the teacher's whole distribution over its own tokens (the shared entries and the sorted "
                "rest for ULD); use kind='dense' (Hydra: callbacks=teacher_cache_dense). Nothing was built."
            )
        if teacher_tokenizer is not None:
            self._teacher_tokenizer = _tokenizer_digest(teacher_tokenizer)

    # ------------------------------------------------------------------ opening and building
    def build(self, module: Any, loaders: Mapping[str, DataLoader], *, tokenizer: Any = None,
              data_fingerprint: Any = None, rank: int = 0, world_size: int = 1,
              barrier: Barrier | None = None, teacher_tokenizer: Any = None) -> dict[str, Any]:
        """Open the cache and, for each split of ``loaders``, build the samples it lacks.

        Every rank calls this with the same arguments (but its own ``rank``); they meet at
        ``barrier(name)``, which is only called when ``world_size > 1``.

        Args:
            module: a :class:`~lightning_distill.module.DistillationModule` (its teacher runs).
            loaders: ``{split: DataLoader}``; their datasets give the sample ids (``sample_ids``
                or each item's ``sample_id_key``).
            tokenizer: the data's tokenizer (part of the fingerprint), or ``None``.
            data_fingerprint: the data's own fingerprint (part of the fingerprint), or ``None``.
            rank: this process's rank.
            world_size: the number of processes.
            barrier: waits until every rank reached the point named by its argument.
            teacher_tokenizer: the teacher's own tokenizer when it reads other tokens than the
                student (a cross-tokenizer run: the targets are stored in the teacher's tokens and
                this tokenizer's fingerprint is part of the cache's), or ``None``.

        Returns:
            ``{split: {"samples", "positions", "bytes", "bytes_per_token", "built"}}``.

        Raises:
            ValueError: teacher and student vocabularies that the module's ``vocab_mismatch``
                does not allow; a ``dirpath`` that is a file or a folder of other files; a
                missing cache and no teacher to build it; a ``topk``/``sampled`` cache for a
                cross-tokenizer run (its terms need the teacher's whole distribution: ``dense``).
            CacheMismatchError: a cache built for another teacher/tokenizer/data/kind/params/format.
            TokenMismatchError: a served teacher (``served=``) whose tokens are not the student's.
            TeacherRequestError: a served teacher's request failed for good.
        """
        self._space_of(module, loaders, teacher_tokenizer)  # before anything is written: kind refused here
        world = world_size

        def sync(name: str) -> None:
            if barrier is not None and world > 1:
                barrier(name)

        teacher = getattr(module, "teacher", None)
        if self.served is not None:
            vocab = self._served_setup(module, tokenizer)
            tokenizer = self._served_tokenizer  # the data module's, else the served teacher's: fingerprinted
        else:
            vocab = output_vocab_size(teacher) if teacher is not None else None
        if vocab is None and teacher is not None:
            vocab = _probe_vocab(module, next(iter(loaders.values())), self.space)
        fold = self._fold_vocab(module, vocab)  # refuses a vocabulary mismatch before anything is built
        if self.storage is None:
            self._open(module, tokenizer, data_fingerprint, vocab, rank, sync, fold)
        assert self.storage is not None and self.spec is not None

        for split, loader in loaders.items():
            if split in self.readers:
                continue
            ids = dataset_sample_ids(loader.dataset, self.sample_id_key)
            self.built[split] = 0
            # Several ranks check under the lock only (all of them then read the same files).
            reader = self._complete_reader(split, ids) if world == 1 else None
            if reader is None:
                with contextlib.ExitStack() as held:
                    if rank == 0:
                        # One build of a split at a time, across jobs: a second job waits here,
                        # then finds the samples the first one built and builds only the rest.
                        held.enter_context(self.storage.lock(f"build-{split}"))
                    sync(f"ld-cache-locked-{split}")
                    reader = self._build_missing(module, split, loader, ids, rank, world, sync)
            self.readers[split] = reader
            self.layouts[split] = self._manifest_layout(split)
            info = reader.describe()
            log.info("Teacher cache %s [%s]: %d samples, %.1f bytes/token (%s)", self.kind, split, info["samples"],
                     info["bytes_per_token"], self.storage.url)
            if "folded_mass" in info:
                folded = info["folded_mass"]
                log.info("Teacher cache %s [%s]: teacher ids >= %d (past the student's vocabulary) held %.3g of the "
                         "probability per position on average (max %.3g); folded into the %s.", self.kind, split,
                         self.spec.target_vocab, folded["mean"], folded["max"],
                         "tail bucket" if self.kind == "topk" else "draws, renormalised over the student's ids")
        return {split: {**self.readers[split].describe(), "built": self.built.get(split, 0)} for split in loaders}

    def _complete_reader(self, split: str, ids: Tensor) -> SplitReader | None:
        """The split's reader when its index holds every one of ``ids`` and all its shards, else ``None``."""
        assert self.storage is not None
        reader = self._try_reader(split)
        if reader is None or reader.missing(ids).numel():
            return None
        absent = reader.absent_shards()
        if absent:
            log.warning("Teacher cache %s [%s]: shards %s are gone; building their samples again.",
                        self.storage.url, split, absent[:3])
            return None
        return reader

    def _build_missing(self, module: Any, split: str, loader: DataLoader, ids: Tensor, rank: int, world: int,
                       barrier: Barrier) -> SplitReader:
        """Build the samples of ``ids`` that no complete shard holds, merge the index (under the split's lock)."""
        assert self.storage is not None
        reader = self._complete_reader(split, ids)  # another job may have built them while we waited
        if reader is not None:
            return reader
        done = completed_sample_ids(self.storage, split)
        todo = [i for i, sid in enumerate(ids.tolist()) if sid not in done]
        if todo and getattr(module, "teacher", None) is None and self.served is None:
            raise ValueError(
                f"the teacher cache at {self.storage.url} lacks {len(todo)} samples of split {split!r} and "
                "there is no teacher to compute them; attach the teacher once to build them (the cache is then "
                "reused)."
            )
        barrier(f"ld-cache-list-{split}")  # every rank listed before any rank writes
        if todo:
            self.built[split] = self._run_teacher(module, split, loader, todo[rank::world], rank)
        barrier(f"ld-cache-built-{split}")
        if rank == 0:
            # Under the split's lock no other build is writing here: whatever no sidecar lists
            # (temporary files, a shard without its sidecar) is a killed build's and goes. A
            # store without locks keeps them (they are never read).
            merge_index(self.storage, split, clean=self.storage.local)
        barrier(f"ld-cache-merged-{split}")
        reader = self._try_reader(split)
        if reader is None or reader.missing(ids).numel():
            raise RuntimeError(f"the cache build of split {split!r} finished without every sample; "
                               "run it again (it resumes).")
        return reader

    def _fold_vocab(self, module: Any, vocab: int | None) -> int | None:
        """The student's vocabulary size when sparse targets must fold the teacher's extra ids, else ``None``.

        Checks the teacher's output width against the student's under the module's
        ``vocab_mismatch`` before anything is built: ``"error"`` refuses any difference;
        ``"slice"`` lets dense targets differ (the module compares the shared first ids) and folds
        sparse ones for a smaller student (ids past its vocabulary carry their mass into the tail
        bucket, or are left out of the draws).
        """
        if self.space == "teacher":  # two tokenizers: the vocabularies differ by design
            return None
        student = getattr(module, "student", None)
        student_vocab = output_vocab_size(student) if student is not None else None
        if vocab is None or student_vocab is None or student_vocab == vocab:
            return None
        policy = getattr(module, "vocab_mismatch", "error")
        if policy != "slice":
            raise ValueError(vocab_mismatch_message(student_vocab, vocab)
                             + " (Checked before building the teacher cache: nothing was written.)")
        return student_vocab if self.kind != "dense" and student_vocab < vocab else None

    def _open(self, module: Any, tokenizer: Any, data_fingerprint: Any, vocab: int | None, rank: int,
              barrier: Barrier, fold: int | None = None) -> None:
        teacher = getattr(module, "teacher", None)
        probe = self._spec(vocab or 1, fold)
        fingerprint = (self._fingerprint(module, tokenizer, data_fingerprint, probe.params())
                       if teacher is not None or self.served is not None else None)
        url = self.dirpath
        if url is None:
            if fingerprint is not None:
                url = str(cache_root() / "teacher_targets" / fingerprint_key(fingerprint))
            elif self.restored_dirpath is not None:  # a resumed run without its teacher: the folder it read
                url = self.restored_dirpath
            else:
                raise ValueError("TeacherCache(dirpath=None) names its folder after the teacher's fingerprint, "
                                 "so it needs the teacher; pass dirpath=... to read a cache without one.")
        storage = CacheStorage(url, **self.storage_options)
        if storage.is_file():
            raise ValueError(f"TeacherCache(dirpath={url!r}) is a file, not a folder; pass a folder path (new or "
                             "holding a cache), e.g. a sibling of that file, or move the file away.")
        if storage.local and fingerprint is not None:  # it will take a lock there and may write: fail now
            check_writable(storage.root, "TeacherCache(dirpath)", "the cache writes its lock and targets there; "
                           "fix the folder's permissions or pass another dirpath (Hydra: "
                           "callbacks.teacher_cache.dirpath=<folder>).")
        # Before a lock file goes into that folder. A folder where a job of ours took the cache lock
        # (its lock file comes before anything that job writes) is a cache being made: checked
        # again under the lock. One listing, as another job may be writing the manifest right now.
        names = storage.list()
        if MANIFEST not in names and names and not storage.has_lock("cache"):
            raise ValueError(f"{storage.url} holds files but no {MANIFEST}; point TeacherCache(dirpath=...) "
                             "at an empty or new folder so nothing of yours is overwritten.")
        with contextlib.ExitStack() as held:
            if fingerprint is not None and rank == 0:
                # Another job may be creating (or wiping) this cache: one at a time. Only rank 0
                # locks; the other ranks of this job wait for it at the barriers.
                held.enter_context(storage.lock("cache"))
            self._open_locked(storage, fingerprint, vocab, rank, barrier, fold)

    def _open_locked(self, storage: CacheStorage, fingerprint: dict[str, Any] | None, vocab: int | None, rank: int,
                     barrier: Barrier, fold: int | None) -> None:
        # Every rank reads the same state: nobody writes until all have read, so ranks take the
        # same branches below and their barriers line up.
        barrier("ld-cache-open")
        manifest = storage.read_json(MANIFEST) if storage.exists(MANIFEST) else None
        empty = storage.is_empty()
        barrier("ld-cache-read")
        if manifest is not None and fingerprint is not None:
            try:
                check_fingerprint(manifest["fingerprint"], fingerprint, where=storage.url)
            except CacheMismatchError:
                if self.on_mismatch != "rebuild":
                    raise
                barrier("ld-cache-mismatch")
                if rank == 0:
                    log.warning("Teacher cache at %s was built for something else; rebuilding it.", storage.url)
                    for name in storage.list():
                        storage.remove(name)
                barrier("ld-cache-wiped")
                manifest, empty = None, True
        elif manifest is not None:
            stored = manifest["fingerprint"]
            # Without a teacher only what this run knows is compared: the kind and the token space.
            params = self._space_params(stored.get("params") or {})
            if self.space == "teacher" and self._teacher_tokenizer is None:  # not known here: not compared
                params["teacher_tokenizer"] = (stored.get("params") or {}).get("teacher_tokenizer")
            check_fingerprint(stored, {**stored, "kind": self.kind, "params": params}, where=storage.url)
            warnings.warn(f"no teacher is attached, so the teacher cache at {storage.url} is trusted to be of "
                          f"teacher {stored.get('teacher')}.", stacklevel=2)
            fingerprint = stored
        if manifest is None:
            if fingerprint is None:
                raise ValueError(f"there is no teacher cache at {storage.url} and no teacher to build one; "
                                 "attach the teacher (teacher=...) for the first run.")
            if not empty:
                raise ValueError(f"{storage.url} holds files but no {MANIFEST}; point TeacherCache(dirpath=...) "
                                 "at an empty or new folder so nothing of yours is overwritten.")
            if rank == 0:
                spec = self._spec(vocab, fold)
                if self.kind == "dense" and vocab > DENSE_WARN_VOCAB:
                    warnings.warn(
                        f"a dense teacher cache stores 2 x {vocab} = {2 * vocab} bytes per token; above "
                        f"{DENSE_WARN_VOCAB} ids prefer kind='topk' or kind='sampled' (tens of bytes per token).",
                        stacklevel=2)
                write_manifest(storage, fingerprint, spec, vocab_size=vocab)
            barrier("ld-cache-manifest")
            manifest = storage.read_json(MANIFEST)
        self.storage = storage
        self.spec = CacheSpec.from_json(manifest["spec"])
        self.fingerprint = fingerprint

    def _try_reader(self, split: str) -> SplitReader | None:
        assert self.storage is not None and self.spec is not None
        if not self.storage.exists(split, "index.json"):
            return None
        return SplitReader(self.storage, split, self.spec, max_shards_in_memory=self.max_shards_in_memory)

    def _manifest_layout(self, split: str) -> dict[str, str]:
        assert self.storage is not None
        if self.storage.exists(split, "layout.json"):
            return self.storage.read_json(split, "layout.json")
        return {"layout": "tokens"}

    @torch.no_grad()
    def _run_teacher(self, module: Any, split: str, loader: DataLoader, indices: list[int], rank: int) -> int:
        """Run the teacher over ``indices`` of the split's dataset and write their targets."""
        assert self.storage is not None and self.spec is not None
        if self.served is not None:
            return self._run_served(module, split, loader, indices, rank)
        spec = self.spec
        teacher = module.teacher
        device = next((p.device for p in teacher.parameters()), torch.device("cpu"))
        written = 0
        layout = None
        seq2seq = is_seq2seq(teacher)
        teacher_space = self.space == "teacher"
        # The token hash: of the teacher's own ids in a teacher-space cache, else of input_key's.
        hash_key = ("teacher_input_ids" if teacher_space else self.input_key) if self.input_key else None
        with self._pass(split, loader, indices, rank, f"Caching teacher targets [{split}, {self.kind}]") as (
                subset, writer, advance):
            for batch in subset:
                if not isinstance(batch, Mapping) or self.sample_id_key not in batch:
                    raise ValueError(
                        f"TeacherCache needs mapping batches with a stable per-sample id under "
                        f"{self.sample_id_key!r}; got {type(batch).__name__}"
                        + (f" with keys {sorted(batch)}" if isinstance(batch, Mapping) else "")
                        + ". Add the id to each dataset item (or set sample_id_key)."
                    )
                batch = _to_device(batch, device)
                inputs, labels = _teacher_inputs(batch, self.space)
                wants_hidden = bool(spec.hidden_layers)
                output = call_model(teacher, inputs, **({"output_hidden_states": True} if wants_hidden else {}))
                logits = logits_from_output(output, getattr(module, "teacher_logits_fn", None), who="teacher")
                if logits.shape[-1] != spec.vocab_size:
                    raise ValueError(f"the teacher returned {logits.shape[-1]} logits per position but the cache was "
                                     f"started for {spec.vocab_size}; the teacher changed, rebuild the cache.")
                # The teacher's own labels (a cross-tokenizer batch: causal-LM text) shift as scoring's do.
                shift = True if teacher_space else module.shift_labels
                aligned = (align_labels(labels, inputs, logits, shift_labels=shift,
                                        ignore_index=module.ignore_index) if labels is not None else None)
                sample_ids = torch.as_tensor(batch[self.sample_id_key]).reshape(-1)
                n = sample_ids.numel()
                if teacher_space:  # the teacher's positions, up to its own attention mask's length
                    lay, lengths = "teacher_tokens", positions(inputs, logits, n)[1]
                elif seq2seq:  # targets at the decoder's positions
                    lay, lengths = "decoder", decoder_lengths(batch, logits, n, module.ignore_index)
                else:
                    lay, lengths = positions(batch, logits, n)
                if layout is None:
                    # "tokens": the hash covers the stored positions' input ids (as it always did);
                    # "teacher_tokens": those of the teacher's own tokens (teacher_input_ids);
                    # "sample"/"decoder": it covers the whole model input (and the decoder's labels).
                    layout = {"layout": lay, **({"hash": "inputs"} if lay in ("sample", "decoder") else {})}
                    self.storage.write_json(layout, split, "layout.json")
                flat = logits.reshape(n, -1, logits.shape[-1])
                flat_labels = None if aligned is None else aligned.reshape(n, -1)
                hidden = None
                if wants_hidden:
                    states = getattr(output, "hidden_states", None)
                    if states is None:
                        raise ValueError("hidden_layers were requested but the teacher returned no hidden_states; "
                                         "use a Hugging Face model or drop hidden_layers.")
                    hidden = [states[i].reshape(n, -1, states[i].shape[-1]) for i in spec.hidden_layers]
                hashes = (sample_hashes(batch, hash_key, layout, lengths)
                          if hash_key and hash_key in batch else torch.zeros(n, dtype=torch.int64))
                for b in range(n):
                    length = int(lengths[b])
                    tensors = encode_sample(
                        spec, flat[b, :length], None if flat_labels is None else flat_labels[b, :length],
                        ignore_index=module.ignore_index, split=split, sample_id=int(sample_ids[b]),
                        hidden=None if hidden is None else [h[b, :length] for h in hidden],
                    )
                    writer.add(int(sample_ids[b]), int(hashes[b]), tensors)
                written += n
                advance(n)
        return written

    @contextlib.contextmanager
    def _pass(self, split: str, loader: DataLoader, indices: list[int], rank: int,
              desc: str) -> Iterator[tuple[DataLoader, ShardWriter, Callable[[int], Any]]]:
        """One build pass over ``indices`` of the split's dataset: their batches in order, a shard writer
        (flushed when the pass ends without an error) and ``advance(n)`` for the progress bar (rank 0)."""
        assert self.storage is not None and self.spec is not None
        batch_size = self.build_batch_size or loader.batch_size or 16
        subset = DataLoader(Subset(loader.dataset, indices), batch_size=batch_size, shuffle=False,
                            collate_fn=loader.collate_fn, num_workers=0)
        writer = ShardWriter(self.storage, split, rank=rank, shard_bytes=self.shard_bytes,
                             compression=self.spec.compression)
        bar = None
        if self.progress and rank == 0 and indices:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(indices), desc=desc, unit="sample", dynamic_ncols=True)
        try:
            yield subset, writer, (bar.update if bar is not None else lambda n: None)
            writer.flush()
        finally:
            if bar is not None:
                bar.close()

    # ------------------------------------------------------------------ a served teacher
    def use_served(self, served: Any) -> None:
        """Build from ``served`` (a :class:`~lightning_distill.blackbox.ServedTeacher`) instead of the
        module's teacher (``served=`` of the constructor; the CLI calls this for ``teacher=served``).

        Raises:
            TypeError: ``served`` is not a served teacher.
            ValueError: what a served teacher cannot build (another kind than ``topk``, another
                ``k`` than its ``top_k``, hidden layers).
        """
        _check_served(served, self.kind, self.k, self.hidden_layers)
        self.served = served

    def _served_setup(self, module: Any, tokenizer: Any) -> int:
        """Check what a served teacher needs; the vocabulary of the cache (the student's)."""
        if getattr(module, "teacher", None) is not None:
            raise ValueError("the module has a teacher and the cache a served one (served=...); use one: "
                             "DistillationModule(student, None, ...) to build from the server.")
        if not getattr(module, "shift_labels", False):
            raise ValueError("a served teacher's log-probabilities score each next token, as a causal LM does; "
                             "the module's student must be a causal LM (shift_labels=True).")
        tokenizer = tokenizer if tokenizer is not None else getattr(self.served, "tokenizer", None)
        if tokenizer is None:
            raise ValueError("a served teacher's tokens are checked against the student's tokenizer, and none was "
                             "found: give the data module a .tokenizer or pass ServedTeacher(tokenizer=...).")
        self._served_tokenizer = tokenizer
        student = getattr(module, "student", None)
        vocab = output_vocab_size(student) if student is not None else None
        return int(vocab if vocab is not None else len(tokenizer))

    def _run_served(self, module: Any, split: str, loader: DataLoader, indices: list[int], rank: int) -> int:
        """Ask the served teacher for the top-k log-probabilities of ``indices`` and write their targets."""
        assert self.storage is not None and self.spec is not None
        spec, served, tokenizer = self.spec, self.served, self._served_tokenizer
        k = min(int(spec.k), spec.vocab_size)
        written = 0
        layout = {"layout": "tokens"}
        with self._pass(split, loader, indices, rank, f"Caching served teacher log-probabilities [{split}, topk]") as (
                subset, writer, advance):
            for batch in subset:
                if not isinstance(batch, Mapping) or self.sample_id_key not in batch or "input_ids" not in batch:
                    raise ValueError(f"a served teacher needs mapping batches with 'input_ids' and a stable per-sample "
                                     f"id under {self.sample_id_key!r}; got {type(batch).__name__}.")
                inputs, labels = split_batch(batch)
                input_ids = batch["input_ids"]
                n = input_ids.shape[0]
                _, lengths = positions(batch, input_ids.new_empty((*input_ids.shape[:2], 0)), n)
                aligned = align_labels(labels, inputs, None, shift_labels=True, ignore_index=module.ignore_index)
                sample_ids = torch.as_tensor(batch[self.sample_id_key]).reshape(-1)
                if written == 0:
                    self.storage.write_json(layout, split, "layout.json")
                samples = [input_ids[b, : int(lengths[b])].tolist() for b in range(n)]
                names = [f"sample {int(sample_ids[b])} ({split})" for b in range(n)]
                if not self._served_checked:  # the tokenizers agree: once, before any sample is stored
                    served.check_tokenizer(tokenizer, samples[0], k=k, sample=names[0])
                    self._served_checked = True
                answers = served.many_logprobs(samples, k=k, tokenizer=tokenizer, vocab_size=spec.vocab_size,
                                               names=names)
                hashes = (sample_hashes(batch, self.input_key, layout, lengths)
                          if self.input_key and self.input_key in batch else torch.zeros(n, dtype=torch.int64))
                for b, answer in enumerate(answers):
                    length = int(lengths[b])
                    label = None if aligned is None else aligned[b, :length]
                    label_lp = _label_logprobs(answer, samples[b], label, module.ignore_index, names[b])
                    tensors = encode_topk_logprobs(spec, torch.from_numpy(answer.top_ids),
                                                   torch.from_numpy(answer.top_logprobs), label_lp)
                    writer.add(int(sample_ids[b]), int(hashes[b]), tensors)
                written += n
                advance(n)
        return written

    def release(self, module: Any) -> None:
        """Drop the module's teacher (its identity is kept for checkpoints and the card)."""
        if getattr(module, "teacher", None) is None:
            return
        _ = module.teacher_identity  # computed while the weights are still there
        device = next((p.device for p in module.teacher.parameters()), torch.device("cpu"))
        module.teacher = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------- helpers
def _tokenizer_digest(tokenizer: Any) -> str | None:
    """A tokenizer's fingerprint (part of a cache's); ``None`` for no tokenizer."""
    if tokenizer is None:
        return None
    try:
        return tokenizer_fingerprint(tokenizer)
    except AttributeError:  # a slow tokenizer: its class and size stand in
        return f"{type(tokenizer).__name__}:{len(tokenizer)}"


def _carries_teacher_tokens(loaders: Mapping[str, DataLoader]) -> bool:
    """Whether the data's items carry the teacher's own tokens (``teacher_input_ids``: a cross-tokenizer
    data module); read from the first item of the first non-empty dataset."""
    for loader in loaders.values():
        try:
            item = loader.dataset[0]
        except (IndexError, KeyError, TypeError, NotImplementedError):
            continue
        return isinstance(item, Mapping) and "teacher_input_ids" in item
    return False


def _teacher_inputs(batch: Any, space: str) -> tuple[Any, Any]:
    """What the teacher reads and its labels: the batch's model inputs and labels, or in the teacher's
    token space ``teacher_input_ids``/``teacher_attention_mask`` and ``teacher_labels`` (as
    :meth:`DistillationModule.teacher_targets <lightning_distill.module.DistillationModule.teacher_targets>`
    runs it live).

    Raises:
        ValueError: a teacher-space cache and a batch without ``teacher_input_ids``.
    """
    if space != "teacher":
        return split_batch(batch)
    if not has_teacher_tokens(batch):
        raise ValueError("a cross-tokenizer term's teacher cache stores the teacher's targets over its own tokens, "
                         "but the batch has no 'teacher_input_ids'; use data that tokenizes the text for both models "
                         "(data=cross_tokenizer, or data.teacher_tokenizer=... on your files).")
    return teacher_inputs(batch, None), batch.get("teacher_labels")


def _check_served(served: Any, kind: str, k: int, hidden_layers: tuple[int, ...]) -> None:
    """A served teacher gives top-k log-probabilities only: refuse what it cannot build."""
    for name in ("identity", "check_tokenizer", "many_logprobs"):
        if not callable(getattr(served, name, None)):
            raise TypeError(f"served must be a lightning_distill.blackbox.ServedTeacher, got {type(served).__name__}.")
    if kind != "topk":
        raise ValueError(f"a served teacher gives top-k log-probabilities, not {kind!r} targets; use kind='topk' "
                         "(Hydra: callbacks=teacher_cache_topk).")
    top_k = getattr(served, "top_k", None)
    if top_k is not None and top_k != k:
        raise ValueError(f"ServedTeacher(top_k={top_k}) and the cache's k={k} differ; set one of them (Hydra: "
                         f"callbacks.teacher_cache.k={top_k}, or teacher.top_k=null to use the cache's k).")
    if hidden_layers:
        raise ValueError("a served teacher returns no hidden states; drop hidden_layers.")


def _label_logprobs(answer: Any, ids: list[int], labels: Tensor | None, ignore_index: int, name: str) -> Tensor:
    """Each position's label log-probability from a served answer: the next token's (the usual label),
    else the label's top-k entry; 0 where there is no label."""
    length = len(ids)
    out = torch.zeros(length, dtype=torch.float64)
    if labels is None:
        return out
    for t, label in enumerate(labels.tolist()):
        if label == ignore_index:
            continue
        if t + 1 < length and label == ids[t + 1] and answer.next_logprobs[t] == answer.next_logprobs[t]:
            out[t] = float(answer.next_logprobs[t])
            continue
        hit = (answer.top_ids[t] == label).nonzero()[0]
        if not hit.size:
            raise ValueError(f"{name}: the label {label} at position {t} is neither the next token nor among the "
                             "served teacher's top-k, so its log-probability is unknown; a served teacher scores "
                             "the sample's own next tokens (labels = input_ids, ignore_index elsewhere).")
        out[t] = float(answer.top_logprobs[t, hit[0]])
    return out


def _to_device(data: Any, device: torch.device) -> Any:
    """``data`` (tensors in mappings, lists and tuples; anything with ``.to``) on ``device``."""
    if isinstance(data, Tensor):
        return data.to(device, non_blocking=device.type not in ("cpu", "mps"))
    if callable(getattr(data, "to", None)) and not isinstance(data, type):
        return data.to(device)  # e.g. a BatchEncoding
    if isinstance(data, Mapping):
        return type(data)({key: _to_device(value, device) for key, value in data.items()})
    if isinstance(data, tuple) and hasattr(data, "_fields"):  # a namedtuple
        return type(data)(*(_to_device(value, device) for value in data))
    if isinstance(data, (list, tuple)):
        return type(data)(_to_device(value, device) for value in data)
    return data


@torch.no_grad()
def _probe_vocab(module: Any, loader: DataLoader, space: str) -> int:
    """The width of the teacher's logits, from one forward pass (a teacher without a config)."""
    batch = next(iter(loader))
    device = next((p.device for p in module.teacher.parameters()), torch.device("cpu"))
    inputs, _ = _teacher_inputs(_to_device(batch, device), space)
    logits = logits_from_output(call_model(module.teacher, inputs), getattr(module, "teacher_logits_fn", None),
                                who="teacher")
    return int(logits.shape[-1])
