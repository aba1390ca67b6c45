"""Lightning's sharded engines for a teacher and a student: FSDP, FSDP2 and DeepSpeed.

- :class:`TransformerBlocks`: an FSDP auto-wrap policy that makes every transformer block of every
  Hugging Face model in the LightningModule (student *and* frozen teacher) its own FSDP unit.
- :func:`shard_fsdp2`: ``DistillationModule.configure_model`` under Lightning's
  ``ModelParallelStrategy``: ``fully_shard`` on each block, then on each model (teacher included).
- :func:`check_strategy_available`: the trainer config's strategy needs a package that is missing
  (DeepSpeed): one error before any data or model loads.

See ``docs/scale.md``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import Any

from torch import nn

from lightning_distill.models.adapters import unwrap_model

__all__ = ["MissingPackageError", "TransformerBlocks", "block_classes", "check_strategy_available", "reshard",
           "shard_fsdp2", "whole"]


class MissingPackageError(ImportError):
    """A configured engine needs a package that is not installed."""


def block_classes(model: nn.Module) -> set[str]:
    """Class names of ``model``'s transformer blocks: Hugging Face's ``_no_split_modules``."""
    names = getattr(unwrap_model(model), "_no_split_modules", None) or ()
    return {str(n) for n in names}


class TransformerBlocks:
    """FSDP (``FSDPStrategy(auto_wrap_policy=TransformerBlocks())``) auto-wrap policy.

    Every module whose class is a transformer block of a Hugging Face model above it
    (``_no_split_modules``) becomes an FSDP unit, the student's and the teacher's alike, and so does
    each frozen Hugging Face model as a whole (the teacher); the student's embeddings, final norm and
    head stay in the root unit. FSDP visits a parent before its
    children, so the block names are read from each model as the walk reaches it.

    Args:
        extra: more block class names to wrap (a model without ``_no_split_modules``).

    Raises:
        TypeError: ``extra`` is not a list of class names.
    """

    def __init__(self, extra: list[str] | None = None) -> None:
        if extra is not None and (isinstance(extra, str) or not all(isinstance(n, str) for n in extra)):
            raise TypeError(f"extra must be a list of block class names, e.g. ['GPT2Block'], got {extra!r}.")
        self.names: set[str] = {str(n) for n in (extra or ())}
        self._frozen: set[int] = set()
        self._inside: set[int] = set()

    def __call__(self, module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
        if recurse:
            self.names |= block_classes(module)
            if (id(module) not in self._inside and block_classes(module)
                    and not any(p.requires_grad for p in module.parameters())):
                # The outermost frozen model (the teacher) is a unit of its own: its embeddings and
                # head share no unit with the trained student's (no gradient memory kept for them).
                self._frozen.add(id(module))
                self._inside |= {id(m) for m in module.modules()}
            return True
        return type(module).__name__ in self.names or id(module) in self._frozen


def shard_fsdp2(models: Mapping[str, nn.Module | None], device_mesh: Any) -> None:
    """``fully_shard`` each transformer block, then each model (``ModelParallelStrategy``, FSDP2).

    The frozen teacher is sharded as the student is, so its forward gathers its parameters; it has
    no gradients (``requires_grad`` stays off) and no optimizer state (it is not in the optimizer).

    Args:
        models: ``{"student": ..., "teacher": ...}``; ``None`` entries are skipped.
        device_mesh: Lightning's mesh (``LightningModule.device_mesh``); its ``data_parallel``
            dimension shards.

    Raises:
        ValueError: a tensor-parallel dimension larger than 1 (not supported here).
    """
    from torch.distributed.fsdp import fully_shard

    names = device_mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and device_mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            f"ModelParallelStrategy has tensor_parallel_size={device_mesh['tensor_parallel'].size()}; "
            "lightning-distill shards the models with FSDP2 only: set trainer.strategy.tensor_parallel_size=1 "
            "and trainer.strategy.data_parallel_size=<nodes x devices per node>."
        )
    mesh = device_mesh["data_parallel"] if "data_parallel" in names else device_mesh
    for model in models.values():
        if model is None:
            continue
        blocks = block_classes(model)
        for sub in model.modules():
            if sub is not model and type(sub).__name__ in blocks:
                fully_shard(sub, mesh=mesh)
        fully_shard(model, mesh=mesh)


#: Strategy class (or name) → the package it needs and how to get it.
_NEEDS = {"DeepSpeed": ("deepspeed", "pip install deepspeed")}


def check_strategy_available(trainer_cfg: Mapping[str, Any] | None) -> None:
    """Raise before any work when the configured strategy needs a package that is not installed.

    Args:
        trainer_cfg: the ``trainer`` config (its ``strategy`` a name or a ``_target_`` node).

    Raises:
        MissingPackageError: e.g. ``trainer=deepspeed_zero3`` without the ``deepspeed`` package.
    """
    strategy = (trainer_cfg or {}).get("strategy")
    target = strategy.get("_target_", "") if isinstance(strategy, Mapping) else str(strategy or "")
    for key, (package, install) in _NEEDS.items():
        if key.lower() in target.lower() and importlib.util.find_spec(package) is None:
            raise MissingPackageError(
                f"trainer.strategy={target!r} needs the {package!r} package, which is not installed; run "
                f"`{install}` (on a CUDA machine), or pick another engine (trainer=fsdp, trainer=ddp)."
            )


def reshard(model: nn.Module | None) -> None:
    """Free a forward-only FSDP2 model's gathered parameters after its forward.

    FSDP2 keeps a root module's parameters gathered after its forward, for the backward that
    follows; the frozen teacher has no backward, so without this its root unit (embeddings, head)
    would stay whole on every rank.
    """
    if model is None:
        return
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.reshard()



def whole(model: nn.Module, root: nn.Module | None = None) -> nn.Module:
    """A sharded Hugging Face model as one plain, whole model (to describe and export it).

    FSDP2 (``fully_shard``): the full state dict is gathered on every rank. FSDP1 (Lightning's
    ``FSDPStrategy``; pass its wrapped LightningModule as ``root``): the parameters are gathered with
    ``summon_full_params``. Either is a collective: every rank calls it. The result is a fresh
    instance of the model's own class; a model that is not sharded is returned as it is.

    Args:
        model: the student (``module.student``).
        root: ``trainer.strategy.model`` (FSDP1 wraps the LightningModule there).

    Raises:
        TypeError: a sharded model without a Hugging Face ``config`` (cannot be rebuilt).
    """
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1

    fsdp2 = any(isinstance(m, FSDPModule) for m in model.modules())
    fsdp1 = root is not None and any(isinstance(m, FSDP1) for m in root.modules())
    if not (fsdp1 or fsdp2):
        return model
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"cannot rebuild the sharded {type(model).__name__} whole (no Hugging Face config); "
                        "export it from a checkpoint instead.")
    cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))  # FSDP2 subclasses the model
    plain = cls(config)
    if fsdp2:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    else:
        with FSDP1.summon_full_params(root, writeback=False):
            named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
            state = {_fsdp1_name(k): v.detach().clone() for k, v in named}
        wanted = plain.state_dict().keys()
        state = {k: v for k, v in state.items() if k in wanted}  # non-persistent buffers are not loaded
    plain.load_state_dict(state)
    return plain.to(next(iter(state.values())).dtype).eval()


def _fsdp1_name(name: str) -> str:
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module."):
        name = name.replace(wrapper, "")
    return name
