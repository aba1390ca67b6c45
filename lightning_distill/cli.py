"""The ``lightning-distill`` command: compose -> instantiate -> fit -> report -> export.

``lightning-distill`` with no arguments runs the demo on its embedded defaults. Everything in
``conf/`` can be overridden on the command line, Hydra style::

    lightning-distill loss.kd.temperature=4 trainer.max_steps=200
    lightning-distill loss=gkd student.hidden_size=64
    lightning-distill -m loss.kd.temperature=1,2,4     # one output dir per job
    lightning-distill --cfg job                        # print the composed config
    lightning-distill experiment=demo_cached +build_cache_only=true   # only build the teacher cache
    lightning-distill output_dir=outputs/<run> ckpt_path=last          # resume that run
    lightning-distill generate source=demo prompts.run_dir=<run>       # teacher-written data (conf/generate.yaml)
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

__all__ = ["CONFIG_DIR", "main", "run"]

log = logging.getLogger("lightning_distill")


def _config_dir() -> Path:
    """``conf/`` inside the installed package (wheel), else at the repository's top level."""
    packaged = Path(__file__).resolve().parent / "conf"
    if (packaged / "distill.yaml").is_file():
        return packaged
    source = Path(__file__).resolve().parent.parent / "conf"
    if (source / "distill.yaml").is_file():
        return source
    raise FileNotFoundError(
        f"lightning-distill's configs are missing (looked in {packaged} and {source}); reinstall the package."
    )


CONFIG_DIR = _config_dir()


def _vocab_size_resolver(path: Any) -> int:
    """``${ld.vocab_size:<tokenizer or model path>}``: what ``student=hf_config`` needs with your data."""
    from lightning_distill.data.text import vocab_size_of

    return vocab_size_of(None if path is None else str(path))


if not OmegaConf.has_resolver("ld.vocab_size"):
    OmegaConf.register_new_resolver("ld.vocab_size", _vocab_size_resolver, use_cache=True)


def _data_tokenizer_resolver(teacher_tokenizer: Any, student_path: Any, teacher_path: Any) -> Any:
    """``${ld.data_tokenizer:<data.teacher_tokenizer>,<student.path>,<teacher.path>}``: the default
    ``data.tokenizer``, the one the student reads: the teacher's (one tokenizer for both), or, with a
    ``data.teacher_tokenizer`` (two tokenizers), the student's own."""
    return teacher_path if teacher_tokenizer is None else student_path


if not OmegaConf.has_resolver("ld.data_tokenizer"):
    OmegaConf.register_new_resolver("ld.data_tokenizer", _data_tokenizer_resolver)


def _accepts(target: str, name: str) -> bool:
    try:
        fn = hydra.utils.get_object(target)
        return name in inspect.signature(fn).parameters
    except (ImportError, AttributeError, TypeError, ValueError):
        return False


def _instantiate(node: Any, **context: Any) -> Any:
    """``hydra.utils.instantiate``, passing ``context`` values only to targets that take them."""
    if node is None or (isinstance(node, Mapping | DictConfig) and not node):
        return None  # an empty group file (teacher=none) means "no object"
    target = node.get("_target_") if isinstance(node, Mapping | DictConfig) else None
    extra = {k: v for k, v in context.items() if target and _accepts(target, k)}
    return hydra.utils.instantiate(node, **extra)


def _build_losses(cfg: DictConfig) -> dict[str, Any]:
    if not cfg:
        raise ValueError("the loss config is empty; pick one with loss=kd_task (or another file in conf/loss/).")
    return {name: hydra.utils.instantiate(term) for name, term in cfg.items() if term is not None}


def _output_dir(cfg: DictConfig) -> Path:
    return Path(cfg.output_dir)


