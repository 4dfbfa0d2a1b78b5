"""The state of one training run, and how it is saved, resumed and rolled back.

``Run`` holds what one call of ``utils.train_loop.train`` works with (model, optimizer,
schedule, data, step); ``save_step`` / ``save_final`` / ``resume`` / ``rollback`` move it to
and from checkpoint directories.

A step checkpoint (``utils.checkpoint`` layout) holds the weights plus ``train_state.pt``:

    step, world_size, optimizer_name, optimizer, schedule, scaler, spike, grad_clip, tokens_seen, bad_streak,
    ranks: [{"rng": {...}, "data": loader.state_dict()}, ...]   # one entry per rank

Each rank has its own data position and RNG streams, so they are gathered to rank 0 and
saved as a list; resuming with another process count or ``train.parallel`` layout is refused
(the data shards would not line up). Under FSDP2 and tensor parallelism full (unsharded) weights
and optimizer state are gathered with ``torch.distributed.checkpoint.state_dict``; pipeline stages
send their weights to rank 0 and keep their optimizer state in their own ``ranks`` entry. The
weights of every checkpoint are the whole model, so any layout can start from them (``init_from``).
"""
from __future__ import annotations

import contextlib
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn as nn

from utils.checkpoint import (
    MODEL_CONFIG,
    CheckpointManager,
    load_into,
    load_train_state,
    load_weights,
    read_config_dict,
    save_checkpoint,
)
from utils.distributed import DistEnv, all_gather_object, barrier, full_tensor
from utils.errors import UserError
from utils.grad_clip import GradClip
from utils.logging import MetricsLogger
from utils.optim import LRSchedule, OptimConfig
from utils.spike import Diverged, SpikeDetector

from utils.train_config import TrainConfig

# ----------------------------------------------------------------------------- RNG


