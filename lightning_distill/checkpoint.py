"""Reading checkpoints safely, with one clear error for a file that is damaged or not ours.

``torch.load(weights_only=True)`` reads a checkpoint this library wrote (tensors and plain values
only). A truncated or damaged file makes torch fail with a low-level message that names neither
the file nor the fault (``OSError: [Errno 22] Invalid argument``, a zip reader error), and a file
that holds other Python objects makes it suggest ``weights_only=False``, which would run the
file's code. Both become one :class:`CheckpointError` naming the file.

:class:`CheckedCheckpointIO` wraps the trainer's checkpoint IO so ``Trainer.fit(ckpt_path=...)``
reports the same way; ``DistillationModule`` installs it at setup.

What ``DistillationModule`` keeps in a checkpoint is decided here too: state-dict keys name the
unwrapped models (:func:`wrapper_prefixes`, :func:`rename_keys`), and the recorded loss terms are
rebuilt on load (:func:`rebuild_terms`) or compared with the given ones (:func:`losses_differ_message`).
"""

from __future__ import annotations

import pickle
import shlex
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import Callback

__all__ = ["CheckedCheckpointIO", "CheckpointError", "SaveOnInterrupt", "checkpoint_errors", "losses_differ_message",
           "rebuild_terms", "rename_keys", "resolve_ckpt_path", "restore_rng_states", "resume_command",
           "rng_states", "wrapper_prefixes"]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read: damaged, truncated, or not written by this library."""


@contextmanager
def checkpoint_errors(path: Any) -> Iterator[None]:
    """Turn the errors of reading ``path`` as a checkpoint into one :class:`CheckpointError`.

    Raises:
        CheckpointError: a damaged/truncated file, or a payload the safe loader refuses.
        FileNotFoundError: passed through (it names the file already).
    """
    try:
        yield
    except CheckpointError:
        raise
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except pickle.UnpicklingError:
        # torch's message advises weights_only=False: the unsafe load. Never pass it on.
        raise CheckpointError(
            f"{path} is not a checkpoint this library wrote, or it is damaged: it holds Python objects "
            "other than tensors and plain values, which the safe loader refuses to run. Use a checkpoint "
            "saved by a DistillationModule fit (ModelCheckpoint), or re-save the file from its source."
        ) from None
    except (OSError, RuntimeError, EOFError, KeyError, ValueError, AttributeError, IndexError) as error:
        first = str(error).splitlines()[0] if str(error) else ""
        first = first.split(". ")[0].rstrip(".")[:200]  # the library's first sentence, not its advice
        raise CheckpointError(
            f"{path} is damaged or truncated and cannot be read as a checkpoint ({type(error).__name__}"
            f"{': ' + first if first else ''}); it may have been cut off while being written or copied. "
            "Use another checkpoint (e.g. an earlier one in the same folder)."
        ) from None


def _check_payload(path: Any, checkpoint: Any) -> Any:
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
        kind = type(checkpoint).__name__
        raise CheckpointError(
            f"{path} is not a Lightning checkpoint (it holds a {kind}"
            f"{' without a state_dict' if isinstance(checkpoint, Mapping) else ''}); pass a .ckpt file "
            "written by Trainer.fit (ModelCheckpoint)."
        )
    return checkpoint


class CheckedCheckpointIO(CheckpointIO):
    """A trainer's checkpoint IO whose reads fail with :class:`CheckpointError` (see module doc).

    Args:
        inner: the checkpoint IO that saves and loads (e.g. ``TorchCheckpointIO``).
    """

    def __init__(self, inner: CheckpointIO) -> None:
        self.inner = inner

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)

    def load_checkpoint(self, path: Any, map_location: Any | None = None, **kwargs: Any) -> dict[str, Any]:
        with checkpoint_errors(path):
            if map_location is None:
                loaded = self.inner.load_checkpoint(path, **kwargs)
            else:
                loaded = self.inner.load_checkpoint(path, map_location=map_location, **kwargs)
        return _check_payload(path, loaded)

    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()


def resolve_ckpt_path(value: Any, run_dir: Any) -> str | None:
    """The checkpoint a run resumes from: ``None``, a file, or ``"last"`` (the newest one).

    ``"last"`` takes the newest ``*.ckpt`` anywhere below ``run_dir`` (``last.ckpt`` on a tie); a
    folder given as ``value`` is searched the same way.

    Args:
        value: ``None``, a path to a ``.ckpt`` file or a run folder, or ``"last"``.
        run_dir: this run's output folder (where ``"last"`` is looked up).

    Raises:
        FileNotFoundError: no such file, or no checkpoint to resume from.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    text = str(value)
    folder = Path(run_dir) if text == "last" else Path(text).expanduser()
    if text != "last" and not folder.is_dir():
        if not folder.is_file():
            raise FileNotFoundError(
                f"ckpt_path={text!r}: no such file. Pass an existing .ckpt file (quote names with '=': "
                f"'ckpt_path=\"{text}\"'), a run folder, or ckpt_path=last with the run's output_dir."
            )
        return str(folder)
    found = _newest_checkpoint(folder)
    if found is None:
        raise FileNotFoundError(
            f"ckpt_path={text!r}: no checkpoint (*.ckpt) under {folder}; point output_dir=<run folder> at the "
            "run to resume, or pass ckpt_path=<file.ckpt>."
        )
    return str(found)


