"""The embedding demo's teacher: an encoder trained once with a contrastive objective, then reused.

An embedding teacher is only worth copying once its embeddings have a geometry: a randomly
initialised encoder has none. :func:`demo_encoder_teacher` trains a BERT-style encoder from a
config on the demo sentences (:class:`~lightning_distill.data.sentences.SentenceDataModule`) with
an InfoNCE objective (:func:`contrastive_loss`: two random crops of a sentence are a positive pair,
the other sentences of the batch the negatives) and stores it with ``save_pretrained`` under
``<cache root>/teachers/<key>`` (the key hashes the model config, the training settings and the
data, as the demo language-model teacher's does); later runs load it in a second.
``teacher=demo_encoder``, ``experiment=demo_embedding`` (docs/relation.md).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["contrastive_loss", "demo_encoder_teacher", "random_crops", "train_contrastive"]

log = logging.getLogger("lightning_distill")


def random_crops(ids: Tensor, mask: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """A random contiguous span of at least half of each row's real tokens (left-aligned, re-padded)."""
    lengths = mask.sum(1)
    out_ids, out_mask = torch.zeros_like(ids), torch.zeros_like(mask)
    for i, n in enumerate(lengths.tolist()):
        keep = max(1, int(n * (0.5 + 0.5 * torch.rand((), generator=g).item())))
        start = int(torch.randint(0, n - keep + 1, (), generator=g))
        out_ids[i, :keep] = ids[i, start : start + keep]
        out_mask[i, :keep] = 1
    return out_ids, out_mask


def contrastive_loss(
    model: nn.Module,
    pool: Callable[..., Tensor],
    batch: Mapping[str, Tensor],
    g: torch.Generator,
    temperature: float = 0.05,
) -> Tensor:
    """InfoNCE between two random crops of each row (the batch's other rows are the negatives).

    Args:
        model: the encoder (called with ``input_ids`` and ``attention_mask``).
        pool: its output function, e.g. :class:`~lightning_distill.models.pooling.Pooling`.
        batch: ``input_ids`` and ``attention_mask``, right-padded.
        g: the generator of the crops.
        temperature: the softmax temperature of the cosine similarities.
    """
    views = []
    for _ in range(2):
        ids, mask = random_crops(batch["input_ids"], batch["attention_mask"], g)
        views.append(
            F.normalize(
                pool(model(input_ids=ids, attention_mask=mask), {"attention_mask": mask}), dim=-1
            )
        )
    logits = views[0] @ views[1].T / temperature
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def train_contrastive(
    model: nn.Module,
    pool: Callable[..., Tensor],
    batches: Callable[[], Iterable[Any]],
    *,
    steps: int,
    lr: float,
    seed: int,
    temperature: float = 0.05,
) -> nn.Module:
    """``steps`` AdamW steps of :func:`contrastive_loss`; returns the model in eval mode.

    Args:
        model: the encoder to train.
        pool: its output function (e.g. ``Pooling("mean")``).
        batches: called once per epoch, returns that epoch's batches (``input_ids``, ``attention_mask``).
        steps: optimizer steps in all.
        lr: AdamW's learning rate.
        seed: seeds the crops.
        temperature: the softmax temperature of the cosine similarities.
    """
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    step = 0
    while step < steps:
        for batch in batches():
            loss = contrastive_loss(model, pool, batch, g, temperature)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step >= steps:
                break
    return model.eval()


def demo_encoder_teacher(
    model: dict[str, Any],
    *,
    datamodule: Any,
    steps: int = 200,
    lr: float = 1e-3,
    batch_size: int = 64,
    temperature: float = 0.05,
    pooling: str = "mean",
    seed: int = 1,
    cache_dir: str | None = None,
) -> nn.Module:
    """Load the demo encoder teacher from the cache, training it first (contrastively) if it is not there.

    Args:
        model: :func:`~lightning_distill.models.pooling.encoder_from_config` arguments (``model_type``, sizes).
        datamodule: a prepared data module with ``train_dataloader_for`` (the demo sentences); the
            teacher trains on every slice, whatever the student's ``train_slices``.
        steps, lr, batch_size, temperature, seed: the contrastive run.
        pooling: the pooling its embeddings are trained through (``mean``, ``cls``, ...).
        cache_dir: where teachers are stored (default: ``<cache root>/teachers``).

    Returns:
        The teacher (token states, no head), in eval mode.

    Raises:
        ValueError: ``steps`` < 1.
    """
    from transformers import AutoModel

    from lightning_distill.demo import store_teacher, teacher_cache_dir
    from lightning_distill.models.pooling import Pooling, encoder_from_config

    if steps < 1:
        raise ValueError(f"teacher steps must be >= 1, got {steps}.")
    model = dict(model)
    training = {
        "objective": "contrastive",
        "steps": steps,
        "lr": lr,
        "batch_size": batch_size,
        "temperature": temperature,
        "pooling": pooling,
        "seed": seed,
    }
    target = teacher_cache_dir(model, training, datamodule.data_fingerprint, cache_dir)
    extra = {"add_pooling_layer": False} if model.get("model_type", "bert") == "bert" else {}
    if (target / "config.json").is_file():
        log.info("Loading the demo encoder teacher from %s", target)
        return AutoModel.from_pretrained(target, **extra).eval()

    print(
        f"Training the demo encoder teacher once ({steps} contrastive steps); it will be stored in {target}"
    )
    kwargs = dict(model)
    teacher = encoder_from_config(kwargs.pop("model_type", "bert"), seed=seed, **kwargs)
    epochs = itertools.count(seed)  # another shuffle each epoch
    with torch.random.fork_rng(devices=[]):  # the caller's seed stream stays as it was
        torch.manual_seed(seed)
        train_contrastive(
            teacher,
            Pooling(pooling),
            lambda: datamodule.train_dataloader_for(
                slices=None, batch_size=batch_size, seed=next(epochs)
            ),
            steps=steps,
            lr=lr,
            seed=seed,
            temperature=temperature,
        )
    store_teacher(teacher, target, {"model": model, "training": training, "data": datamodule.data_fingerprint})
    return teacher.eval()