def rng_state(device: torch.device) -> dict:
    """RNG states of torch (CPU and CUDA), numpy and python, in weights_only-loadable types."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- weights and optimizer


def _fsdp_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def gather_weights(model: nn.Module, env: DistEnv, weights_fn: Optional[Callable]) -> Optional[dict[str, torch.Tensor]]:
    """Full CPU weights to save (collective under FSDP); None means "the model's own state"."""
    if weights_fn is not None:
        return {k: full_tensor(v) for k, v in weights_fn(model).items()}
    if not env.sharded:
        return None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_fsdp_options(cpu_offload=True))
    for alias in getattr(model, "tied_weights", {}):  # aliases are stored once (see Transformer.weights)
        state.pop(alias, None)
    return {k: v.contiguous() for k, v in state.items()}


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv) -> dict:
    if env.sharded:  # DTensor moments (FSDP2 / TP) gathered into full tensors
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=_fsdp_options(cpu_offload=True))
    return optimizer.state_dict()


# Optimizer-group settings that come from the recipe, and the recipe key each comes from.
_RECIPE_GROUP_KEYS = {"base_lr": "optim.lr", "weight_decay": "optim.weight_decay", "betas": "optim.betas",
                      "eps": "optim.eps", "momentum": "optim.muon_momentum", "ns_steps": "optim.muon_ns_steps"}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, env: DistEnv) -> dict:
    """Load the optimizer's moments and step counts from ``state``, keeping the settings the recipe
    gives each group (LR, weight decay, betas, ...): ``load_state_dict`` would bring back the saved
    ones, and a resumed run would train with the old LR while logging the new. Returns what the
    recipe changed, as {recipe key: (saved, now)}."""
    fresh = [{k: g[k] for k in _RECIPE_GROUP_KEYS if k in g} for g in optimizer.param_groups]
    if env.sharded:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=_fsdp_options())
    else:
        try:
            optimizer.load_state_dict(state)
        except (ValueError, KeyError) as err:
            raise UserError(f"the checkpoint's optimizer state does not fit this run ({err}); the trainable "
                            "parameters differ. Resume with the same recipe or set train.resume=never.") from None
    changed = {}
    for group, settings in zip(optimizer.param_groups, fresh):
        for k, now in settings.items():
            if group.get(k) != now:
                key = "optim.muon_lr" if k == "base_lr" and group.get("use_muon") else _RECIPE_GROUP_KEYS[k]
                changed[key] = (group.get(k), now)
                group[k] = now
    return changed


def check_same_model(path: Path, model: nn.Module) -> None:
    """Refuse a checkpoint whose ModelConfig differs from the model being trained."""
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        return
    saved = read_config_dict(path)
    ours = cfg.to_dict()
    wrong_type = [f"{k}={saved[k]!r}, expected {type(ours[k]).__name__}" for k in sorted(saved)
                  if saved[k] is not None and ours.get(k) is not None and not _same_kind(saved[k], ours[k])]
    if wrong_type:
        raise UserError(f"{Path(path) / MODEL_CONFIG} holds an invalid model config ({'; '.join(wrong_type[:3])}); "
                        "the checkpoint is damaged or hand-edited. Resume from another checkpoint or set train.resume=never.")
    diff = sorted(k for k in set(saved) | set(ours) if saved.get(k) != ours.get(k) and k != "extra")
    if diff:
        shown = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs recipe {ours.get(k)!r}" for k in diff[:4])
        raise UserError(f"checkpoint {str(path)!r} belongs to a different model ({shown}). "
                        "Point train.resume at a checkpoint of this model, use another train.out_dir, or set train.resume=never.")


def _same_kind(a: Any, b: Any) -> bool:
    """JSON types agree (an int where a float is stored counts as the same)."""
    number = (int, float)
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) == isinstance(b, bool)
    return (isinstance(a, number) and isinstance(b, number)) or type(a) is type(b) or \
        (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)))


def load_weights_into(path: Path, model: nn.Module, env: DistEnv, weights_fn: Optional[Callable]) -> None:
    """Copy a checkpoint's weights into ``model`` (before or after FSDP sharding)."""
    state = load_weights(path)
    if weights_fn is not None:
        targets = weights_fn(model)
        if set(targets) != set(state):
            missing, extra = sorted(set(targets) - set(state)), sorted(set(state) - set(targets))
            raise UserError(f"weights in {path} do not match the trained tensors (missing {missing[:4]}, unexpected {extra[:4]}); "
                            "resume with the same recipe or set train.resume=never.")
        with torch.no_grad():
            for k, t in targets.items():
                if tuple(t.shape) != tuple(state[k].shape):
                    raise UserError(f"weights in {path}: {k} has shape {tuple(state[k].shape)}, expected {tuple(t.shape)}.")
                _copy_into(t, state[k])
        return
    if env.pp > 1:  # a pipeline stage: its own part of the whole model's weights
        own = model.state_dict()
        state = {k: v for k, v in state.items() if k in own}
    if env.sharded and _is_sharded(model):
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        for alias, source in getattr(model, "tied_weights", {}).items():  # set_model_state_dict wants both
            state.setdefault(alias, state[source])
        set_model_state_dict(model, state, options=_fsdp_options())
        return
    load_into(model, state, str(path))


def _is_sharded(model: nn.Module) -> bool:
    from utils.distributed import is_dtensor

    return any(is_dtensor(p) for p in model.parameters())


def _copy_into(target: torch.Tensor, value: torch.Tensor) -> None:
    from utils.distributed import is_dtensor

    if is_dtensor(target):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value.to(target.device), target.device_mesh, target.placements)
    target.copy_(value.to(dtype=target.dtype, device=target.device))


def read_resume_state(path: Path, model: nn.Module, env: DistEnv, optimizer_name: str) -> dict:
    """Validate a resume checkpoint against this run and return its train_state."""
    path = Path(path)
    check_same_model(path, model)
    state = load_train_state(path)
    if state is None:
        raise UserError(f"{path} has no train_state.pt, so it cannot be resumed (it is an exported or final checkpoint). "
                        "Resume from a step_* checkpoint, or set train.resume=never to start over.")
    if state.get("world_size") != env.world_size:
        raise UserError(f"checkpoint {str(path)!r} was written by {state.get('world_size')} process(es) but this run has "
                        f"{env.world_size}; each process's data position and RNG are saved, so resume with "
                        f"--nproc_per_node {state.get('world_size')} (or set train.resume=never).")
    layout = {"tp": env.tp, "pp": env.pp, "dp": env.dp_size}
    if state.get("layout", {"tp": 1, "pp": 1, "dp": env.world_size}) != layout:
        saved = state.get("layout")
        raise UserError(f"checkpoint {str(path)!r} was written with train.parallel {saved} but this run is {layout}; a "
                        "step checkpoint resumes in its own layout (each data-parallel rank's data position is saved). "
                        f"Resume with the same tp/pp, or start a new run from its weights ({path} holds the whole model: "
                        "init_from / model.init_from) with fresh optimizer moments.")
    if state.get("optimizer_name") != optimizer_name:
        raise UserError(f"checkpoint {str(path)!r} was trained with optim.name={state.get('optimizer_name')!r}, "
                        f"this recipe says {optimizer_name!r}; use the same optimizer to resume.")
    return state