def _newest_checkpoint(folder: Path) -> Path | None:
    if not folder.is_dir():
        return None
    files = [p for p in folder.rglob("*.ckpt") if p.is_file()]  # is_file follows a last.ckpt link
    if not files:
        return None
    # The newest write wins (an interrupted.ckpt after last.ckpt); last.ckpt on a tie (it may link).
    return max(files, key=lambda p: (p.resolve().stat().st_mtime, p.name == "last.ckpt"))


class SaveOnInterrupt(Callback):
    """On Ctrl-C (``KeyboardInterrupt``) during ``fit``, save ``interrupted.ckpt`` to resume from.

    The checkpoint goes next to the ``ModelCheckpoint``'s files (else ``<default_root_dir>/checkpoints``)
    and records only the batches whose step finished, so the resumed fit redoes the interrupted one.

    Args:
        filename: the checkpoint's file name.
    """

    def __init__(self, filename: str = "interrupted.ckpt") -> None:
        self.filename = filename
        self.saved: Path | None = None
        self.step: int | None = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, KeyboardInterrupt) or trainer.state.fn != "fit":
            return
        checkpoint_cb = trainer.checkpoint_callback
        folder = getattr(checkpoint_cb, "dirpath", None) or Path(trainer.default_root_dir) / "checkpoints"
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        done = progress.processed
        loader = trainer.train_dataloader
        if hasattr(loader, "rewind_to"):
            loader.rewind_to(done)  # a batch cut short is trained on again after the resume
        # A step cut short is redone after the resume: it must draw (dropout) from the generators as
        # they were when it started, which the module kept (DistillationModule.on_train_batch_start).
        cut = progress.started > progress.processed
        if hasattr(pl_module, "_rng_for_checkpoint"):
            pl_module._rng_for_checkpoint = getattr(pl_module, "_rng_at_batch_start", None) if cut else None
        path = Path(folder) / self.filename
        try:
            trainer.save_checkpoint(path)
        finally:
            if hasattr(pl_module, "_rng_for_checkpoint"):
                pl_module._rng_for_checkpoint = None
        self.saved, self.step = path, trainer.global_step


