"""Optimizers and learning-rate schedules for every training stage.

    groups = param_groups(model, params, cfg)           # decay / no-decay (/ Muon) groups
    opt = build_optimizer(model, params, cfg, device)   # AdamW or Muon(+AdamW)
    sched = LRSchedule(cfg, max_steps); sched.apply(opt, step)

AdamW follows GPT-2/Llama practice: weight decay on matrices only, never on norms, biases
or embedding tables. Muon (Jordan et al. 2024) orthogonalises the momentum of 2-D hidden
weights with a Newton-Schulz iteration; embeddings, the LM head, norms and biases stay on
AdamW inside the same optimizer object, so one state_dict describes the whole run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Literal, Optional

import torch
import torch.nn as nn

from utils.errors import UserError
from utils.grad_clip import AdaptiveClipConfig


@dataclass
class OptimConfig:
    """Recipe section ``optim``."""

    name: Literal["adamw", "muon"] = "adamw"
    lr: float = 3e-4  # AdamW peak LR (also the AdamW part of Muon)
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; <= 0 disables clipping (the norm is still logged)
    adaptive_clip: Optional[AdaptiveClipConfig] = None  # {} or {z_threshold: 2.5}: also clip spikes against the
    # recent norms (utils/grad_clip.py, ZClip-style), under the grad_clip ceiling
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # LR at the end of the decay, as a fraction of the peak
    decay_frac: float = 0.2  # wsd: fraction of max_steps spent decaying at the end
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_ns_steps: int = 5

    def __post_init__(self) -> None:
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise UserError(f"optim.betas must be two numbers in [0, 1), got {self.betas}.")
        if self.lr <= 0 or self.muon_lr <= 0:
            raise UserError(f"optim.lr and optim.muon_lr must be positive, got {self.lr} and {self.muon_lr}.")
        if self.weight_decay < 0:
            raise UserError(f"optim.weight_decay must be >= 0 (0: no decay), got {self.weight_decay}.")
        if self.eps <= 0:
            raise UserError(f"optim.eps must be positive, got {self.eps}.")
        if not 0.0 <= self.muon_momentum < 1.0:
            raise UserError(f"optim.muon_momentum must be in [0, 1), got {self.muon_momentum}.")
        if self.warmup_steps < 0:
            raise UserError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}.")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise UserError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}.")
        if not 0.0 < self.decay_frac <= 1.0:
            raise UserError(f"optim.decay_frac must be in (0, 1], got {self.decay_frac}.")


# ----------------------------------------------------------------------------- parameter groups


def _embedding_param_ids(model: nn.Module) -> set[int]:
    ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = getattr(model, "lm_head", None)
    if head is not None:  # the output projection shares the embedding's role (and is often tied)
        ids.add(id(head.weight))
    return ids


def param_groups(model: nn.Module, params: Optional[Iterable[nn.Parameter]], cfg: OptimConfig) -> list[dict]:
    """Split trainable params into optimizer groups.

    AdamW: ``decay`` (matrices of hidden layers) and ``no_decay`` (norms, biases, 1-D
    params, embeddings, lm_head). Muon: ``muon`` (2-D hidden weights) plus the AdamW groups
    for everything else. Each group carries ``base_lr`` that the schedule scales.
    Params are deduplicated (tied weights appear once).
    """
    wanted = None if params is None else {id(p) for p in params}
    embeds = _embedding_param_ids(model)
    seen: set[int] = set()
    muon, decay, no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen or (wanted is not None and id(p) not in wanted):
            continue
        seen.add(id(p))
        hidden_matrix = p.dim() >= 2 and id(p) not in embeds
        if cfg.name == "muon" and p.dim() == 2 and hidden_matrix:
            muon.append(p)
        elif hidden_matrix:
            decay.append(p)
        else:
            no_decay.append(p)
    if wanted is not None and len(seen) != len(wanted):
        raise UserError("train: some params passed to train(params=...) are not parameters of the model being trained.")
    if not seen:
        raise UserError("train: the model has no trainable parameters (all have requires_grad=False).")
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "base_lr": cfg.lr, "use_muon": False, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "base_lr": cfg.lr, "use_muon": False, "name": "no_decay"},
    ]
    if cfg.name == "muon":
        groups.insert(0, {"params": muon, "weight_decay": cfg.weight_decay, "base_lr": cfg.muon_lr, "use_muon": True, "name": "muon"})
    return [g for g in groups if g["params"]]


def build_optimizer(
    model: nn.Module, params: Optional[Iterable[nn.Parameter]], cfg: OptimConfig, device: torch.device
) -> torch.optim.Optimizer:
    """AdamW (fused kernel when every param is a plain tensor on CPU/CUDA) or Muon."""
    groups = param_groups(model, params, cfg)
    for g in groups:
        g["lr"] = g["base_lr"]
    if cfg.name == "muon":
        return Muon(groups, lr=cfg.muon_lr, momentum=cfg.muon_momentum, ns_steps=cfg.muon_ns_steps,
                    betas=tuple(cfg.betas), eps=cfg.eps)
    plain = all(type(p) is nn.Parameter or type(p) is torch.Tensor for g in groups for p in g["params"])
    fused = plain and device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused)


# ----------------------------------------------------------------------------- Muon


def newton_schulz(G: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximate the orthogonal polar factor U V^T of G (m, n) with a quintic iteration.

    X <- a X + (b A + c A^2) X with A = X X^T and (a, b, c) = (3.4445, -4.7750, 2.0315):
    coefficients chosen (Jordan 2024) to push every singular value towards 1 as fast as
    possible; they land in roughly [0.7, 1.2] rather than exactly 1, which training tolerates.
    Runs in bf16 on CUDA (tensor cores), fp32 elsewhere.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32)
    transposed = X.size(0) > X.size(1)
    if transposed:  # iterate on the wide side so A = X X^T is the smaller Gram matrix
        X = X.T
    X = X / (X.norm() + eps)  # Frobenius norm >= spectral norm, so singular values start <= 1
    for _ in range(steps):
        A = X @ X.T
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if transposed:
        X = X.T
    return X.to(G.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for groups with ``use_muon=True``, AdamW for the others (one optimizer object).

    Muon step for a 2-D weight W with gradient g:
        m <- mu m + g ;  u = g + mu m (Nesterov)
        O = NewtonSchulz(u) * sqrt(max(1, rows/cols))
        W <- W (1 - lr wd) - lr O
    Under FSDP2 the gradient is a sharded DTensor; the update needs the whole matrix, so it
    is gathered, orthogonalised, and re-sharded (simple, not the most efficient).
    """

    def __init__(self, groups: list[dict], lr: float = 0.02, momentum: float = 0.95, ns_steps: int = 5,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8):
        defaults = dict(lr=lr, momentum=momentum, ns_steps=ns_steps, betas=betas, eps=eps, weight_decay=0.0, use_muon=False)
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_group(group)
            else:
                self._adamw_group(group)
        return loss

    def _muon_group(self, group: dict) -> None:
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad)
            buf = state["momentum_buffer"]
            buf.mul_(mu).add_(p.grad)
            u = p.grad.add(buf, alpha=mu)
            update = _orthogonalised(u, group["ns_steps"])
            rows, cols = p.shape[0], p.shape[1]
            p.mul_(1 - lr * wd)
            p.add_(update, alpha=-lr * max(1.0, rows / cols) ** 0.5)

    def _adamw_group(self, group: dict) -> None:
        lr, wd, (beta1, beta2), eps = group["lr"], group["weight_decay"], group["betas"], group["eps"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            t = state["step"].item()
            state["exp_avg"].lerp_(p.grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            bias1, bias2 = 1 - beta1**t, 1 - beta2**t
            denom = (state["exp_avg_sq"] / bias2).sqrt_().add_(eps)
            p.mul_(1 - lr * wd)
            p.addcdiv_(state["exp_avg"], denom, value=-lr / bias1)


def _orthogonalised(u: torch.Tensor, steps: int) -> torch.Tensor:
    try:
        from torch.distributed.tensor import DTensor, distribute_tensor
    except ImportError:  # pragma: no cover - torch without distributed
        DTensor = None
    if DTensor is not None and isinstance(u, DTensor):
        full = newton_schulz(u.full_tensor(), steps)
        return distribute_tensor(full, u.device_mesh, u.placements)
    return newton_schulz(u, steps)


# ----------------------------------------------------------------------------- schedules


def lr_multiplier(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """LR as a fraction of the peak for the update that produces step ``step + 1``.

    cosine: linear warmup, then cosine from 1 down to min_lr_ratio at max_steps.
    wsd:    linear warmup, constant 1, then linear decay to min_lr_ratio over the last
            decay_frac of the run (warmup-stable-decay, Hu et al. 2024 MiniCPM).
    constant: linear warmup, then 1.
    """
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        span = max(1, max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_steps = max(1, int(round(cfg.decay_frac * max_steps)))
    decay_start = max_steps - decay_steps
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / decay_steps)
    return 1.0 - (1.0 - floor) * progress


class LRSchedule:
    """Sets each group's LR to base_lr * multiplier(step) * scale.

    ``scale`` starts at 1 and is lowered by the loss-spike rollback policy; it is the only
    state, so resume is exact (the step comes from the train state).
    """

    def __init__(self, cfg: OptimConfig, max_steps: int):
        self.cfg, self.max_steps, self.scale = cfg, max_steps, 1.0

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        mult = lr_multiplier(step, self.cfg, self.max_steps) * self.scale
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * mult
        return mult

    def state_dict(self) -> dict:
        return {"scale": self.scale}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