def _make_trainer(cfg: DictConfig, out_dir: Path, *, comparison_only: bool = False):
    """The configured Trainer; ``comparison_only`` drops logger, callbacks and checkpoints."""
    if comparison_only:
        return hydra.utils.instantiate(cfg.trainer, callbacks=[], logger=False, enable_checkpointing=False,
                                       default_root_dir=str(out_dir))
    from lightning_distill.checkpoint import SaveOnInterrupt

    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    callbacks.append(SaveOnInterrupt())  # Ctrl-C: checkpoints/interrupted.ckpt and how to resume
    callbacks.append(_FrozenTeacherNote())
    logger = hydra.utils.instantiate(cfg.logger) if cfg.get("logger") else False
    _drop_unset_wandb_anonymous(logger)
    if logger is False:  # logger=none: a learning-rate monitor has nowhere to write
        from lightning.pytorch.callbacks import LearningRateMonitor

        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    return hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=logger,
                                   default_root_dir=str(out_dir))


def _drop_unset_wandb_anonymous(logger: Any) -> None:
    """Lightning's WandbLogger always passes ``anonymous=None`` to ``wandb.init``, which newer W&B
    answers with "The anonymous setting has no effect" on every run; leave the unset value out."""
    init = getattr(logger, "_wandb_init", None)
    if isinstance(init, dict) and "anonymous" in init and init["anonymous"] is None:
        del init["anonymous"]