def data_state(batches: Any) -> Any:
    return batches.state_dict() if hasattr(batches, "state_dict") else None


def restore_data_state(batches: Any, state: Any) -> None:
    if state is not None:
        if not hasattr(batches, "load_state_dict"):
            raise UserError("the checkpoint holds a data position but the batch iterator has no load_state_dict().")
        batches.load_state_dict(state)


# ----------------------------------------------------------------------------- one run: save, resume, roll back


@dataclass
class Run:
    """Everything one call of ``utils.train_loop.train`` holds."""

    cfg: TrainConfig
    optim_cfg: OptimConfig
    env: DistEnv
    raw: nn.Module  # plain module (FSDP2 shards it in place)
    model: nn.Module  # what loss_fn calls: DDP / compiled wrapper
    params: list
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    scaler: Optional[torch.amp.GradScaler]
    spike: SpikeDetector
    batches: Iterator
    loss_fn: Callable
    accum: int
    amp_dtype: Optional[torch.dtype]
    manager: CheckpointManager
    logger: MetricsLogger
    clip: GradClip
    pipeline: Optional[Any] = None  # utils/pipeline.py Pipeline when train.parallel.pp > 1 (model is its stage)
    step: int = 0
    tokens_seen: int = 0
    rollbacks: int = 0
    bad_streak: int = 0  # consecutive steps skipped as non-finite or spiking
    events: list = field(default_factory=list)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.amp_dtype)

    def event(self, kind: str, **info) -> None:
        self.events.append({"step": self.step, "event": kind, **info})
        self.logger.event(self.step, kind, **info)


def full_weights(run: Run, weights_fn: Optional[Callable]) -> Optional[dict[str, torch.Tensor]]:
    """The whole model's weights to save (gathered from the pipeline stages, or the FSDP/TP shards)."""
    if run.pipeline is not None:
        return run.pipeline.full_state()
    return gather_weights(run.raw, run.env, weights_fn)


def saved_optimizer(state: dict, run: Run) -> dict:
    """The optimizer state this rank resumes: the run's, or (pipeline) its own stage's."""
    return state["ranks"][run.env.rank]["optimizer"] if run.pipeline is not None else state["optimizer"]


def save_step(run: Run, extra: dict) -> Optional[Path]:
    """Step checkpoint with full train state (collective; rank 0 writes)."""
    weights = full_weights(run, extra["weights_fn"])
    mine = {"rng": rng_state(run.env.device), "data": data_state(run.batches)}
    if run.pipeline is not None:  # each stage's own optimizer (the layout must match to resume)
        mine["optimizer"], opt_state = run.optimizer.state_dict(), None
    else:
        opt_state = optimizer_state(run.raw, run.optimizer, run.env)
    ranks = all_gather_object(mine, run.env)
    path = None
    if run.env.is_main:
        layout = {"tp": run.env.tp, "pp": run.env.pp, "dp": run.env.dp_size}
        train_state = {"step": run.step, "world_size": run.env.world_size, "layout": layout, "optimizer_name": run.optim_cfg.name,
                       "optimizer": opt_state, "schedule": run.schedule.state_dict(), "spike": run.spike.state_dict(),
                       "grad_clip": run.clip.state_dict(), "scaler": run.scaler.state_dict() if run.scaler is not None else None,
                       "tokens_seen": run.tokens_seen, "bad_streak": run.bad_streak, "ranks": ranks}
        path = run.manager.save(run.step, run.raw, healthy=run.bad_streak == 0, recipe=extra["recipe"],
                                train_state=train_state, weights=weights,
                                meta={"tokens_seen": run.tokens_seen, **(extra["meta"] or {})},
                                tokenizer_path=extra["tokenizer_path"])
    barrier(run.env)
    return path


