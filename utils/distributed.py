"""Process groups and model wrapping through torch.distributed (DDP, FSDP2, tensor parallelism).

Launch with ``torchrun --nproc_per_node N script.py ...``: torchrun sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT; ``setup`` reads them and opens the process group
(gloo on CPU, nccl on CUDA). Without those variables everything runs in one process.

    env = setup("ddp", "auto")                 # DistEnv(rank, world_size, local_rank, device, kind)
    env = setup("fsdp", "auto", ParallelConfig(tp=2))   # + tensor / pipeline parallel sizes
    model = wrap_model(model, env)              # TP (DTensor) then DDP(...) / fully_shard(...) / unchanged

With ``train.parallel`` the ranks form a DeviceMesh of shape (pp, dp, tp), tp innermost so a
tensor-parallel group sits on neighbouring ranks (one node): rank = (pp_rank * dp + dp_rank) * tp
+ tp_rank. Data loaders shard by ``env.dp_rank`` / ``env.dp_size``: the ranks of one tensor-parallel
group (and every pipeline stage) must read the same batch.
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
    kind: str  # "none" | "ddp" | "fsdp": the data-parallel engine
    tp: int = 1  # tensor-parallel ranks
    pp: int = 1  # pipeline stages

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def dp_size(self) -> int:
        return self.world_size // (self.tp * self.pp)

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp % self.dp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.tp * self.dp_size)

    @property
    def sharded(self) -> bool:
        """Parameters are DTensors (FSDP2 and/or TP): checkpoints gather them with DCP."""
        return self.kind == "fsdp" or self.tp > 1


def setup(kind: str = "none", device: str = "auto", parallel: Any = None) -> DistEnv:
    """Open (once) the process group torchrun describes; safe to call again. ``parallel`` (the
    recipe's train.parallel) sets the tensor / pipeline parallel sizes, checked against the world."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank, "train.device")
    tp, pp = (parallel.tp, parallel.pp) if parallel is not None else (1, 1)
    dp = _check_layout(world, kind, tp, pp, parallel.dp if parallel is not None else 0)
    if world > 1 and kind == "none" and dp > 1:
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
    return DistEnv(rank, world, local_rank, dev, kind if dp > 1 else "none", tp, pp)


def _check_layout(world: int, kind: str, tp: int, pp: int, dp: int) -> int:
    """The data-parallel size of (pp, dp, tp) on ``world`` processes; UserError when they do not fit."""
    if world % (tp * pp):
        raise UserError(f"train.parallel asks for tp={tp} x pp={pp} = {tp * pp} processes per model copy, which does not "
                        f"divide the {world} process(es) launched; launch a multiple of {tp * pp} (torchrun "
                        f"--nproc_per_node) or change tp/pp.")
    rest = world // (tp * pp)
    if dp and dp != rest:
        raise UserError(f"train.parallel: dp={dp} x tp={tp} x pp={pp} = {dp * tp * pp} processes, but {world} were "
                        f"launched; launch {dp * tp * pp} or set dp: 0 (the rest: {rest}).")
    if tp > 1 and rest > 1 and kind != "fsdp":
        raise UserError(f"tp={tp} with {rest} data-parallel copies needs train.distributed=fsdp (FSDP2 x TP on a 2-D "
                        f"mesh); DDP does not take tensor-parallel (DTensor) parameters.")
    if pp > 1 and (tp > 1 or rest > 1):
        raise UserError(f"pp={pp} with tp={tp} and {rest} data-parallel copies: pipeline parallelism is built for one "
                        f"model copy of pp stages (dp 1, tp 1); launch pp processes, or use tp and fsdp instead.")
    return rest


def device_mesh(env: DistEnv):
    """The (pp, dp, tp) DeviceMesh of this run (None in one process)."""
    if not env.active:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(env.device.type, (env.pp, env.dp_size, env.tp), mesh_dim_names=("pp", "dp", "tp"))


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
    """Tensor parallelism, then DDP or FSDP2 around ``model`` (already on env.device); returns
    the module to call. (Pipeline stages are cut by utils/pipeline.py.)

    TP shards the model over the mesh's tp dimension (the model's own plan,
    ``model.parallelize_tensors``). FSDP2 then shards each Transformer block and then the root
    over the dp dimension, so a block's weights are gathered just before it runs and freed after.
    The root keeps embeddings, final norm and (tied) head in one group.
    """
    mesh = device_mesh(env) if env.tp > 1 or env.kind == "fsdp" else None
    if env.tp > 1:
        broadcast_params(model, env)  # every tp rank cuts its shard from the same weights
        model.parallelize_tensors(mesh["tp"])
    if env.kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        cfg = getattr(model, "cfg", None)
        # MoE routers leave some experts without gradient in a micro-batch.
        unused = cfg is not None and getattr(cfg, "ffn", None) == "moe"
        ids = [env.device.index] if env.device.type == "cuda" else None
        return DDP(model, device_ids=ids, find_unused_parameters=unused)
    if env.kind == "fsdp":
        from torch.distributed.fsdp import fully_shard

        if env.tp == 1:
            broadcast_params(model, env)
        for block in getattr(model, "layers", []):
            fully_shard(block, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
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