class _FrozenTeacherNote(Callback):
    """Silences Lightning's "Found N module(s) in eval mode at the start of training" when those N
    modules are exactly the frozen teacher's (in eval mode by design); any other count still warns."""

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        in_eval = [name for name, m in pl_module.named_modules() if not m.training]
        if in_eval and all(name == "teacher" or name.startswith("teacher.") for name in in_eval):
            warnings.filterwarnings("ignore", message=rf"Found {len(in_eval)} module\(s\) in eval mode at the start")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one distillation job described by ``cfg``; returns the report as plain values.

    The steps, in order: build the objects (data, teacher, student, module, trainer); build the
    teacher cache only, if asked (``+build_cache_only=true``); fit (the TeacherCache callback
    builds or opens its cache at fit start); test per slice; fit and test the no-teacher
    baseline; write the report; export the student.
    """
    import lightning as L
    from torch import nn

    from lightning_distill.callbacks.teacher_cache import TeacherCache
    from lightning_distill.checkpoint import resolve_ckpt_path
    from lightning_distill.embedding_cli import check_embedding_models, embedding_settings
    from lightning_distill.engines import check_strategy_available
    from lightning_distill.losses.terms import check_terms
    from lightning_distill.models.hf import freeze
    from lightning_distill.paths import CACHE_ENV_VAR, cache_root, check_writable

    started = time.perf_counter()
    out_dir = _output_dir(cfg)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), out_dir)  # a missing file fails before any work
    check_writable(out_dir, "output_dir", "pass output_dir=<a folder you can write>, or fix its permissions.")
    check_writable(cache_root(), CACHE_ENV_VAR, f"set {CACHE_ENV_VAR}=<a folder you can write> (tokenizers, "
                   "tokenized data and teacher targets are kept there), or fix its permissions.")
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # terms may draw (a projector's initial weights)
    losses = check_terms(_build_losses(cfg.loss))  # a bad loss value fails before data and models load
    pooling = embedding_settings(cfg, losses)  # embedding terms: pooling set, coverage by similarity
    check_strategy_available(cfg.get("trainer"))  # e.g. trainer=deepspeed_zero3 without deepspeed
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    datamodule = _instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    teacher = _instantiate(cfg.get("teacher"), datamodule=datamodule)
    served = _served_teacher(teacher)  # teacher=served: the cache asks the server, no teacher runs here
    teacher = None if served is not None else teacher
    student = _instantiate(cfg.student, teacher=teacher)  # student=from_teacher is cut from the teacher
    if isinstance(teacher, nn.Module):
        freeze(teacher)  # the configured teacher is frozen by design: no "handed over trainable" warning
    if pooling is not None:
        check_embedding_models(student, teacher)
    module = _build_module(cfg, student, teacher, losses, cached=served is not None, pooling=pooling)
    trainer = _make_trainer(cfg, out_dir)
    cache = next((c for c in trainer.callbacks if isinstance(c, TeacherCache)), None)
    if served is not None:
        if cache is None:
            raise ValueError("teacher=served gives top-k log-probabilities for a teacher cache; add one: "
                             "callbacks=teacher_cache_topk callbacks.teacher_cache.k=20 (docs/blackbox.md).")
        cache.use_served(served)
    if cfg.get("build_cache_only"):
        return _build_cache_only(cache, module, datamodule, started)
    has_teacher = teacher is not None or served is not None
    del teacher, student  # the module holds them; a TeacherCache may release the teacher once cached

    gap_error = _fit(cfg, trainer, module, datamodule, ckpt_path, out_dir)
    report: dict[str, Any] = {"output_dir": str(out_dir)}
    stats, coverage, test_gap = _test(trainer, module, datamodule, cache, report)
    gap_error = test_gap or gap_error
    baseline_stats = None
    if cfg.get("baseline") and has_teacher:
        baseline_stats = _baseline(cfg, module, datamodule, out_dir, report)
    table = _write_report(report, stats, baseline_stats, coverage, out_dir, started)
    if cfg.get("export", True):
        _export(cfg, report, module, datamodule, trainer, stats, coverage, cache, out_dir)
    _print_summary(report, table, baseline_stats, coverage, out_dir)
    _finish_wandb(trainer, failed=gap_error is not None)
    if gap_error is not None:
        raise gap_error  # after everything is saved: the run's exit status says a slice has a gap
    return report


def _served_teacher(teacher: Any) -> Any:
    """``teacher`` when it is a served teacher (``teacher=served``), else ``None``."""
    from lightning_distill.blackbox.served import ServedTeacher

    return teacher if isinstance(teacher, ServedTeacher) else None


def _build_module(cfg: DictConfig, student: Any, teacher: Any, losses: dict[str, Any], *,
                  cached: bool = False, pooling: Any = None) -> Any:
    """The ``DistillationModule`` of ``cfg`` (optimizer, scheduler, ``module:`` settings) for these models;
    ``cached``: no teacher here, its targets come from a teacher cache (``teacher=served``); ``pooling``:
    both models' output function (embedding runs, ``pooling=mean``)."""
    from lightning_distill.module import DistillationModule

    if teacher is None and not cached:
        dropped = [n for n, t in losses.items() if t.requires_teacher]
        if dropped:
            raise ValueError(f"teacher=none but the loss terms {dropped} need a teacher; use loss=task_only.")
    return DistillationModule(
        student, teacher, losses,
        optimizer=hydra.utils.instantiate(cfg.optimizer),
        lr_scheduler=hydra.utils.instantiate(cfg.lr_scheduler) if cfg.get("lr_scheduler") else None,
        **({"student_logits_fn": pooling, "teacher_logits_fn": pooling} if pooling is not None else {}),
        **OmegaConf.to_container(cfg.get("module") or {}, resolve=True),
    )


def _fit(cfg: DictConfig, trainer: Any, module: Any, datamodule: Any, ckpt_path: str | None,
         out_dir: Path) -> Exception | None:
    """Log the config, fit (or resume); returns a coverage-gap error to raise once everything is saved.

    Ctrl-C: Lightning saves ``checkpoints/interrupted.ckpt`` (SaveOnInterrupt); this prints the
    command that resumes the run and exits with 130.
    """
    from lightning_distill.callbacks.coverage import CoverageGapError
    from lightning_distill.checkpoint import SaveOnInterrupt

    resolved = OmegaConf.to_container(cfg, resolve=True)
    for logger in trainer.loggers:
        logger.log_hyperparams(resolved)
    if ckpt_path is not None:
        print(f"Resuming from {ckpt_path}")
    gap_error = None
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except CoverageGapError as error:
        gap_error = error
    except SystemExit:  # Lightning exits after a Ctrl-C it handled
        if not trainer.interrupted:
            raise
        _print_resume(next((c for c in trainer.callbacks if isinstance(c, SaveOnInterrupt)), None), out_dir)
        raise SystemExit(130) from None
    if trainer.interrupted and gap_error is None:
        raise KeyboardInterrupt
    return gap_error


