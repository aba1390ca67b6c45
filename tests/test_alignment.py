"""``alignment``: the one place that decides which label scores which logit."""

from __future__ import annotations

import pytest
import torch

from lightning_distill import DistillationModule
from lightning_distill.alignment import align_labels, split_batch, valid_positions
from lightning_distill.models import causal_lm_from_config


def test_valid_positions_count_what_evaluation_scores():
    student = causal_lm_from_config("llama", vocab_size=32, hidden_size=16, intermediate_size=32,
                                    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                    max_position_embeddings=16, seed=0)
    module = DistillationModule(student)
    ids = torch.randint(0, 32, (3, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # padding: not scored without labels
    labels = ids.clone()
    labels[2, :3] = -100  # a prompt: not scored
    for batch in ({"input_ids": ids, "attention_mask": mask, "labels": labels},
                  {"input_ids": ids, "attention_mask": mask}):
        counts = valid_positions(batch, shift_labels=module.shift_labels, ignore_index=module.ignore_index)
        assert torch.equal(counts, module.evaluate_batch(batch)["tokens"])
    assert valid_positions({"input_ids": ids, "attention_mask": mask}, shift_labels=True).tolist() == [7, 4, 7]
    assert valid_positions({"input_ids": ids, "labels": labels}, shift_labels=True).tolist() == [7, 7, 5]


def test_bad_batches_and_shapes_are_named():
    with pytest.raises(TypeError, match="got tuple of length 3"):
        split_batch((1, 2, 3))
    labels = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match=r"labels of shape \(2, 4\) do not match"):
        align_labels(labels[:, :4], {}, torch.zeros(2, 5, 7), shift_labels=False)
    assert align_labels(labels, {}, torch.zeros(2, 5, 7), shift_labels=True)[:, -1].eq(-100).all()
    with pytest.raises(ValueError, match="no labels or input_ids"):
        valid_positions({"attention_mask": labels}, shift_labels=True)
