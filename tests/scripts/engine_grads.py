"""One optimizer step of DistillationModule under a sharded engine; saves the full gradients it stepped with.

    python engine_grads.py OUT_DIR STRATEGY DEVICES BATCH_SIZE [ACCELERATOR] [ACCUMULATE]
    python engine_grads.py OUT_DIR STRATEGY DEVICES BATCH_SIZE:ACCUMULATE [BATCH_SIZE:ACCUMULATE ...] ACCELERATOR

STRATEGY: ``single`` (one process), ``fsdp2`` (Lightning's ModelParallelStrategy + fully_shard: CPU with
gloo, or CUDA), ``fsdp`` (Lightning's FSDPStrategy: CUDA only). Rank 0 writes ``grads.safetensors``
(the gathered student gradients) and ``report.json`` (loss, what the teacher looks like after the step:
sharded, gradients, optimizer state). The models and the eight uneven sequences are ``ddp_grads.py``'s.
The second form makes one fit per pair in one launch (the later fits reuse the ranks and their process
group), each writing into ``OUT_DIR/b<BATCH_SIZE>-a<ACCUMULATE>/``.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ddp_grads import items, model  # noqa: E402

from lightning_distill import DistillationModule  # noqa: E402
from lightning_distill.cli import end_process_group  # noqa: E402
from lightning_distill.engines import whole  # noqa: E402
from lightning_distill.losses import LogitKD, TaskLoss  # noqa: E402


class RecordingSGD(torch.optim.SGD):
    """lr=0 SGD with momentum (so it keeps per-parameter state) that records the gradients it stepped with."""

    def __init__(self, params):
        super().__init__(params, lr=0.0, momentum=0.9)
        self.seen: list[torch.Tensor] = []

    def step(self, closure=None):
        loss = super().step(closure)
        self.seen = [p.grad.detach().clone() for g in self.param_groups for p in g["params"]]
        return loss


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # a DTensor (FSDP2) is gathered


def strategy_for(name: str, devices: int):
    if name == "single":
        return "auto"
    if name == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1, save_distributed_checkpoint=False)
    if name == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        from lightning_distill.engines import TransformerBlocks

        return FSDPStrategy(auto_wrap_policy=TransformerBlocks(), sharding_strategy="FULL_SHARD", use_orig_params=True)
    raise ValueError(f"unknown strategy {name!r}")


def main(out: Path, name: str, devices: int, batch_size: int, accelerator: str, accumulate: int = 1) -> None:
    torch.set_num_threads(1)
    teacher = model(1, 32)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(20)  # a peaked teacher, so KD has signal
    module = DistillationModule(model(0, 16), teacher,
                                {"kd": LogitKD(temperature=2.0, weight=0.5), "task": TaskLoss(weight=0.5)},
                                optimizer=functools.partial(RecordingSGD))
    trainer = L.Trainer(accelerator=accelerator, devices=devices, strategy=strategy_for(name, devices), max_steps=1,
                        accumulate_grad_batches=accumulate,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, DataLoader(items(), batch_size=batch_size, shuffle=False))
    optimizer = trainer.optimizers[0]
    grads = [_full(g).float().cpu().contiguous() for g in optimizer.seen]  # collective: every rank
    loss = trainer.strategy.reduce(trainer.callback_metrics["train/loss"].to(trainer.strategy.root_device), reduce_op="mean")
    teacher_params = list(module.teacher.parameters())
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    report = {
        "loss": float(loss),
        "student_sharded": sum(type(p).__name__ == "DTensor" for p in module.student.parameters()),
        "teacher_sharded": sum(type(p).__name__ == "DTensor" for p in teacher_params),
        "teacher_params": len(teacher_params),
        "teacher_trainable": sum(p.requires_grad for p in teacher_params),
        "teacher_grads": sum(p.grad is not None for p in teacher_params),
        "teacher_in_optimizer": sum(id(p) in in_optimizer for p in teacher_params),
        "teacher_optimizer_state": sum(p in optimizer.state for p in teacher_params),
        "student_optimizer_state": len(optimizer.state),
        "teacher_training": module.teacher.training,
        "world_size": trainer.world_size,
    }
    out.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(out / "last.ckpt")  # a collective under FSDP/FSDP2
    exported = whole(module.student, root=trainer.strategy.model)  # what the CLI exports: the student gathered whole (a collective)
    initial = model(0, 16).state_dict()  # lr=0: the step leaves the weights as they were
    report["whole_student_matches"] = exported.state_dict().keys() == initial.keys() and all(
        torch.equal(v.cpu(), initial[k]) for k, v in exported.state_dict().items())
    if trainer.global_rank == 0:
        state = torch.load(out / "last.ckpt", weights_only=True, map_location="cpu")["state_dict"]
        report["checkpoint_keys_match"] = set(state) == {f"student.{k}" for k in initial}  # no teacher.*
        save_file({f"g{i}": g for i, g in enumerate(grads)}, out / "grads.safetensors")
        (out / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    if ":" in sys.argv[4]:
        for pair in sys.argv[4:-1]:
            batch, acc = (int(v) for v in pair.split(":"))
            main(Path(sys.argv[1]) / f"b{batch}-a{acc}", sys.argv[2], int(sys.argv[3]), batch, sys.argv[-1], acc)
    else:
        main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]),
             sys.argv[5] if len(sys.argv) > 5 else "cpu", int(sys.argv[6]) if len(sys.argv) > 6 else 1)
    end_process_group()