def _test(trainer: Any, module: Any, datamodule: Any, cache: Any,
          report: dict[str, Any]) -> tuple[dict[str, Any], Any, Exception | None]:
    """Score the test set per slice: ``(stats, coverage callback or None, coverage-gap error or None)``.

    With ``CoverageSlices`` the callback scores it (and writes ``coverage.*``) in ``trainer.test``;
    otherwise ``evaluate_slices`` does, reading the teacher cache's test targets where there are some.
    """
    from lightning_distill.callbacks.coverage import CoverageGapError, CoverageSlices
    from lightning_distill.evaluation import evaluate_slices, stats_from_sums

    datamodule.setup("test")
    coverage = next((c for c in trainer.callbacks if isinstance(c, CoverageSlices)), None)
    if coverage is None:
        attach = (functools.partial(cache.attach, "test", module) if cache is not None and "test" in cache.readers
                  else None)
        return evaluate_slices(module, datamodule.test_dataloader(), targets=attach), None, None
    gap_error = None
    try:
        trainer.test(module, datamodule=datamodule, verbose=False)
    except CoverageGapError as error:
        gap_error = error
    from lightning_distill.reporting import effective_metric

    report["coverage"] = {"metric": effective_metric(coverage.metric, coverage.last_sums), "config": coverage.config(),
                          "gaps": [r["slice"] for r in coverage.last_rows if r["gap"]],
                          "slices": coverage.last_rows}
    return stats_from_sums(coverage.last_sums), coverage, gap_error


def _baseline(cfg: DictConfig, module: Any, datamodule: Any, out_dir: Path,
              report: dict[str, Any]) -> dict[str, Any] | None:
    """Train the same student without the teacher, same seed and steps, and score it per slice
    (``None``: skipped, for embedding terms)."""
    import lightning as L

    from lightning_distill.embedding_cli import BASELINE_SKIPPED
    from lightning_distill.evaluation import evaluate_slices

    if module.embedding_output:  # no teacher-free embedding objective to train the student on
        print(BASELINE_SKIPPED)
        report["baseline"] = {"skipped": BASELINE_SKIPPED}
        return None
    log.info("Training the same student without the teacher (baseline) for comparison")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    base_module = _build_module(cfg, _baseline_student(cfg.student, module.student, cfg.seed), None,
                                {"task": hydra.utils.instantiate(cfg.baseline_loss)})
    base_trainer = _make_trainer(cfg, out_dir / "baseline", comparison_only=True)
    base_trainer.fit(base_module, datamodule=datamodule)
    baseline_stats = evaluate_slices(base_module, datamodule.test_dataloader())
    report["baseline"] = {k: v.to_dict() for k, v in baseline_stats.items()}
    return baseline_stats


def _write_report(report: dict[str, Any], stats: Mapping[str, Any], baseline_stats: Mapping[str, Any] | None,
                  coverage: Any, out_dir: Path, started: float) -> str:
    """``report.json`` and ``report.md`` (the per-slice table, which is returned)."""
    from lightning_distill.evaluation import format_slice_table

    coverage_rows = {r["slice"]: r for r in coverage.last_rows} if coverage is not None else None
    if coverage is not None and coverage.metric == "similarity":  # embedding models: agreement, no perplexity
        from lightning_distill.reporting import format_coverage_table

        table, report["slices"] = format_coverage_table(coverage.last_rows, "similarity"), coverage_rows
    else:
        table = format_slice_table(stats, baseline_stats, coverage_rows)
        report["slices"] = {k: v.to_dict() for k, v in stats.items()}
    report["seconds"] = round(time.perf_counter() - started, 1)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    (out_dir / "report.md").write_text(table + "\n")
    return table