def resume_command(overrides: Sequence[str], output_dir: Any, ckpt_path: Any, program: str = "lightning-distill") -> str:
    """The shell command that resumes a CLI run from ``ckpt_path`` in ``output_dir``.

    Values are double-quoted inside single quotes (``'ckpt_path="…/epoch=0-step=6.ckpt"'``): Hydra
    reads an unquoted ``=`` in a value as a syntax error.
    """
    keep = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] not in ("ckpt_path", "output_dir")]
    parts = [program, *keep, f'output_dir="{output_dir}"', f'ckpt_path="{ckpt_path}"']
    return " ".join(shlex.quote(p) for p in parts)


# ---------------------------------------------------------------------- the module's own entries
def rng_states() -> dict[str, Any]:
    """This process's random generators (Python, NumPy, torch CPU and CUDA) as tensors and plain values.

    Lightning's checkpoints do not keep them; without them a resumed fit draws other dropout masks
    (or other random choices) than the uninterrupted fit from the first step after the checkpoint.
    """
    import random

    import numpy as np
    import torch

    name, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: Mapping[str, Any]) -> None:
    """Set the generators saved by :func:`rng_states` (CUDA only when the device count matches)."""
    import random

    import numpy as np
    import torch

    if "python" in states:
        version, internal, gauss = states["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in states:
        n = states["numpy"]
        np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    cuda = states.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def wrapper_prefixes(models: Mapping[str, Any]) -> dict[str, str]:
    """``{"student.": "student._orig_mod.", ...}`` for the ``{attribute: model}`` that are wrapped
    (compiled, peft); plain models and ``None`` are left out."""
    from torch import nn

    from lightning_distill.models.adapters import wrapper_prefix

    out = {}
    for name, model in models.items():
        prefix = wrapper_prefix(model) if isinstance(model, nn.Module) else ""
        if prefix:
            out[f"{name}."] = f"{name}.{prefix}"
    return out


def rename_keys(state: dict[str, Any], prefixes: Mapping[str, str], *, wrap: bool) -> None:
    """Rename, in place, between plain keys (``student.x``) and wrapped ones (``student._orig_mod.x``).

    Args:
        state: a state dict.
        prefixes: ``{plain: wrapped}`` from :func:`wrapper_prefixes`.
        wrap: to the wrapped form (loading into wrapped models), else to the plain one (saving).
    """
    for plain, wrapped in prefixes.items():
        old, new = (plain, wrapped) if wrap else (wrapped, plain)
        for key in [k for k in state if k.startswith(old) and not (wrap and k.startswith(wrapped))]:
            state[new + key[len(old):]] = state.pop(key)


def rebuild_terms(recorded: Mapping[str, Any]) -> dict[str, Any] | None:
    """The library loss terms recorded by their ``config()`` (``{name: config}``), or ``None``
    when any of them cannot be rebuilt exactly."""
    rebuilt = {name: _rebuild_term(cfg) for name, cfg in recorded.items() if isinstance(cfg, Mapping)}
    if rebuilt and all(t is not None for t in rebuilt.values()) and len(rebuilt) == len(recorded):
        return rebuilt
    return None


def _rebuild_term(config: Mapping[str, Any]) -> Any:
    """A library loss term from its recorded ``config()``; ``None`` if it cannot be rebuilt."""
    from lightning_distill import losses as terms

    cls = getattr(terms, str(config.get("type")), None)
    if not (isinstance(cls, type) and issubclass(cls, terms.LossTerm)):
        return None
    try:
        term = cls(**{k: v for k, v in config.items() if k != "type"})
    except (TypeError, ValueError):
        return None
    return term if term.config() == dict(config) else None


def losses_differ_message(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> str:
    """The warning for a module whose loss terms (``{name: config}``) differ from the recorded ones."""
    diff = sorted(set(current) ^ set(recorded)) + [
        n for n in current if n in recorded and current[n] != recorded[n]]
    return (f"the checkpoint recorded the loss terms {dict(recorded)}, but this module has {dict(current)} "
            f"(differing: {diff}); pass losses=... matching the checkpoint to evaluate what was trained.")
