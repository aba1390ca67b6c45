"""Constant vs annealed KD temperature on the demo, at equal steps.

Runs the demo (``conf/distill.yaml``: demo teacher, demo student, ``loss=kd_task``) once per
variant and seed through ``lightning_distill.cli.run``, without the no-teacher baseline, and
prints per-slice test numbers as a markdown table: student and teacher perplexity, retention
(teacher ppl / student ppl), KL(teacher || student) per token at T=1, top-1 agreement.

Variants:
    constant_T1   the default: LogitKD temperature 1 throughout (callbacks=default)
    constant_T2   LogitKD temperature 2 throughout
    cosine_4to1   callbacks=temperature_cosine: T from 4 (first step) to 1 (last step), half cosine
    linear_4to1   callbacks=temperature_linear: T from 4 to 1, linearly
    constant_T4, cosine_2to1: references (--variants ...)

The demo teacher is trained once and cached under the default cache dir (~2 min the first time);
each run then takes ~1-2 minutes on 2 CPU cores::

    python benchmarks/temperature_demo.py                       # 3 variants, seed 0, 300 steps
    python benchmarks/temperature_demo.py --seeds 0 1 --steps 300 --json /tmp/temperature.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

VARIANTS = {
    "constant_T2": ["callbacks=default", "loss.kd.temperature=2.0"],
    "cosine_4to1": ["callbacks=temperature_cosine"],
    "linear_4to1": ["callbacks=temperature_linear"],
    "cosine_2to1": ["callbacks=temperature_cosine", "callbacks.temperature.temperature.start=2.0"],
    "constant_T1": ["callbacks=default"],
    "constant_T4": ["callbacks=default", "loss.kd.temperature=4.0"],
}
COLUMNS = [("student ppl", "student_perplexity", ".2f"), ("teacher ppl", "teacher_perplexity", ".2f"),
           ("retention", "retention", ".4f"), ("KL(t||s)", "mean_kl", ".4f"),
           ("top-1 agree", "agreement_rate", ".4f")]


def run_variant(name: str, seed: int, steps: int, out_root: Path) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from lightning_distill.cli import CONFIG_DIR, run

    overrides = [*VARIANTS[name], f"seed={seed}", f"student.seed={seed}", f"trainer.max_steps={steps}",
                 "baseline=false", "export=false", "+trainer.enable_progress_bar=false",
                 f"output_dir={out_root / f'{name}_seed{seed}'}"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="distill", overrides=overrides)
    # Keep only the schedule (and the LR monitor): evaluation-only callbacks (e.g. per-slice
    # coverage reports) cost time and do not change what is trained.
    with open_dict(cfg):
        for key in [k for k in cfg.callbacks if k not in ("temperature", "lr_monitor")]:
            del cfg.callbacks[key]
    started = time.perf_counter()
    report = run(cfg)
    return {"variant": name, "seed": seed, "steps": steps, "seconds": round(time.perf_counter() - started, 1),
            "slices": report["slices"]}


def _fmt(values: list[float], spec: str) -> str:
    if len(values) == 1:
        return format(values[0], spec)
    return f"{format(statistics.mean(values), spec)} ± {format(statistics.stdev(values), spec)}"


def table(results: list[dict]) -> str:
    """One row per (slice, variant); with several seeds: mean ± sample std over seeds."""
    variants = list(dict.fromkeys(r["variant"] for r in results))
    slices = list(dict.fromkeys(s for r in results for s in r["slices"]))
    header = ["slice", "variant", *(c[0] for c in COLUMNS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for slice_name in slices:
        for variant in variants:
            runs = [r["slices"][slice_name] for r in results if r["variant"] == variant]
            cells = [_fmt([float(s[key]) for s in runs], spec) for _, key, spec in COLUMNS]
            lines.append("| " + " | ".join([slice_name, variant, *cells]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["constant_T2", "cosine_4to1", "linear_4to1"],
                        choices=sorted(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--json", type=Path, default=None,
                        help="write the raw results here; runs already in it are reused")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # With --json, runs already in that file (same variant, seed and steps) are kept, not rerun.
    done = json.loads(args.json.read_text()) if args.json is not None and args.json.is_file() else []
    results = []
    with tempfile.TemporaryDirectory(prefix="temperature_demo_") as tmp:
        for seed in args.seeds:
            for name in args.variants:
                old = [r for r in done if (r["variant"], r["seed"], r["steps"]) == (name, seed, args.steps)]
                results.append(old[0] if old else run_variant(name, seed, args.steps, Path(tmp)))
                if args.json is not None:
                    keep = [r for r in done if r not in results]
                    args.json.write_text(json.dumps(keep + results, indent=2))
    print(f"\nDemo, {args.steps} optimizer steps per run, seeds {args.seeds}, test split "
          f"(KL(t||s) and agreement at T=1; ppl = exp(mean NLL)):\n")
    print(table(results))
    seconds = [r["seconds"] for r in results]
    print(f"\n{len(results)} runs, {math.fsum(seconds):.0f} s in all")


if __name__ == "__main__":
    main()
