"""Cross-tokenizer distillation with the Python API: a teacher and a student that tokenize differently.

The teacher reads the demo corpus in a byte-level BPE of ``--teacher-vocab`` tokens, the student in
one of ``--student-vocab`` tokens trained on the same text. ``CrossTokenizerDataModule`` puts both
tokenizations of each block in the batch with their alignment (tokens grouped by common character
boundaries); ``CrossTokenizerKD`` compares the two next-token distributions at every group (a KL
over the shared vocabulary with merged group probabilities, plus ULD for the rest). Retention is
reported in bits per byte, the one unit both models share. See docs/cross_tokenizer.md.

    python examples/cross_tokenizer.py                   # ~2 minutes on 2 cores
    python examples/cross_tokenizer.py --steps 20 --small  # quick check
"""

from __future__ import annotations

import argparse
import functools

import lightning as L
import torch

from lightning_distill import DistillationModule
from lightning_distill.data import CrossTokenizerDataModule
from lightning_distill.evaluation import evaluate_slices, format_slice_table
from lightning_distill.losses import CrossTokenizerKD, TaskLoss
from lightning_distill.models import causal_lm_from_config


def llama(vocab: int, hidden: int, layers: int, seq_len: int, seed: int) -> torch.nn.Module:
    return causal_lm_from_config("llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden,
                                 num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                                 max_position_embeddings=seq_len, seed=seed)


def fit(module: DistillationModule, data: L.LightningDataModule, steps: int) -> None:
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_model_summary=False,
                        enable_progress_bar=False, num_sanity_val_steps=0,
                        limit_val_batches=0, gradient_clip_val=1.0)
    trainer.fit(module, datamodule=data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--teacher-steps", type=int, default=300)
    parser.add_argument("--teacher-vocab", type=int, default=2048)
    parser.add_argument("--student-vocab", type=int, default=1024)
    parser.add_argument("--small", action="store_true", help="a small corpus and short blocks")
    args = parser.parse_args()
    torch.set_num_threads(2)
    L.seed_everything(0, verbose=False)
    size = {"code_bytes": 40_000, "prose_bytes": 40_000, "seq_len": 48} if args.small else {"seq_len": 96}
    data = CrossTokenizerDataModule(vocab_size=args.student_vocab, teacher_vocab_size=args.teacher_vocab,
                                    batch_size=16, **size)
    data.prepare_data()
    data.setup()
    seq_len = data.seq_len
    adam = functools.partial(torch.optim.AdamW, lr=3e-3, weight_decay=0.01)

    # 1. A teacher in its own tokenizer, trained on the same corpus (a plain LM run on its tokens).
    teacher = llama(args.teacher_vocab, 96, 3, seq_len, seed=1)
    fit(DistillationModule(teacher, None, {"task": TaskLoss()}, optimizer=adam), data.teacher_datamodule,
        args.teacher_steps)

    # 2. The student, in the other tokenizer: KD across tokenizers plus the hard labels.
    student = llama(args.student_vocab, 48, 2, seq_len, seed=0)
    losses = {"kd": CrossTokenizerKD("forward_kl", weight=0.5), "task": TaskLoss(weight=0.5)}
    module = DistillationModule(student, teacher, losses, optimizer=adam)
    fit(module, data, args.steps)
    stats = evaluate_slices(module, data.test_dataloader())

    # 3. The same student without the teacher, same steps: what the teacher added.
    base = DistillationModule(llama(args.student_vocab, 48, 2, seq_len, seed=0), None, {"task": TaskLoss()},
                              optimizer=adam)
    fit(base, data, args.steps)
    baseline = evaluate_slices(base, data.test_dataloader())
    print(format_slice_table(stats, baseline))
    for name, s in stats.items():
        print(f"{name}: student {s.student_bits_per_byte:.3f} bpb, teacher {s.teacher_bits_per_byte:.3f} bpb, "
              f"no-teacher {baseline[name].student_bits_per_byte:.3f} bpb")


if __name__ == "__main__":
    main()
