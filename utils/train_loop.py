"""The one training loop every stage uses (pretrain, SFT/LoRA/QLoRA, reward/DPO/ORPO/KTO, PPO/GRPO).

Stages pass in what differs; the loop owns everything else:

    result = train(model, batches, loss_fn, train_cfg, optim_cfg,
                   eval_fn=None, recipe=None, params=None, weights_fn=None,
                   checkpoint_meta=None, tokenizer_path=None, flops_per_token=None)

- ``batches``: iterator of micro-batches (tensors, tuples/lists or dicts of tensors) with
  ``state_dict()`` / ``load_state_dict()`` for exact resume; it must already be sharded by
  data-parallel rank (build it with ``utils.distributed.setup(...)``'s dp_rank/dp_size: the
  ranks of a tensor-parallel group and the pipeline stages read the same rows) and never run out.
- ``train.parallel`` (tp, pp): tensor parallelism wraps the model like FSDP does; with pp > 1
  the step runs the micro-batches through a pipeline (utils/pipeline.py) with the next-token
  loss of (x, y) batches instead of ``loss_fn``, so only pretraining takes it.
- ``loss_fn(model, batch) -> (loss, metrics)``: batch already on the device; ``loss`` is the
  MEAN loss of the micro-batch (scalar tensor); ``metrics`` a dict of floats / 0-d tensors,
  averaged over micro-batches and ranks and logged. Two optional keys steer the loop:
  ``n_tokens`` (tokens processed, for tokens/s and MFU; default: numel of the first tensor
  of the batch) and ``loss_weight`` (this micro-batch's weight in the global-batch mean,
  e.g. its count of target tokens; default 1, i.e. micro-batches weigh equally).
  The model passed is the wrapped one (DDP / compiled); ``utils.distributed.unwrap`` gives
  the plain module.
- ``eval_fn(model) -> dict[str, float]``: run every ``eval_every`` steps and at the end under
  ``torch.no_grad`` in eval mode on the plain module; it reduces across ranks itself
  (``utils.distributed.all_reduce_mean``). Every rank calls it (FSDP needs all ranks).
- ``params``: trainable parameters (LoRA: adapters); default every ``requires_grad`` param.
- ``weights_fn(model) -> dict[str, Tensor]`` of LIVE tensors to save (LoRA: adapters only);
  resume copies saved values back into them. Default: the full model state.
- MoE: the balance loss is the loss_fn's business (stages wrap theirs in
  ``model.loss.with_aux_loss``, which adds ``model.aux_loss()``); modules with
  ``update_bias()`` are called after every applied optimizer step, and ``last_load``
  (tokens per expert) is logged as ``expert_load_max_over_mean`` on log steps.
- Returns ``TrainResult``; writes ``{out_dir}/step_XXXXXXXX`` (resumable, last ``keep_last``),
  ``{out_dir}/final`` (weights, config, recipe, tokenizer), ``metrics.jsonl``, ``loss.png``.

Each optimizer step: accumulate gradients over micro-batches (DDP syncs only on the last),
all-reduce loss/flags, normalise the gradient by the total loss weight, clip (``optim.grad_clip``,
and with ``optim.adaptive_clip`` against the recent norms: utils/grad_clip.py), then step
only when loss and grad norm are finite and the spike detector is quiet (utils/spike.py).
``train.dtype: fp16`` runs autocast with a GradScaler (CUDA or CPU): an overflowing step is
skipped and lowers the scale, and is not counted as a bad step.
``train.spike.max_bad_steps`` skipped steps in a row mean the run diverged: ``Diverged`` (a
UserError) is raised and no ``final/`` is written; step checkpoints record in meta.json whether
the run was healthy when they were saved, and rollbacks and resumes go to the newest healthy one.
"""
from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn as nn

from utils import distributed as D
from utils import flops as F
from utils import train_state as S
from utils.checkpoint import CheckpointManager
from utils.device import TORCH_DTYPES, dtype_name
from utils.errors import UserError
from utils.fs import writable_dir
from utils.grad_clip import GradClip
from utils.pipeline import Pipeline
from utils.logging import MetricsLogger, read_records
from utils.optim import LRSchedule, OptimConfig, build_optimizer
from utils.plots import plot_loss_curve
from utils.spike import SpikeConfig, SpikeDetector
from utils.train_config import TrainConfig

__all__ = ["TrainConfig", "SpikeConfig", "OptimConfig", "TrainResult", "train", "grad_accum_steps"]