def _export(cfg: DictConfig, report: dict[str, Any], module: Any, datamodule: Any, trainer: Any,
            stats: Mapping[str, Any], coverage: Any, cache: Any, out_dir: Path) -> None:
    """Save the student (weights, tokenizer, ``distillation.json``, its card) to ``<run>/student``; log it to W&B."""
    from lightning_distill.embedding_cli import pooling_record
    from lightning_distill.engines import whole
    from lightning_distill.export import distillation_card, export_student
    from lightning_distill.losses.feature_terms import export_modules

    record = {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "teacher": module.teacher_identity,
        "losses": {n: t.config() for n, t in module.losses.items()},
        "data": {"fingerprint": getattr(datamodule, "fingerprint", None)},
        "slices": report["slices"],
    }
    if getattr(datamodule, "generated_lineage", None):
        record["generated_data"] = datamodule.generated_lineage
    if cache is not None:
        record["teacher_cache"] = cache.config()
    student = whole(module.student, root=trainer.strategy.model)  # FSDP/FSDP2: gathered whole, every rank
    card = _card(module, datamodule, trainer, stats, coverage, distillation_card, cache, student=student)
    if pooling_record(module) is not None:  # how to embed with the student
        record["pooling"] = card["pooling"] = pooling_record(module)
    report["student_dir"] = str(export_student(student, out_dir / "student",
                                               tokenizer=getattr(datamodule, "tokenizer", None),
                                               record=record, card=card, extras=export_modules(module.losses)))
    _log_wandb_artifact(trainer, Path(report["student_dir"]), card)


def _print_summary(report: dict[str, Any], table: str, baseline_stats: Any, coverage: Any, out_dir: Path) -> None:
    print(f"\nTest set, per slice (student vs teacher{', and vs no-teacher baseline' if baseline_stats else ''}):")
    print(table)
    if coverage is not None:
        gaps = report["coverage"]["gaps"]
        print(f"Coverage gaps: {', '.join(gaps)} (see {out_dir / 'coverage.md'})" if gaps
              else f"No coverage gap (see {out_dir / 'coverage.md'})")
    if "student_dir" in report:
        print(f"\nStudent saved to {report['student_dir']}")
    print(f"Finished in {report['seconds']} s; report in {out_dir / 'report.md'}")


def _print_resume(saver: Any, out_dir: Path) -> None:
    """After Ctrl-C: where the checkpoint is and the command that resumes the run."""
    from lightning_distill.checkpoint import resume_command

    if saver is None or saver.saved is None:
        print("\nInterrupted; no checkpoint was saved. Resume from another one with ckpt_path=<file.ckpt>.",
              file=sys.stderr)
        return
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except (ImportError, ValueError):
        overrides = sys.argv[1:]
    print(f"\nInterrupted at step {saver.step}; saved {saver.saved}. Resume with:\n  "
          f"{resume_command(overrides, out_dir, saver.saved)}", file=sys.stderr)


def _baseline_student(student_cfg: Any, student: Any, seed: int) -> Any:
    """The no-teacher baseline's student: a student cut from the teacher gets a random init of its architecture."""
    if getattr(getattr(student, "config", None), "derived_from_teacher", None):
        from lightning_distill.models.from_teacher import random_init_like

        return random_init_like(student, seed=seed)
    return _instantiate(student_cfg)