def rollback(run: Run, weights_fn) -> bool:
    """Go back to the newest healthy checkpoint with a lower LR; False (and the step is skipped)
    when there is none or ``max_rollbacks`` is used up."""
    latest = run.manager.latest(healthy=True)
    if latest is None or run.rollbacks >= run.cfg.spike.max_rollbacks:
        why = "no healthy checkpoint yet" if latest is None else f"max_rollbacks={run.cfg.spike.max_rollbacks} reached"
        run.event("spike_skip", reason=why)
        return False
    from_step = run.step
    # Weights and optimizer go back; the data stream does not, so the batches that caused
    # the spike are not replayed (PaLM's recipe: restart earlier and skip the bad data).
    state = load_train_state(latest)
    load_weights_into(latest, run.raw, run.env, weights_fn)
    load_optimizer_state(run.raw, run.optimizer, saved_optimizer(state, run), run.env)
    run.step = int(state["step"])
    best = run.spike.best  # the loss statistics go back too, but not the best loss reached since
    run.spike.load_state_dict(state["spike"])
    run.spike.best = min(best, run.spike.best)
    if state.get("grad_clip"):
        run.clip.load_state_dict(state["grad_clip"])
    run.schedule.scale *= run.cfg.spike.lr_drop
    run.rollbacks += 1
    run.bad_streak = 0
    run.event("rollback", from_step=from_step, to_step=run.step, lr_scale=run.schedule.scale, checkpoint=str(latest))
    return True


def resume_point(manager: CheckpointManager, say: bool) -> Optional[Path]:
    """resume=auto: the newest checkpoint, unless it was saved while the run was diverging and a
    healthy one exists (a diverged run is restarted from where it was last good)."""
    newest, healthy = manager.latest(), manager.latest(healthy=True)
    if newest is not None and healthy is not None and healthy != newest and not manager.is_healthy(newest):
        if say:
            print(f"train: {newest} was saved while the run was diverging; resuming from the newest healthy "
                  f"checkpoint {healthy}", file=sys.stderr)
        return healthy
    return newest


def diverged(run: Run, loss: float, what: str) -> Diverged:
    """The error that stops a diverged run (logged as an event first); no final/ is written."""
    healthy = run.manager.latest(healthy=True)
    run.event("diverged", loss=loss, best=run.spike.best, bad_steps=run.bad_streak, healthy_checkpoint=str(healthy))
    where = (f"The newest healthy checkpoint is {healthy}; running the same command again resumes from it."
             if healthy else "No healthy checkpoint was saved.")
    return Diverged(
        f"training diverged at step {run.step + 1}: {what} (non-finite loss or gradient, or a loss spike; last loss "
        f"{loss:.4g}, best smoothed loss {run.spike.best:.4g}). The run stops without writing final/. {where} "
        "Lower optim.lr or raise optim.warmup_steps; train.spike.policy=rollback retries from the healthy checkpoint "
        "with a lower LR, and train.spike.max_bad_steps sets how many bad steps in a row end the run."
    )


def resume(run: Run, state: dict) -> dict:
    """Resume: optimizer (needs the wrapped params), schedule, spike, scaler, RNG, data, step.
    Returns the optimizer settings the recipe changed since the checkpoint ({key: (saved, now)}),
    which apply from here on."""
    changed = load_optimizer_state(run.raw, run.optimizer, saved_optimizer(state, run), run.env)
    run.step = int(state["step"])
    run.bad_streak = int(state.get("bad_streak", 0))
    run.schedule.load_state_dict(state["schedule"])
    run.spike.load_state_dict(state["spike"])
    if state.get("grad_clip"):  # checkpoints from before adaptive clipping lack it
        run.clip.load_state_dict(state["grad_clip"])
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    run.tokens_seen = int(state.get("tokens_seen", 0))
    mine = state["ranks"][run.env.rank]
    set_rng_state(mine["rng"], run.env.device)
    restore_data_state(run.batches, mine["data"])
    return changed


def save_final(run: Run, extra: dict) -> Path:
    """``{out_dir}/final``: weights + config + recipe + tokenizer, no train state."""
    weights = full_weights(run, extra["weights_fn"])
    path = Path(run.cfg.out_dir) / "final"
    if run.env.is_main:
        save_checkpoint(path, run.raw, recipe=extra["recipe"], weights=weights, tokenizer_path=extra["tokenizer_path"],
                        meta={"step": run.step, "tokens_seen": run.tokens_seen, **(extra["meta"] or {})})
    barrier(run.env)
    return path
