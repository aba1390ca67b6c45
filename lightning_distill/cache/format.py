"""The on-disk format of cached teacher targets: what one shard holds, and how a batch is read back.

Each shard is a safetensors file (no pickle) holding a run of whole samples. Three groups of
tensors, by what they are indexed with:

======================  =================  ===================================================
name                    shape, dtype       what it is
======================  =================  ===================================================
``sample.ids``          (S,) int64         stable sample id (the batch's ``sample_id``)
``sample.lengths``      (S,) int32         positions stored for the sample
``sample.token_hash``   (S,) int64         hash of its token ids (checked on first read)
``pos.logits``          (P, V) f16/bf16    dense: the teacher's logits
``pos.topk_ids``        (P, k) uint         topk: the k most likely ids, most likely first
``pos.topk_logprobs``   (P, k) float16     topk: their log-probabilities (temperature 1)
``pos.tail_logprob``    (P,) float16       topk: log of the probability outside them
``pos.num_entries``     (P,) uint8/16      sampled: distinct ids drawn at the position
``ent.ids``             (E,) uint          sampled: the distinct drawn ids, per position
``ent.counts``          (E,) uint8/16      sampled: how often each was drawn (sums to N)
``ent.logprobs``        (E,) float16       sampled: each id's log-probability (optional)
``pos.top1``            (P,) uint          sampled: the teacher's most likely id
``pos.entropy``         (P,) float16       sampled: entropy of the distribution drawn from
``pos.label_logprobs``  (P,) float16       topk/sampled: log-probability of the label (0 if none)
``pos.hidden.<layer>``  (P, H) f16/bf16    optional teacher hidden states
======================  =================  ===================================================

With ``compression="zlib"`` the shard file is the zlib stream of those safetensors bytes (the
checksum covers the file as stored). ``P`` is the sum of the samples' lengths, ``E`` of their ``num_entries``. Ids use the smallest
unsigned type that holds the vocabulary (uint8, uint16, else int32), counts uint8 when
``N <= 255``. Positions are the teacher's logit positions (for a causal LM, position ``t``
scores token ``t + 1``, exactly as the student's logits).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from lightning_distill.types import SparseTargets, TeacherTargets

__all__ = ["KINDS", "CacheSpec", "LoadedShard", "assemble", "encode_sample", "encode_topk_logprobs"]

Kind = Literal["dense", "topk", "sampled"]
KINDS = ("dense", "topk", "sampled")
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class CacheSpec:
    """What kind of targets a cache stores, and with which parameters.

    Attributes:
        kind: ``"dense"``, ``"topk"`` or ``"sampled"``.
        vocab_size: the teacher's vocabulary size ``V``.
        k: ``topk``: ids kept per position.
        num_samples: ``sampled``: draws ``N`` per position.
        sample_temperature: ``sampled``: temperature of the distribution the draws come from.
        seed: ``sampled``: seed of the draws (each sample's draws depend only on it, the split
            and the sample id, so any number of ranks builds the same cache).
        dtype: ``"float16"`` or ``"bfloat16"``, for dense logits and hidden states.
        hidden_layers: indices into the teacher's ``hidden_states`` to store (empty: none).
        store_logprobs: ``sampled``: also store each drawn id's log-probability (2 bytes per
            entry), which lets training use a temperature other than ``sample_temperature``.
        compression: ``"zlib"`` (each shard file is the zlib stream of the safetensors bytes)
            or ``None``. Sparse targets compress well (sorted ids, small counts).
        fold_vocab: ``topk``/``sampled`` for a student whose vocabulary is smaller than the
            teacher's (``vocab_mismatch="slice"``, as Qwen2.5's padded 152,064 rows against
            151,936): the student's vocabulary size. Ids at or past it are folded: their mass
            goes into the top-k tail bucket, and draws come from the teacher renormalised over
            the first ``fold_vocab`` ids (as dense KD under ``"slice"`` compares). ``None``: no fold.
    """

    kind: Kind
    vocab_size: int
    k: int | None = None
    num_samples: int | None = None
    sample_temperature: float = 1.0
    seed: int = 0
    dtype: str = "float16"
    hidden_layers: tuple[int, ...] = field(default_factory=tuple)
    store_logprobs: bool = True
    compression: str | None = "zlib"
    fold_vocab: int | None = None

    @property
    def target_vocab(self) -> int:
        """The vocabulary the stored ids index: the student's when folded, else the teacher's."""
        return self.fold_vocab if self.fold_vocab is not None else self.vocab_size

    def params(self) -> dict[str, Any]:
        """The parameters that change what is stored (part of the cache's fingerprint)."""
        params: dict[str, Any] = {"hidden_layers": list(self.hidden_layers)}
        if self.hidden_layers or self.kind == "dense":
            params["dtype"] = self.dtype
        if self.kind == "topk":
            params["k"] = self.k
        if self.kind == "sampled":
            params.update(num_samples=self.num_samples, sample_temperature=self.sample_temperature,
                          seed=self.seed, store_logprobs=self.store_logprobs)
        if self.fold_vocab is not None:  # a cache folded for one student is not another student's
            params["fold_vocab"] = self.fold_vocab
        return params

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["hidden_layers"] = list(self.hidden_layers)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CacheSpec:
        return cls(**{**data, "hidden_layers": tuple(data.get("hidden_layers") or ())})

    @property
    def value_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def id_dtype(self) -> torch.dtype:
        """The smallest unsigned integer type that holds every id of the vocabulary."""
        if self.vocab_size <= 2**8:
            return torch.uint8
        if self.vocab_size <= 2**16:
            return torch.uint16
        return torch.int32

    @property
    def count_dtype(self) -> torch.dtype:
        return torch.uint8 if (self.num_samples or 0) <= 255 else torch.uint16


def _sample_generator(spec: CacheSpec, split: str, sample_id: int, device: torch.device) -> torch.Generator:
    # A seed that depends on (seed, split, sample id) only: draws do not depend on ranks or batches.
    mixed = (spec.seed * 1_000_003 + sum(map(ord, split)) * 7919 + int(sample_id) * 2_654_435_761) % (2**63 - 1)
    generator = torch.Generator(device=device)
    generator.manual_seed(mixed)
    return generator


def _unique_counts(draws: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per row of ``(L, N)`` draws: distinct ids (ascending), their counts, and how many per row."""
    ordered = draws.sort(-1).values
    new = torch.ones_like(ordered, dtype=torch.bool)
    new[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    flat_new = new.reshape(-1)
    starts = flat_new.nonzero().squeeze(-1)
    ends = torch.cat([starts[1:], starts.new_tensor([flat_new.numel()])])
    return ordered.reshape(-1)[starts], ends - starts, new.sum(-1)


@torch.no_grad()
def encode_sample(
    spec: CacheSpec,
    logits: Tensor,
    labels: Tensor | None,
    *,
    ignore_index: int,
    split: str,
    sample_id: int,
    hidden: list[Tensor] | None = None,
) -> dict[str, Tensor]:
    """Turn one sample's teacher output into the tensors a shard stores (on the CPU).

    Args:
        spec: what to store.
        logits: ``(L, V)`` the teacher's logits at the sample's ``L`` positions.
        labels: ``(L,)`` the labels aligned with those positions, or ``None``.
        ignore_index: label value of positions without a label.
        split: the split name (part of the sampling seed).
        sample_id: the sample's stable id (part of the sampling seed).
        hidden: ``(L, H)`` hidden states of ``spec.hidden_layers``.

    Raises:
        ValueError: non-finite teacher logits, or dense logits that overflow the 16-bit type.
    """
    out: dict[str, Tensor] = {}
    z = logits.float()
    if not torch.isfinite(z).all():
        raise ValueError(f"the teacher's logits for sample {sample_id} ({split}) contain NaN or inf; "
                         "nothing was cached for it. Check the teacher and its inputs.")
    if spec.kind == "dense":
        stored = logits.to(spec.value_dtype)
        if not torch.isfinite(stored).all():
            raise ValueError(f"the teacher's logits for sample {sample_id} overflow {spec.dtype} "
                             f"(largest |logit| {z.abs().max().item():.4g}); use dtype=bfloat16.")
        out["pos.logits"] = stored.cpu()
    else:
        log_p = z.log_softmax(-1)
        fold = spec.fold_vocab if spec.fold_vocab is not None and spec.fold_vocab < z.shape[-1] else None
        if fold is not None:
            # The teacher's probability past the student's vocabulary, per position (reported).
            folded = log_p[:, fold:].logsumexp(-1).exp()
            out["stat.folded_mass"] = folded.sum().reshape(1).double().cpu()
            out["stat.folded_max"] = folded.max().reshape(1).double().cpu() if folded.numel() else torch.zeros(1)
        if labels is not None:
            valid = labels != ignore_index
            safe = torch.where(valid, labels, 0).long()
            low, high = (int(safe.min()), int(safe.max())) if safe.numel() else (0, 0)
            if low < 0 or high >= z.shape[-1]:
                bad = low if low < 0 else high
                raise ValueError(
                    f"sample {sample_id} ({split}) has label id {bad} outside the teacher's {z.shape[-1]} output "
                    f"classes, so the teacher cannot score it; mark such positions with ignore_index "
                    f"({ignore_index}) or use a teacher whose vocabulary covers the labels."
                )
            label_lp = log_p.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
            out["pos.label_logprobs"] = torch.where(valid, label_lp, 0.0).to(torch.float16).cpu()
        else:
            out["pos.label_logprobs"] = torch.zeros(z.shape[0], dtype=torch.float16)
        if spec.kind == "topk":
            # Folded: the top k among the student's ids; the ids past them join the tail bucket.
            head = log_p if fold is None else log_p[:, :fold]
            k = min(int(spec.k), head.shape[-1])
            top_lp, top_ids = head.topk(k, dim=-1)
            rest = log_p.scatter(-1, top_ids, float("-inf"))
            out["pos.topk_ids"] = top_ids.to(spec.id_dtype).cpu()
            out["pos.topk_logprobs"] = top_lp.to(torch.float16).cpu()
            out["pos.tail_logprob"] = torch.logsumexp(rest, -1).to(torch.float16).cpu()
        else:
            generator = _sample_generator(spec, split, sample_id, z.device)
            if fold is not None:  # draws from the teacher renormalised over the student's ids
                z = z[:, :fold]
                log_p = z.log_softmax(-1)
            log_probs = (z / spec.sample_temperature).log_softmax(-1)
            probs = log_probs.exp()
            entropy = -torch.where(probs > 0, probs * log_probs, 0.0).sum(-1)
            out["pos.entropy"] = entropy.to(torch.float16).cpu()
            draws = torch.multinomial(probs, int(spec.num_samples), replacement=True, generator=generator)
            ids, counts, per_row = _unique_counts(draws)
            rows = torch.repeat_interleave(torch.arange(z.shape[0], device=z.device), per_row)
            out["pos.num_entries"] = per_row.to(spec.count_dtype).cpu()
            out["ent.ids"] = ids.to(spec.id_dtype).cpu()
            out["ent.counts"] = counts.to(spec.count_dtype).cpu()
            if spec.store_logprobs:
                out["ent.logprobs"] = log_p[rows, ids].to(torch.float16).cpu()
            out["pos.top1"] = z.argmax(-1).to(spec.id_dtype).cpu()
    for layer, states in zip(spec.hidden_layers, hidden or [], strict=False):
        out[f"pos.hidden.{layer}"] = states.to(spec.value_dtype).cpu()
    return out


def encode_topk_logprobs(spec: CacheSpec, top_ids: Tensor, top_logprobs: Tensor,
                         label_logprobs: Tensor) -> dict[str, Tensor]:
    """The tensors a ``topk`` shard stores for one sample, from log-probabilities read elsewhere
    (a served teacher's top-k) instead of logits: the same names, dtypes and tail bucket as
    :func:`encode_sample`.

    Args:
        spec: a ``topk`` spec; ``top_ids`` must have ``spec.k`` columns (or ``V`` when ``k > V``).
        top_ids: ``(L, k)`` the most likely ids at each position, most likely first.
        top_logprobs: ``(L, k)`` their log-probabilities (temperature 1).
        label_logprobs: ``(L,)`` the label's log-probability at each position (0 where none).

    The tail bucket is ``log(1 - sum(exp(top_logprobs)))``, computed in float64; ``-inf`` when the
    top-k hold all the mass (as :func:`encode_sample` stores when ``k = V``).
    """
    lp = top_logprobs.double()
    rest = 1.0 - lp.exp().sum(-1)
    tail = torch.where(rest > 0, torch.log(rest.clamp_min(1e-300)), float("-inf"))
    return {
        "pos.label_logprobs": label_logprobs.to(torch.float16).cpu(),
        "pos.topk_ids": top_ids.to(spec.id_dtype).cpu(),
        "pos.topk_logprobs": lp.to(torch.float16).cpu(),
        "pos.tail_logprob": tail.to(torch.float16).cpu(),
    }


class LoadedShard:
    """A shard's tensors in memory, with the offsets that find a sample's positions and entries."""

    def __init__(self, tensors: dict[str, Tensor]) -> None:
        self.tensors = tensors
        lengths = tensors["sample.lengths"].to(torch.int64)
        self._offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
        self.pos_offsets = self._offsets.tolist()
        # Every sample as long as the first (fixed-length blocks): positions by arithmetic.
        self._length = int(lengths[0]) if lengths.numel() and bool((lengths == lengths[0]).all()) else None
        if "pos.num_entries" in tensors:
            self._pad_entries(tensors)
        # One value per position: widened once here (a few bytes a position next to the padded
        # entries), so a batch read copies them without a conversion pass.
        for name in ("pos.label_logprobs", "pos.entropy", "pos.tail_logprob"):
            if name in tensors:
                tensors[name] = tensors[name].float()
        if "pos.top1" in tensors:
            tensors["pos.top1"] = tensors["pos.top1"].to(torch.int64)

    def _pad_entries(self, tensors: dict[str, Tensor]) -> None:
        """Ragged sampled entries -> ``(P, K_max)`` rows (id -1, count 0 at padding), once per load,
        so reading a batch is row slicing. Memory: about ``K_max / mean entries`` times the ragged
        size (the LRU of loaded shards bounds it)."""
        per_pos = tensors.pop("pos.num_entries").to(torch.int64)
        n_pos = per_pos.numel()
        width = max(int(per_pos.max()), 1) if n_pos else 1
        row = torch.repeat_interleave(torch.arange(n_pos), per_pos)
        col = torch.arange(row.numel()) - (per_pos.cumsum(0) - per_pos)[row]
        ids = torch.full((n_pos, width), -1, dtype=torch.int32)
        ids[row, col] = tensors.pop("ent.ids").to(torch.int32)
        counts = torch.zeros((n_pos, width), dtype=tensors["ent.counts"].dtype)
        counts[row, col] = tensors.pop("ent.counts")
        tensors["pos.entry_ids"], tensors["pos.entry_counts"] = ids, counts
        if "ent.logprobs" in tensors:
            logprobs = torch.zeros((n_pos, width), dtype=torch.float16)
            logprobs[row, col] = tensors.pop("ent.logprobs")
            tensors["pos.entry_logprobs"] = logprobs

    @property
    def sample_ids(self) -> Tensor:
        return self.tensors["sample.ids"]

    def lengths_of(self, rows: list[int]) -> list[int]:
        """The number of stored positions of each of ``rows``."""
        offsets = self.pos_offsets
        return [offsets[r + 1] - offsets[r] for r in rows]

    def take(self, rows: list[int]) -> dict[str, Tensor]:
        """The ``pos.*`` tensors of several samples (``rows`` of this shard, in that order), their
        positions one after another: one ``index_select`` per tensor, however many samples.
        Always copies (a batch's targets never alias the loaded shard)."""
        if self._length is not None:  # NumPy arithmetic: microseconds, not tensor dispatches
            index = np.asarray(rows, dtype=np.int64)
            positions = torch.from_numpy((index[:, None] * self._length + np.arange(self._length)).reshape(-1))
        else:
            index = torch.tensor(rows, dtype=torch.int64)
            starts, lengths = self._offsets[index], self._offsets[index + 1] - self._offsets[index]
            total = int(lengths.sum())
            # Position p of the batch lies in sample b at starts[b] + (p - first[b]).
            first = lengths.cumsum(0) - lengths
            positions = torch.arange(total) + torch.repeat_interleave(starts - first, lengths, output_size=total)
        return {name: _index_select(t, positions) for name, t in self.tensors.items() if name.startswith("pos.")}


_SIGNED_TWIN = {torch.uint16: torch.int16, torch.uint32: torch.int32, torch.uint64: torch.int64}


def _index_select(tensor: Tensor, index: Tensor) -> Tensor:
    """``tensor.index_select(0, index)``, also for the unsigned id types ``index_select`` lacks
    (selected through a same-width signed view: the bits are copied as they are)."""
    twin = _SIGNED_TWIN.get(tensor.dtype)
    if twin is None:
        return tensor.index_select(0, index)
    return tensor.view(twin).index_select(0, index).view(tensor.dtype)


def _pad_positions(flat: Tensor, lengths: list[int], width: int, fill: float | int) -> Tensor:
    """``(sum L, ...)`` rows of B samples -> ``(B, width, ...)``, positions past a length = fill."""
    batch = len(lengths)
    if all(n == width for n in lengths):
        return flat.reshape(batch, width, *flat.shape[1:])
    out = flat.new_full((batch, width, *flat.shape[1:]), fill)
    starts = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    for b, n in enumerate(lengths):
        out[b, :n] = flat[starts[b] : starts[b] + n]
    return out


def assemble(
    spec: CacheSpec,
    pieces: list[dict[str, Tensor]],
    lengths: list[int],
    position_shape: tuple[int, ...],
    device: torch.device,
) -> TeacherTargets:
    """Batch the stored positions of B samples into :class:`TeacherTargets` shaped like the batch.

    Args:
        spec: the cache's spec.
        pieces: the B samples in batch order, in parts: each a :meth:`LoadedShard.take` of
            consecutive samples of the batch.
        lengths: the stored positions of each of the B samples.
        position_shape: the batch's position shape ``(B, T)`` (or ``(B,)`` for one position
            per sample, as a classifier).
        device: where the targets go.
    """
    width = math.prod(position_shape[1:]) if len(position_shape) > 1 else 1

    def cat(name: str) -> Tensor:
        flat = pieces[0][name] if len(pieces) == 1 else torch.cat([p[name] for p in pieces])
        return flat.to(device, non_blocking=True)

    def shaped(name: str, fill: float | int, dtype: torch.dtype) -> Tensor:
        flat = cat(name).to(dtype)
        padded = _pad_positions(flat, lengths, width, fill)
        return padded.reshape(*position_shape, *flat.shape[1:])

    hidden = tuple(shaped(f"pos.hidden.{layer}", 0.0, torch.float32) for layer in spec.hidden_layers) or None
    layers = tuple(spec.hidden_layers) if hidden is not None else None  # which hidden_states indices they are
    if spec.kind == "dense":
        return TeacherTargets(logits=shaped("pos.logits", 0.0, torch.float32), hidden_states=hidden, hidden_layers=layers)

    label_logprobs = shaped("pos.label_logprobs", 0.0, torch.float32)
    if spec.kind == "topk":
        ids = shaped("pos.topk_ids", -1, torch.int64)
        sparse = SparseTargets(
            kind="topk", ids=ids, logprobs=shaped("pos.topk_logprobs", 0.0, torch.float32),
            vocab_size=spec.target_vocab, tail_logprob=shaped("pos.tail_logprob", 0.0, torch.float32),
            verified=True,
        )
        return TeacherTargets(sparse=sparse, label_logprobs=label_logprobs, top1=ids[..., 0],
                              hidden_states=hidden, hidden_layers=layers)

    # sampled: rows of (K_max) entries, padded at load; shards may differ in K_max.
    width_k = max(p["pos.entry_ids"].shape[-1] for p in pieces)

    def entries(name: str, fill: float | int, dtype: torch.dtype) -> Tensor:
        parts = [p[name] if p[name].shape[-1] == width_k else
                 torch.nn.functional.pad(p[name].to(dtype), (0, width_k - p[name].shape[-1]), value=fill)
                 for p in pieces]
        flat = (parts[0] if len(parts) == 1 else torch.cat(parts)).to(device, non_blocking=True).to(dtype)
        return _pad_positions(flat, lengths, width, fill).reshape(*position_shape, width_k)

    logprobs = entries("pos.entry_logprobs", 0.0, torch.float32) if spec.store_logprobs else None
    sparse = SparseTargets(
        kind="sampled", ids=entries("pos.entry_ids", -1, torch.int64), logprobs=logprobs,
        vocab_size=spec.target_vocab, counts=entries("pos.entry_counts", 0, torch.float32),
        num_samples=int(spec.num_samples),
        sample_temperature=float(spec.sample_temperature), verified=True,
        entropy=shaped("pos.entropy", 0.0, torch.float32),
    )
    return TeacherTargets(sparse=sparse, label_logprobs=label_logprobs,
                          top1=shaped("pos.top1", 0, torch.int64), hidden_states=hidden, hidden_layers=layers)