def _build_cache_only(cache: Any, module: Any, datamodule: Any, started: float) -> dict[str, Any]:
    """``+build_cache_only=true``: build (or resume, or verify) the teacher cache, train nothing."""
    if cache is None:
        raise ValueError("build_cache_only=true needs a TeacherCache callback; add one, e.g. "
                         "callbacks=teacher_cache_sampled (or experiment=demo_cached).")
    from lightning_distill.models.adapters import check_data_positions

    check_data_positions(module.student, module.teacher, datamodule)  # the teacher runs here without a Trainer
    splits = cache.build(module, cache.split_loaders(datamodule), tokenizer=getattr(datamodule, "tokenizer", None),
                         data_fingerprint=getattr(datamodule, "data_fingerprint", None),  # one process: no barriers
                         teacher_tokenizer=getattr(datamodule, "teacher_tokenizer", None))
    report = {"teacher_cache": cache.config(), "seconds": round(time.perf_counter() - started, 1)}
    print(f"\nTeacher cache ({cache.kind}) at {cache.storage.url}:")
    print("| split | samples | built now | tokens | bytes/token | MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, info in splits.items():
        print(f"| {name} | {info['samples']} | {info['built']} | {info['positions']} | "
              f"{info['bytes_per_token']:.1f} | {info['bytes'] / 2**20:.1f} |")
    print(f"Finished in {report['seconds']} s")
    return report


def _card(module: Any, datamodule: Any, trainer: Any, stats: Mapping[str, Any], coverage: Any,
          build: Any, cache: Any = None, student: Any = None) -> dict[str, Any]:
    """The distillation card of this run (see ``export.distillation_card``)."""
    if coverage is not None:
        slices = coverage.last_rows
        from lightning_distill.reporting import effective_metric

        cov = {"metric": effective_metric(coverage.metric, coverage.last_sums), "stage": coverage.last_stage,
               "config": coverage.config(),
               "thresholds": {k: coverage.config()[k] for k in ("min_retention", "min_relative_retention",
                                                                "max_gap_to_best")},
               "gaps": [r["slice"] for r in slices if r["gap"]]}
    else:
        from lightning_distill.reporting import card_rows

        slices = card_rows(stats)
        cov = None
    schedules = {}
    for cb in trainer.callbacks:
        if cb is coverage or cb is cache or isinstance(cb, _FrozenTeacherNote) \
                or not type(cb).__module__.startswith("lightning_distill"):
            continue
        getter = getattr(cb, "config", None) or getattr(cb, "state_dict", None)
        if callable(getter):
            schedules[type(cb).__name__] = getter()
    data = {"fingerprint": getattr(datamodule, "fingerprint", None),
            "data_fingerprint": getattr(datamodule, "data_fingerprint", None),
            "train_slices": getattr(datamodule, "train_slices", None)}
    teacher = module.teacher_identity or (cache.config().get("teacher") if cache is not None else None)
    return build(student=module.student if student is None else student, teacher=teacher, data=data, slices=slices,
                 losses={n: t.config() for n, t in module.losses.items()}, schedule=schedules or None,
                 coverage=cov, cache=cache.config() if cache is not None else "live",
                 generated=getattr(datamodule, "generated_lineage", None))


def _wandb_loggers(trainer: Any) -> list[Any]:
    from lightning.pytorch.loggers import WandbLogger

    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


def _log_wandb_artifact(trainer: Any, student_dir: Path, card: dict[str, Any]) -> None:
    """The exported student as a W&B ``model`` artifact whose metadata is the distillation card."""
    loggers = _wandb_loggers(trainer)
    if not loggers:
        return
    import wandb

    for logger in loggers:
        run = logger.experiment
        artifact = wandb.Artifact(name=f"student-{run.id}", type="model", metadata=json.loads(
            json.dumps(card, default=str)), description="distilled student; metadata: its distillation card")
        artifact.add_dir(str(student_dir))
        run.log_artifact(artifact)


def _finish_wandb(trainer: Any, *, failed: bool) -> None:
    for logger in _wandb_loggers(trainer):
        logger.experiment.finish(exit_code=1 if failed else 0)


#: Set to 1 (or HYDRA_FULL_ERROR=1) for the Python traceback of a user error.
DEBUG_ENV = "LIGHTNING_DISTILL_DEBUG"
#: Exit status for a user error: a bad value, a missing file, a stale cache, a vocabulary mismatch.
USER_ERROR_EXIT = 2


def _user_error(error: BaseException) -> bool:
    """Whether ``error`` is the user's to fix (shown as its message) rather than a bug (a traceback)."""
    from hydra.errors import InstantiationException

    if isinstance(error, InstantiationException) and error.__cause__ is not None:
        return _user_error(error.__cause__)
    own = type(error).__module__.startswith("lightning_distill.")  # CacheMismatchError, CheckpointError, ...
    return own or isinstance(error, ValueError | TypeError | FileNotFoundError | InterpolationResolutionError)


def _user_message(error: BaseException) -> str:
    """``Type: message`` of a user error; an error raised while Hydra built a config node is shown as
    its cause, followed by the node (``ValueError: temperature must be ... (config: loss.kd)``)."""
    from hydra.errors import InstantiationException

    if isinstance(error, InstantiationException) and error.__cause__ is not None:
        key = next((line.split(":", 1)[1].strip() for line in str(error).splitlines()
                    if line.startswith("full_key:")), "")
        return _user_message(error.__cause__) + (f" (config: {key})" if key else "")
    return f"{type(error).__name__}: {error}"


def _debug() -> bool:
    return any(os.environ.get(name, "") not in ("", "0") for name in (DEBUG_ENV, "HYDRA_FULL_ERROR"))


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="distill")
def _hydra_main(cfg: DictConfig) -> None:
    """``run``; a user error ends the command with its message and exit status 2, a coverage gap
    (``on_gap=error``) with its message and 1, without a traceback unless LIGHTNING_DISTILL_DEBUG=1."""
    from lightning_distill.callbacks.coverage import CoverageGapError

    try:
        run(cfg)
    except Exception as error:
        gap = isinstance(error, CoverageGapError)
        if _debug() or not (gap or _user_error(error)):
            raise
        print(f"Error: {_user_message(error)}\n(set {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        sys.exit(1 if gap else USER_ERROR_EXIT)
    finally:
        end_process_group()


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="generate")
def _hydra_generate(cfg: DictConfig) -> None:
    """``lightning-distill generate``: ``blackbox.generate.run_generate``; user errors exit 2 as above."""
    from lightning_distill.blackbox.generate import _drop_dumps, run_generate

    try:
        run_generate(cfg)
    except Exception as error:
        if "credential" in str(error):  # never leave a key in Hydra's dump of this job
            from hydra.core.hydra_config import HydraConfig

            _drop_dumps(HydraConfig.get().runtime.output_dir)
        if _debug() or not _user_error(error):
            raise
        print(f"Error: {type(error).__name__}: {error}\n(set {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT)


def end_process_group() -> None:
    """Destroy the process group a DDP run created, so each rank exits cleanly (otherwise gloo's
    threads can abort the process at interpreter exit: "terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# Messages from the libraries that say nothing to a user of this command.
_NOISE = (
    r".*isinstance\(treespec, LeafSpec\).*",                     # torch/Lightning internals
    r".*defined a `validation_step` but have no `val_dataloader`.*",  # the demo teacher's own fit
    r".*does not have many workers.*",                             # in-memory token blocks
)


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("\N{ELECTRIC LIGHT BULB} Tip")


def _quiet() -> None:
    for pattern in _NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropTips())


def main() -> None:
    """Console entry point (``lightning-distill``); Hydra parses ``sys.argv``."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet()
    if sys.argv[1:2] == ["generate"]:  # lightning-distill generate <overrides>: conf/generate.yaml
        del sys.argv[1]
        _hydra_generate()
        return
    _hydra_main()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

