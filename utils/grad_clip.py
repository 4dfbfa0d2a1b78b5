"""Gradient clipping: the fixed max norm, and adaptive clipping against the recent norms.

    limit = optim.grad_clip                                   (fixed; <= 0: no limit)
    limit = min(optim.grad_clip, mu + z * sigma)              (optim.adaptive_clip, ZClip-style)

Adaptive clipping (Kumar et al. 2025, "ZClip"; AutoClip, Seetharaman et al. 2020, clips to a
percentile of the history instead): mu and sigma^2 are exponential moving averages of the
gradient norms the optimizer applied,

    mu <- b mu + (1 - b) n        sigma^2 <- b sigma^2 + (1 - b) (n - mu)^2

so a spike (a norm far above its recent level) is scaled down to mu + z sigma instead of to a
constant chosen before training, and the clipped value, not the spike, enters the statistics.
During the first ``warmup_steps`` applied steps only the fixed limit acts while the statistics
settle. The state is saved with every checkpoint, so a resumed run clips as the uninterrupted one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from utils.errors import UserError
from utils.spike import ema_moments


@dataclass
class AdaptiveClipConfig:
    """Recipe section ``optim.adaptive_clip`` (present: on)."""

    z_threshold: float = 2.5  # clip a norm above mu + z_threshold * sigma down to it
    ema_beta: float = 0.97  # b of the moving mean and variance of the applied norms
    warmup_steps: int = 25  # applied steps before the adaptive limit acts (the fixed one always does)

    def __post_init__(self) -> None:
        if self.z_threshold <= 0:
            raise UserError(f"optim.adaptive_clip.z_threshold must be positive, got {self.z_threshold}.")
        if not 0.0 < self.ema_beta < 1.0:
            raise UserError(f"optim.adaptive_clip.ema_beta must be in (0, 1), got {self.ema_beta}.")
        if self.warmup_steps < 1:
            raise UserError(f"optim.adaptive_clip.warmup_steps must be >= 1, got {self.warmup_steps}.")


class GradClip:
    """Clips the global gradient norm to ``limit()`` and keeps the adaptive statistics."""

    def __init__(self, max_norm: float, adaptive: Optional[AdaptiveClipConfig] = None):
        self.max_norm = max_norm if max_norm > 0 else math.inf
        self.adaptive = adaptive
        self.mean, self.var, self.count = 0.0, 0.0, 0

    def limit(self) -> float:
        """The norm gradients are clipped to at this step."""
        if self.adaptive is None or self.count < self.adaptive.warmup_steps:
            return self.max_norm
        return min(self.max_norm, self.mean + self.adaptive.z_threshold * math.sqrt(self.var))

    def clip(self, params: Iterable[torch.nn.Parameter], group=None) -> tuple[float, float]:
        """Scale the gradients of ``params`` down to ``limit()`` when their global norm is above it;
        returns (norm before, norm after). Collective for sharded (DTensor) gradients, and over
        ``group`` (pipeline stages, each holding its own parameters) when given."""
        grads = [p.grad for p in params if p.grad is not None]
        norm = float(global_norm(grads, group))
        limit = self.limit()
        if norm > limit:
            coef = limit / (norm + 1e-6)
            for g in grads:
                g.mul_(coef)
        return norm, min(norm, limit)

    def update(self, applied: float) -> None:
        """Fold the norm of an applied update into the statistics (adaptive clipping only)."""
        if self.adaptive is None or not math.isfinite(applied):
            return
        self.mean, self.var = ema_moments(self.mean, self.var, applied, self.adaptive.ema_beta, first=self.count == 0)
        self.count += 1

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), int(state["count"])


def global_norm(grads: list[torch.Tensor], group=None) -> torch.Tensor:
    """The 2-norm of all ``grads`` together: plain tensors, and DTensors (FSDP2 / TP shards) of any
    meshes, each mesh's part reduced by DTensor itself; summed in squares over ``group`` if given."""
    by_mesh: dict = {}
    for g in grads:
        by_mesh.setdefault(getattr(g, "device_mesh", None), []).append(g)
    squares = []
    for mesh, part in by_mesh.items():
        n = torch.nn.utils.get_total_norm(part)
        squares.append((n.full_tensor() if mesh is not None else n).double() ** 2)
    total = torch.stack(squares).sum() if squares else torch.zeros((), dtype=torch.float64)
    if group is not None:
        torch.distributed.all_reduce(total, group=group)
    return total.sqrt()