@dataclass
class TrainResult:
    final_step: int
    history: list[dict]  # one record per optimizer step (loss, lr, grad_norm, tok_per_s, ...)
    checkpoint: Optional[Path]  # {out_dir}/final
    final_eval: dict
    events: list[dict] = field(default_factory=list)  # nonfinite / spike / rollback events


def grad_accum_steps(cfg: TrainConfig, world_size: int) -> int:
    """Micro-batches per process per optimizer step, so the global batch stays fixed."""
    per_micro_rows = cfg.batch_size * world_size
    if cfg.global_batch_tokens is not None:
        unit, total, what = per_micro_rows * cfg.seq_len, cfg.global_batch_tokens, "global_batch_tokens"
    elif cfg.global_batch_size is not None:
        unit, total, what = per_micro_rows, cfg.global_batch_size, "global_batch_size"
    else:
        return 1
    if total % unit or total < unit:
        raise UserError(
            f"train.{what}={total} does not divide into micro-batches of {unit} "
            f"(batch_size {cfg.batch_size}{' x seq_len ' + str(cfg.seq_len) if what.endswith('tokens') else ''} "
            f"x {world_size} process(es)); choose a multiple of {unit} or change batch_size."
        )
    return total // unit


def to_device(batch: Any, device: torch.device) -> Any:
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def _first_tensor(batch: Any) -> Optional[torch.Tensor]:
    if torch.is_tensor(batch):
        return batch
    items = ([batch["input_ids"]] if "input_ids" in batch else list(batch.values())) if isinstance(batch, dict) else batch
    if isinstance(items, (list, tuple)):
        for v in items:
            t = _first_tensor(v)
            if t is not None:
                return t
    return None




