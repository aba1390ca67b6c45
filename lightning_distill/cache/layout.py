"""Where a batch's targets sit: the positions stored per sample, and the per-sample token hash.

Samples are found by their stable id (:func:`dataset_sample_ids`). A split's ``layout.json`` says how its samples were laid out at build time:

* ``tokens`` (a causal LM): one target per input position up to the attention mask's length;
  the hash covers those positions' input ids;
* ``sample`` (a classifier): one target per sample; the hash covers the whole model input;
* ``decoder`` (an encoder-decoder): one target per decoder position up to the last scored
  label; the hash covers the model input and the decoder's labels;
* ``teacher_tokens`` (a cross-tokenizer run: the teacher reads its own ``teacher_input_ids``):
  one target per teacher position up to ``teacher_attention_mask``'s length; the hash covers
  those teacher ids (the builder and ``TeacherCache.attach`` handle this layout themselves).

The builder uses these to write a batch, the callback to read one back with the same hashes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_distill.cache.fingerprint import token_hash

__all__ = ["dataset_sample_ids", "decoder_lengths", "decoder_tokens", "positions", "sample_hashes"]


def decoder_tokens(batch: Mapping[str, Any]) -> Tensor | None:
    """An encoder-decoder batch's decoder-side tokens: its labels, else its ``decoder_input_ids``."""
    for key in ("labels", "decoder_input_ids"):
        value = batch.get(key)
        if isinstance(value, Tensor) and value.dim() >= 2:
            return value
    return None


def decoder_lengths(batch: Mapping[str, Any], logits: Tensor, n: int, ignore_index: int) -> Tensor:
    """Decoder positions to store per sample: up to the last scored label (labels padded with
    ``ignore_index``), else the ``decoder_attention_mask``'s length, else every position."""
    width = logits.shape[1] if logits.dim() >= 3 else 1
    labels = batch.get("labels")
    if isinstance(labels, Tensor) and labels.dim() == 2 and labels.shape[1] == width:
        scored = torch.arange(1, width + 1, device=labels.device) * (labels != ignore_index)
        return scored.max(-1).values.clamp_min(1).to("cpu", torch.int64)
    mask = batch.get("decoder_attention_mask")
    if isinstance(mask, Tensor) and mask.dim() == 2 and mask.shape[1] == width:
        return mask.sum(-1).clamp_min(1).to("cpu", torch.int64)
    return torch.full((n,), width, dtype=torch.int64)


def _kept_tokens(ids: Tensor, mask: Any) -> tuple[Tensor, Tensor]:
    """Each row's tokens where ``mask`` is set, moved to the front, and how many there are
    (so padding, left or right, and the padded width do not change a sample's hash)."""
    ids = ids.reshape(ids.shape[0], -1)
    if not isinstance(mask, Tensor) or mask.shape != ids.shape:
        return ids, torch.full((ids.shape[0],), ids.shape[1], dtype=torch.int64)
    pad = (mask == 0).to(torch.int8)
    order = torch.sort(pad, dim=-1, stable=True).indices
    return ids.gather(-1, order), (pad == 0).sum(-1)


def sample_hashes(batch: Mapping[str, Any], input_key: str, layout: Mapping[str, str], lengths: Tensor) -> Tensor:
    """Each sample's token hash, as its cache split stores it (``layout.json``'s ``hash``).

    ``tokens`` layout: the input ids of the stored positions. ``hash: inputs``: the whole model
    input (the ids its attention mask keeps), and for an encoder-decoder also the decoder's
    labels up to the stored positions, so a changed source *or* target is caught.
    """
    ids = batch[input_key]
    if layout.get("hash") != "inputs":
        return token_hash(ids, lengths)
    kept, count = _kept_tokens(ids, batch.get("attention_mask"))
    hashes = token_hash(kept, count)
    decoder = decoder_tokens(batch) if layout.get("layout") == "decoder" else None
    if decoder is not None:
        second = token_hash(decoder, lengths)
        halves = [hashes >> 31, hashes & (2**31 - 1), second >> 31, second & (2**31 - 1)]
        hashes = token_hash(torch.stack(halves, -1), torch.full_like(hashes, 4))
    return hashes


def positions(batch: Mapping[str, Any], logits: Tensor, n: int) -> tuple[str, Tensor]:
    """Layout (``tokens`` or ``sample``) and positions to store per sample (right padding only)."""
    if logits.dim() == 2:
        return "sample", torch.ones(n, dtype=torch.int64)
    width = math.prod(logits.shape[1:-1])
    mask = batch.get("attention_mask")
    if isinstance(mask, Tensor) and mask.dim() == 2 and mask.shape[1] == width and logits.dim() == 3:
        lengths = mask.sum(-1).to(torch.int64)
        expected = torch.arange(width, device=mask.device) < lengths.unsqueeze(-1)
        if not torch.equal(mask.bool(), expected):
            raise ValueError("TeacherCache stores each sample's positions up to its attention mask's length and needs "
                             "right-padded batches; this batch has left or inner padding (set the tokenizer's "
                             "padding_side='right').")
        return "tokens", lengths.cpu()
    return "tokens", torch.full((n,), width, dtype=torch.int64)


def dataset_sample_ids(dataset: Any, key: str) -> Tensor:
    """Every sample id of a map-style dataset: its ``sample_ids``, else each item's ``key``.

    Raises:
        ValueError: an iterable dataset, an item without ``key``, or ids that repeat.
    """
    ids = getattr(dataset, "sample_ids", None)
    if ids is not None:
        return torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
    try:
        n = len(dataset)
    except TypeError:
        raise ValueError("TeacherCache needs a map-style dataset (with __len__ and __getitem__); an iterable "
                         "dataset has no stable sample positions.") from None
    out = []
    for i in range(n):
        item = dataset[i]
        if not isinstance(item, Mapping) or key not in item:
            raise ValueError(f"dataset item {i} has no {key!r}; TeacherCache needs a stable per-sample id in each "
                             "item (or a dataset.sample_ids attribute).")
        out.append(int(item[key]))
    ids = torch.tensor(out, dtype=torch.int64)
    if ids.unique().numel() != ids.numel():
        raise ValueError(f"the dataset's {key!r} values are not unique; every sample needs its own id.")
    return ids
