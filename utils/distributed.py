"""Process groups and model wrapping through torch.distributed (DDP, FSDP2).

Launch with ``torchrun --nproc_per_node N script.py ...``: torchrun sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT; ``setup`` reads them and opens the process group
(gloo on CPU, nccl on CUDA). Without those variables everything runs in one process.

    env = setup("ddp", "auto")          # DistEnv(rank, world_size, local_rank, device, kind)
    model = wrap_model(model, env)       # DDP(...) / fully_shard(...) / unchanged
"""
from __future__ import annotations

import atexit
import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from utils.device import resolve_device
from utils.errors import UserError


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    kind: str  # "none" | "ddp" | "fsdp"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def setup(kind: str = "none", device: str = "auto") -> DistEnv:
    """Open (once) the process group torchrun describes; safe to call again."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank, "train.device")
    if world > 1 and kind == "none":
        raise UserError(
            f"launched with {world} processes (torchrun) but train.distributed='none'; "
            "set train.distributed=ddp or fsdp, or launch a single process."
        )
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30),
                                device_id=dev if dev.type == "cuda" else None)
        # Destroy the group before the interpreter is torn down, on every way out (a stage that
        # returns, a UserError or Ctrl-C through main_guard): left to finalization, gloo's worker
        # threads can still hold work whose tensors need the GIL, and the process aborts
        # ("terminate called without an active exception") after its work was done.
        atexit.register(cleanup)
    elif dev.type == "cuda":
        torch.cuda.set_device(dev)
    return DistEnv(rank, world, local_rank, dev, kind if world > 1 else "none")


def cleanup() -> None:
    """Destroy the process group (a no-op when there is none); also run at exit (see ``setup``)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.active:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.active:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(values: dict[str, float], env: DistEnv, device: torch.device | None = None) -> dict[str, float]:
    """Average a dict of scalars over ranks (keys must match on every rank)."""
    if not env.active or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device or env.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return {k: v / env.world_size for k, v in zip(keys, t.tolist())}


def all_gather_object(obj: Any, env: DistEnv) -> list[Any]:
    if not env.active:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_params(model: nn.Module, env: DistEnv) -> None:
    """Make every rank start from rank 0's weights (FSDP shards each rank's local copy)."""
    if env.active:
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(t.data, src=0)


def wrap_model(model: nn.Module, env: DistEnv) -> nn.Module:
    """DDP or FSDP2 around ``model`` (already on env.device); returns the module to call.

    FSDP2 shards each Transformer block and then the root, so a block's weights are
    gathered just before it runs and freed after. The root keeps embeddings, final norm
    and (tied) head in one group.
    """
    if env.kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        cfg = getattr(model, "cfg", None)
        # MoE routers leave some experts without gradient in a micro-batch.
        unused = cfg is not None and getattr(cfg, "ffn", None) == "moe"
        ids = [env.device.index] if env.device.type == "cuda" else None
        return DDP(model, device_ids=ids, find_unused_parameters=unused)
    if env.kind == "fsdp":
        from torch.distributed.fsdp import fully_shard

        broadcast_params(model, env)
        for block in getattr(model, "layers", []):
            fully_shard(block)
        fully_shard(model)
        return model
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP / torch.compile wrappers (FSDP2 shards in place)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, nn.Module) and type(model).__name__ == "DistributedDataParallel":
            model = model.module
        else:
            return model


def is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, DTensor)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain CPU tensor from a tensor or a (sharded) DTensor; collective for DTensors."""
    if is_dtensor(t):
        t = t.full_tensor()
    return t.detach().cpu().contiguous()