class _Interrupt:
    """The first Ctrl-C (SIGINT) or SIGTERM asks the loop to stop after the current step and
    checkpoint; a second one aborts at once. SIGTERM is what torchrun's agent and job
    schedulers (SLURM preemption) send, with a grace period before SIGKILL."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self._prev: dict = {}

    def __enter__(self) -> "_Interrupt":
        for sig in self.SIGNALS:
            try:
                self._prev[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, prev in self._prev.items():
            signal.signal(sig, prev)


def _next_batch(run: S.Run) -> Any:
    try:
        return to_device(next(run.batches), run.env.device)
    except StopIteration:
        raise UserError(f"the batch iterator ran out at step {run.step}; training loaders must cycle over epochs "
                        "(or lower train.max_steps).") from None


def _accumulate(run: S.Run) -> tuple[torch.Tensor, float, int, dict]:
    """Forward and backward of ``accum`` micro-batches through ``loss_fn``; this rank's
    (weighted loss sum, weight sum, tokens, weighted metric sums)."""
    env, model = run.env, run.model
    loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
    weight_sum, tokens, metric_sums = 0.0, 0, {}
    for i in range(run.accum):
        batch = _next_batch(run)
        last = i == run.accum - 1
        sync = contextlib.nullcontext() if last or env.kind != "ddp" else model.no_sync()
        with sync:
            with run.autocast():
                loss, metrics = run.loss_fn(model, batch)
            metrics = dict(metrics or {})
            weight = float(metrics.pop("loss_weight", 1.0))
            n_tok = metrics.pop("n_tokens", None)
            scaled = loss.float() * weight if weight != 1.0 else loss.float()
            (run.scaler.scale(scaled) if run.scaler is not None else scaled).backward()
        loss_sum += loss.detach().double() * weight
        weight_sum += weight
        tokens += int(n_tok) if n_tok is not None else (_first_tensor(batch).numel() if _first_tensor(batch) is not None else 0)
        for k, v in metrics.items():
            metric_sums[k] = metric_sums.get(k, 0.0) + (v.detach().double() if torch.is_tensor(v) else float(v)) * weight
    return loss_sum, weight_sum, tokens, metric_sums


def _train_step(run: S.Run, stop_requested: Callable[[], bool]) -> tuple[dict, Optional[dict], bool, bool]:
    """One optimizer step over ``accum`` micro-batches; returns (record, spike, bad, stop): why the
    loss is a spike (or None), whether the step was skipped as non-finite or spiking, and whether a
    process asked to stop."""
    env = run.env
    run.raw.train()
    t0 = time.perf_counter()
    if run.pipeline is not None:  # the schedule runs the micro-batches through the stages (utils/pipeline.py)
        with run.autocast():
            loss_value, weight_sum, tokens = run.pipeline.step([_next_batch(run) for _ in range(run.accum)])
        loss_sum, metric_sums = torch.tensor(loss_value * weight_sum, dtype=torch.float64, device=env.device), {}
    else:
        loss_sum, weight_sum, tokens, metric_sums = _accumulate(run)

    # One all-reduce carries the loss, weights, token count, metrics and the Ctrl-C flag.
    keys = sorted(metric_sums)
    stats = torch.stack([loss_sum, torch.tensor(weight_sum, dtype=torch.float64, device=env.device),
                         torch.tensor(float(tokens), dtype=torch.float64, device=env.device),
                         torch.tensor(float(stop_requested()), dtype=torch.float64, device=env.device)]
                        + [torch.as_tensor(metric_sums[k], dtype=torch.float64, device=env.device) for k in keys])
    stats = [v / env.tp for v in D.all_reduce_sum(stats, env).tolist()]  # the tp ranks of a group agree: count once
    total_w = stats[1]
    if total_w <= 0:
        raise UserError(f"step {run.step + 1}: no micro-batch on any process holds a token to learn from (every "
                        "loss_weight is 0). SFT examples whose prompt is longer than train.seq_len lose all their "
                        "assistant tokens: raise train.seq_len, or check the data's loss mask.")
    loss = stats[0] / total_w
    metrics = {k: v / total_w for k, v in zip(keys, stats[4:])}

    # DDP/FSDP average gradients over the data-parallel ranks; rescale so the gradient is the
    # weighted mean over every micro-batch of every rank: sum_i w_i grad(L_i) / sum_i w_i.
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)
    factor = env.dp_size / total_w
    grads = [p.grad for p in run.params if p.grad is not None]
    if factor != 1.0:
        for g in grads:
            g.mul_(factor)
    # fixed max norm, or adaptive (utils/grad_clip.py); a pipeline's norm covers every stage's gradients
    grad_norm, applied_norm = run.clip.clip(run.params, run.pipeline.group if run.pipeline is not None else None)

    lr_mult = run.schedule.apply(run.optimizer, run.step)
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    spike = run.spike.check(loss) if finite else None
    do_update = finite and spike is None
    if do_update:
        if run.scaler is not None:
            run.scaler.step(run.optimizer)
        else:
            run.optimizer.step()
        run.spike.update(loss)
        run.clip.update(applied_norm)
        _after_update(run.raw)
    if run.scaler is not None:
        loss_scale = run.scaler.get_scale()  # the scale this step's gradients carried
        run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)

    dt = time.perf_counter() - t0
    global_tokens = int(stats[2])
    run.tokens_seen += global_tokens
    record = {"step": run.step + 1, "loss": loss, "lr": run.optim_cfg.lr * lr_mult, "grad_norm": grad_norm,
              "tok_per_s": global_tokens / dt, "tokens": run.tokens_seen, "dt_ms": 1000 * dt, **metrics}
    if run.optim_cfg.adaptive_clip is not None:
        record["grad_norm_clipped"] = applied_norm
    if run.scaler is not None:
        record["loss_scale"] = loss_scale
    if not finite:
        run.event("nonfinite", loss=loss, grad_norm=grad_norm, action="skipped update")
    elif spike is not None:
        record.update({f"spike_{k}": v for k, v in spike.items()})
    # fp16: an overflowing gradient is how the GradScaler learns to lower its scale, not a bad step.
    bad = not do_update and (spike is not None or not math.isfinite(loss) or run.scaler is None)
    return record, spike, bad, stats[3] > 0


def _after_update(model: nn.Module) -> None:
    """Modules with ``update_bias()`` (DeepSeek-V3 aux-loss-free MoE balancing) adjust their
    routing bias from the load they counted, once per optimizer step (collective under DDP)."""
    for m in model.modules():
        if callable(getattr(m, "update_bias", None)):
            m.update_bias()


def _expert_load(model: nn.Module) -> dict:
    """Mean max/mean load ratio over MoE layers that expose ``last_load`` (per-expert counts)."""
    ratios = []
    for m in model.modules():
        load = getattr(m, "last_load", None)
        if torch.is_tensor(load) and load.numel() > 1 and float(load.float().mean()) > 0:
            ratios.append(float(load.float().max() / load.float().mean()))
    return {"expert_load_max_over_mean": sum(ratios) / len(ratios)} if ratios else {}


def _evaluate(run: S.Run, eval_fn: Optional[Callable]) -> dict:
    if eval_fn is None:
        return {}
    model = run.pipeline.whole_model() if run.pipeline is not None else run.raw  # a stage cannot evaluate alone
    model.eval()
    with torch.no_grad(), run.autocast():
        out = eval_fn(model)
    model.train()
    return {k: float(v) for k, v in (out or {}).items()}


def train(model: nn.Module, batches: Iterator, loss_fn: Callable, train_cfg: TrainConfig, optim_cfg: OptimConfig, *,
          eval_fn: Optional[Callable] = None, recipe: Any = None, params=None, weights_fn: Optional[Callable] = None,
          checkpoint_meta: Optional[dict] = None, tokenizer_path: Optional[str] = None,
          flops_per_token: Optional[float] = None) -> TrainResult:
    """Train ``model`` for ``train_cfg.max_steps`` optimizer steps (see the module docstring)."""
    cfg = train_cfg
    writable_dir(cfg.out_dir, "train.out_dir")
    env = D.setup(cfg.distributed, cfg.device, cfg.parallel)
    dtype = dtype_name(cfg.dtype, env.device, "train.dtype")
    accum = grad_accum_steps(cfg, env.dp_size)
    S.seed_everything(cfg.seed + env.dp_rank)  # the ranks of a tp group (and the stages) draw the same dropout
    if env.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    raw = model.to(env.device)
    wanted = None if params is None else {id(p) for p in params}
    names = [n for n, p in raw.named_parameters() if p.requires_grad and (wanted is None or id(p) in wanted)]
    if wanted is not None and len(names) != len(wanted):
        raise UserError("train(params=...) holds tensors that are not parameters of the model.")

    manager = CheckpointManager(cfg.out_dir, cfg.keep_last)
    if env.is_main:  # saves killed before their rename leave hidden temp dirs behind: reclaim the space
        count, size = manager.remove_unfinished()
        if count:
            print(f"train: removed {count} unfinished checkpoint save(s) left in {cfg.out_dir} by an interrupted run "
                  f"({size / 1e6:.1f} MB)", file=sys.stderr)
    resume_path = None
    if cfg.resume == "auto":
        resume_path = S.resume_point(manager, say=env.is_main)
    elif cfg.resume != "never":
        resume_path = Path(cfg.resume)
        if not resume_path.is_dir():
            raise UserError(f"train.resume={cfg.resume!r} is not a checkpoint directory; use auto, never or a step_* path.")
    state = S.read_resume_state(resume_path, raw, env, optim_cfg.name) if resume_path else None
    if state is not None:  # weights go in before wrapping, so FSDP shards the resumed values
        S.load_weights_into(resume_path, raw, D.DistEnv(env.rank, env.world_size, env.local_rank, env.device, "none"), weights_fn)

    fpt = flops_per_token if flops_per_token is not None else F.flops_per_token(raw, cfg.seq_len)  # the whole model's
    pipeline = None
    if env.pp > 1:  # this rank keeps its stage of the model (raw is pruned to it)
        if cfg.compile:
            raise UserError("train.compile with train.parallel.pp > 1 is not built; compile per stage is future work, "
                            "set one of them off.")
        pipeline = Pipeline(raw, env, accum, cfg.parallel.pp_schedule, keep_whole=eval_fn is not None)
        wrapped = pipeline.module
    else:
        wrapped = D.wrap_model(raw, env)
    by_name = dict(raw.named_parameters())  # FSDP2/TP replaced the Parameters (a stage dropped some): look them up
    trainable = [by_name[n] for n in names if n in by_name]
    optimizer = build_optimizer(raw, trainable, optim_cfg, env.device)
    run = S.Run(cfg, optim_cfg, env, raw, torch.compile(wrapped) if cfg.compile else wrapped, trainable, optimizer,
               # fp16: autocast with a loss scale (GradScaler, on CUDA and on CPU), which skips the updates whose
               # gradients overflowed, halves the scale then, and doubles it after a run of good steps.
               LRSchedule(optim_cfg, cfg.max_steps), torch.amp.GradScaler(env.device.type) if dtype == "fp16" else None,
               SpikeDetector(cfg.spike), batches, loss_fn, accum, None if dtype == "fp32" else TORCH_DTYPES[dtype], manager,
               MetricsLogger(cfg.out_dir, enabled=False), GradClip(optim_cfg.grad_clip, optim_cfg.adaptive_clip), pipeline)
    changed = S.resume(run, state) if state is not None else {}
    extra = {"weights_fn": weights_fn, "recipe": recipe, "meta": checkpoint_meta, "tokenizer_path": tokenizer_path}

    run.logger = MetricsLogger(cfg.out_dir, enabled=env.is_main, tensorboard=cfg.tensorboard, total_steps=cfg.max_steps,
                               start_step=run.step, progress=cfg.progress)
    history = read_records(Path(cfg.out_dir) / "metrics.jsonl", max_step=run.step) if state is not None else []
    peak = cfg.peak_flops or F.device_peak_flops(env.device, dtype)
    n_train = sum(p.numel() for p in trainable)
    layout = f" dp {env.dp_size} x tp {env.tp} x pp {env.pp}" if cfg.parallel.model_parallel else ""
    run.logger.print(
        f"train: {env.world_size} process(es) [{env.kind}{layout}] on {env.device} | dtype {dtype}"
        f"{' | compiled' if cfg.compile else ''} | "
        f"micro-batch {cfg.batch_size}x{cfg.seq_len} | grad accum {accum} | "
        f"{cfg.batch_size * cfg.seq_len * accum * env.dp_size:,} tokens/step | trainable params {n_train:,} | "
        f"FLOPs/token {fpt:.3g} | peak {'n/a' if not peak else f'{peak:.3g}'} FLOPs/s"
        + (f" | resumed from {resume_path} at step {run.step}" if state is not None else ""))
    if changed:  # applied from this step on, not ignored: said on the console and in metrics.jsonl
        run.event("recipe_changed", applied=", ".join(f"{k}: {old} -> {now}" for k, (old, now) in changed.items()))
    if cfg.distributed != "none" and not env.active:
        run.logger.print(f"train: train.distributed={cfg.distributed} in a single process (not started by torchrun), so "
                         "training runs without it; launch with torchrun --nproc_per_node N to use N processes.")

    final_eval: dict = {}
    with _Interrupt() as interrupt:
        try:
            while run.step < cfg.max_steps:
                record, spike, bad, stop = _train_step(run, lambda: interrupt.requested)
                record["mfu"] = F.mfu(record["tok_per_s"], fpt, peak, env.world_size)
                run.bad_streak = run.bad_streak + 1 if bad else 0
                if spike:
                    run.event("loss_spike", loss=record["loss"], **spike, policy=cfg.spike.policy)
                    if cfg.spike.policy == "rollback" and S.rollback(run, weights_fn):
                        continue
                if run.bad_streak >= cfg.spike.max_bad_steps:
                    raise S.diverged(run, record["loss"], f"{run.bad_streak} consecutive steps were skipped")
                run.step += 1
                log_now = run.step % cfg.log_every == 0 or run.step == 1
                if log_now:  # reading the load syncs with the GPU: only on log steps
                    record.update(_expert_load(raw))
                if cfg.eval_every and run.step % cfg.eval_every == 0 and run.step < cfg.max_steps:
                    record.update(_evaluate(run, eval_fn))
                history.append(record)
                run.logger.log(record)
                run.logger.advance(record)
                if log_now:
                    run.logger.console(record, ["step", "loss", "lr", "grad_norm", "tok_per_s", "mfu"]
                                       + [k for k in record if k.startswith("val")])
                if stop:
                    path = S.save_step(run, extra)
                    run.logger.print(f"interrupted at step {run.step}; checkpoint {path or manager.path_for(run.step)} "
                                     "saved. Run the same command again to resume.")
                    raise KeyboardInterrupt
                if cfg.save_every and run.step % cfg.save_every == 0 and run.step < cfg.max_steps:
                    S.save_step(run, extra)
            final_eval = _evaluate(run, eval_fn)
            if final_eval:
                if history and history[-1]["step"] == run.step:
                    history[-1].update(final_eval)
                run.logger.log({"step": run.step, **final_eval})
                run.logger.console({"step": run.step, **final_eval})
            if manager.latest() != manager.path_for(run.step):  # not saved at this step yet
                S.save_step(run, extra)
            if run.bad_streak:  # the weights in hand made the last steps' losses bad: not a final model
                raise S.diverged(run, history[-1]["loss"], f"the last {run.bad_streak} step(s) before max_steps were "
                                "skipped (raise train.max_steps and run again to finish on healthy steps)")
            final = S.save_final(run, extra)
            if env.is_main:
                plot_loss_curve(read_records(Path(cfg.out_dir) / "metrics.jsonl"), Path(cfg.out_dir) / "loss.png",
                                title=Path(cfg.out_dir).name)
        finally:
            run.logger.close()
    return TrainResult(run.step, history, final, final_eval, run.events)
