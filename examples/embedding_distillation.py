"""Embedding distillation: an encoder teacher's geometry copied into a smaller encoder.

An embedding model is judged by which sentences it puts near which. This example

1. cuts the demo corpus into sentences, in two slices: ``prose`` (pydoc's English reference
   text) and ``code`` (lines of the standard library's sources);
2. trains a BERT-style teacher from a config (``conf/teacher/hf_encoder.yaml``) for 200
   steps with a contrastive objective (two random crops of a sentence are a positive pair, the rest
   of the batch negatives), so its mean-pooled embeddings have a geometry worth copying; the
   teacher is cached and reused by the next run;
3. distils it into an encoder half as wide (``conf/student/hf_encoder.yaml``) with
   the embedding + relation losses of ``conf/loss/embedding.yaml`` (cosine to the teacher's
   embedding through a learned projector, and RKD distance) plus similarity-preserving KD
   (``conf/loss/similarity_preserving.yaml``), through ``DistillationModule`` and a Lightning Trainer;
4. prints, per slice, how well each student's pairwise cosine similarities agree with the
   teacher's (Spearman over all pairs of held-out sentences, ``CoverageSlices(metric="similarity")``)
   for the distilled student, the same student trained as long with the teacher's own objective
   but no teacher (the no-teacher baseline), and the untrained student.

    python examples/embedding_distillation.py               # ~1 minute on 2 cores (teacher included)
    python examples/embedding_distillation.py --steps 40    # quick check
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import tempfile
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from lightning_distill import DistillationModule
from lightning_distill.callbacks import CoverageSlices
from lightning_distill.cli import CONFIG_DIR
from lightning_distill.data.sentences import sentence_pools
from lightning_distill.data.tokenizer import train_bpe_tokenizer
from lightning_distill.demo_embedding import train_contrastive as contrastive
from lightning_distill.paths import cache_root
from lightning_distill.reporting import markdown_table

SLICES = ("prose", "code")
MAX_TOKENS = 24
TEACHER_LR, TEACHER_BATCH = 1e-3, 64


# ---------------------------------------------------------------------- data
def sentences(per_slice_train: int, per_slice_eval: int, seed: int = 0) -> tuple[list, list]:
    """``(train, eval)`` lists of ``(text, slice)``: prose sentences and code lines, deduplicated."""
    pools = sentence_pools(code_bytes=300_000)  # the library's cut (data=demo_sentences uses it too)
    rng = random.Random(seed)
    train, held_out = [], []
    for name in SLICES:
        pool = pools[name]
        rng.shuffle(pool)
        held_out += [(t, name) for t in pool[:per_slice_eval]]
        train += [(t, name) for t in pool[per_slice_eval:per_slice_eval + per_slice_train]]
    rng.shuffle(train)
    return train, held_out


def loader(rows: list, tokenizer, batch_size: int, shuffle: bool = False) -> DataLoader:
    def collate(batch):
        enc = tokenizer([t for t, _ in batch], padding=True, truncation=True, max_length=MAX_TOKENS,
                        return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "slice": [name for _, name in batch]}

    return DataLoader(rows, batch_size=batch_size, shuffle=shuffle, collate_fn=collate,
                      generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------- the teacher's own objective
def train_contrastive(model, pool, rows, tokenizer, *, steps: int, lr: float, batch_size: int, seed: int):
    """InfoNCE over two random crops of each sentence (``lightning_distill.demo_embedding``, which trains
    the teacher of ``experiment=demo_embedding`` the same way)."""
    torch.manual_seed(seed)
    return contrastive(model, pool, lambda: loader(rows, tokenizer, batch_size, shuffle=True), steps=steps, lr=lr,
                       seed=seed)


def cached_teacher(cfg, pool, rows, tokenizer, steps: int):
    """The contrastively trained teacher, from ``<cache>/examples/embedding-teacher-<key>`` when it is there."""
    from transformers import AutoModel

    key_source = {"model": OmegaConf.to_container(cfg.teacher, resolve=True), "steps": steps, "lr": TEACHER_LR, "batch": TEACHER_BATCH, "tokens": MAX_TOKENS,
                  "data": hashlib.sha256("\n".join(t for t, _ in rows).encode()).hexdigest(), "format": 1}
    key = hashlib.sha256(json.dumps(key_source, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = cache_root() / "examples" / f"embedding-teacher-{key}"
    if (path / "config.json").is_file():
        return AutoModel.from_pretrained(path, local_files_only=True, add_pooling_layer=False).eval(), True
    teacher = hydra.utils.instantiate(cfg.teacher)
    train_contrastive(teacher, pool, rows, tokenizer, steps=steps, lr=TEACHER_LR,
                      batch_size=TEACHER_BATCH, seed=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent))  # written whole, then renamed into place
    teacher.save_pretrained(tmp, safe_serialization=True)
    tmp.rename(path)
    return teacher, False


# ---------------------------------------------------------------------- evaluation
def agreement(student, teacher, pool, losses, eval_loader, out_dir: Path) -> dict[str, dict]:
    """Per-slice rows of ``CoverageSlices(metric="similarity")`` for ``student`` against ``teacher``."""
    module = DistillationModule(student, teacher, losses, student_logits_fn=pool, teacher_logits_fn=pool)
    coverage = CoverageSlices(slices=list(SLICES), metric="similarity", min_retention=0.5, dirpath=out_dir)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", callbacks=[coverage])
    trainer.test(module, eval_loader, verbose=False)
    return {r["slice"]: r for r in coverage.last_rows}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200, help="student training steps (distilled and baseline)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--teacher-steps", type=int, default=200, help="contrastive steps of the teacher")
    parser.add_argument("--train-per-slice", type=int, default=2000, help="training sentences per slice")
    parser.add_argument("--eval-per-slice", type=int, default=200, help="held-out sentences per slice")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy machine)")
    parser.add_argument("--out", type=Path, default=Path("outputs/embedding_distillation"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    L.seed_everything(0, verbose=False)
    start = time.time()

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="distill", overrides=[
            "student=hf_encoder", "teacher=hf_encoder", "loss=embedding", "pooling=mean",
            f"data.seq_len={MAX_TOKENS}", "output_dir=unused"])
        sp = compose(config_name="distill", overrides=["loss=similarity_preserving", "output_dir=unused"]).loss
    train_rows, eval_rows = sentences(per_slice_train=args.train_per_slice, per_slice_eval=args.eval_per_slice)
    docs_text = [t for t, _ in train_rows]
    tokenizer = train_bpe_tokenizer(docs_text, cfg.data.vocab_size, cache_root() / "data")
    pool = hydra.utils.instantiate(cfg.pooling)
    eval_loader = loader(eval_rows, tokenizer, 100)

    teacher, cached = cached_teacher(cfg, pool, train_rows, tokenizer, args.teacher_steps)
    print(f"teacher: {sum(p.numel() for p in teacher.parameters()) / 1e6:.2f}M parameters, "
          f"{'from the cache' if cached else f'trained for {args.teacher_steps} contrastive steps'} "
          f"({time.time() - start:.0f} s)")

    losses = {**{n: hydra.utils.instantiate(t) for n, t in cfg.loss.items()},
              **{n: hydra.utils.instantiate(t, weight=10.0) for n, t in sp.items()}}
    print("loss terms:", "; ".join(f"{n}: {t.config()}" for n, t in losses.items()))

    untrained = hydra.utils.instantiate(cfg.student)
    rows_untrained = agreement(untrained, teacher, pool, losses, eval_loader, args.out / "untrained")

    # Distil: the student learns the teacher's embedding geometry.
    L.seed_everything(0, verbose=False)  # the same run whether the teacher was trained now or cached
    student = hydra.utils.instantiate(cfg.student)
    module = DistillationModule(student, teacher, losses, student_logits_fn=pool, teacher_logits_fn=pool,
                                optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    coverage = CoverageSlices(slices=list(SLICES), metric="similarity", min_retention=0.5, dirpath=args.out)
    trainer = L.Trainer(max_steps=args.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", callbacks=[coverage],
                        limit_val_batches=0, default_root_dir=args.out)
    trainer.fit(module, loader(train_rows, tokenizer, args.batch_size, shuffle=True))
    trainer.test(module, eval_loader, verbose=False)
    rows_distilled = {r["slice"]: r for r in coverage.last_rows}
    print(f"distilled: {args.steps} steps ({time.time() - start:.0f} s)")

    # The no-teacher baseline: the same student, as many steps of the teacher's own objective.
    baseline = train_contrastive(hydra.utils.instantiate(cfg.student), pool, train_rows, tokenizer,
                                 steps=args.steps, lr=1e-3, batch_size=args.batch_size, seed=0)
    rows_baseline = agreement(baseline, teacher, pool, losses, eval_loader, args.out / "baseline")
    print(f"baseline: {args.steps} steps ({time.time() - start:.0f} s)")

    print("\nSimilarity agreement with the teacher per slice (Spearman of pairwise cosine similarities over "
          "every pair of held-out sentences; 1.0 = the teacher's order):")
    table = [[name, str(rows_distilled[name]["samples"]), f"{rows_distilled[name]['retention']:.3f}",
              f"{rows_baseline[name]['retention']:.3f}", f"{rows_untrained[name]['retention']:.3f}",
              "GAP" if rows_distilled[name]["gap"] else ""] for name in SLICES]
    print(markdown_table(["slice", "eval sentences", "distilled", "no-teacher baseline", "untrained", "gap"], table))
    print(f"\ncoverage report: {args.out / 'coverage.md'}; finished in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
