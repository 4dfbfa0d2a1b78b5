"""Loss-spike detector: z-score of the step's loss against an EMA of mean and variance.

    z = (loss - mu) / sqrt(var),  mu <- b mu + (1-b) loss,  var <- b var + (1-b) (loss - mu)^2

(var bias-corrected like Adam's moments, since it starts at 0).

A step whose z exceeds ``z_threshold`` (after ``warmup_steps`` normal steps) is a spike;
the training loop then skips the update or rolls back to the last checkpoint with a lower
LR (``policy``). Spiking losses are not folded into the statistics.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

from utils.errors import UserError


@dataclass
class SpikeConfig:
    """Recipe section ``train.spike``."""

    enabled: bool = True
    z_threshold: float = 6.0
    ema_beta: float = 0.98
    warmup_steps: int = 50  # normal steps observed before the detector may fire
    policy: Literal["skip", "rollback"] = "skip"
    lr_drop: float = 0.5  # rollback: multiply the LR by this (cumulative)
    max_rollbacks: int = 3  # after that, spikes are skipped

    def __post_init__(self) -> None:
        if not 0.0 < self.ema_beta < 1.0:
            raise UserError(f"train.spike.ema_beta must be in (0, 1), got {self.ema_beta}.")
        if self.z_threshold <= 0:
            raise UserError(f"train.spike.z_threshold must be positive, got {self.z_threshold}.")
        if not 0.0 < self.lr_drop <= 1.0:
            raise UserError(f"train.spike.lr_drop must be in (0, 1], got {self.lr_drop}.")


class SpikeDetector:
    def __init__(self, cfg: SpikeConfig):
        self.cfg = cfg
        self.mean, self.var, self.count = 0.0, 0.0, 0

    def check(self, loss: float) -> Optional[float]:
        """The z-score when ``loss`` is a spike, else None (state unchanged)."""
        if not self.cfg.enabled or self.count < self.cfg.warmup_steps:
            return None
        z = (loss - self.mean) / math.sqrt(self.variance + 1e-12)
        return z if z > self.cfg.z_threshold else None

    @property
    def variance(self) -> float:
        """EMA variance with Adam-style bias correction: the raw EMA starts at 0 and would
        under-estimate the spread (and fire on noise) for the first ~1/(1-b) steps."""
        n = self.count - 1  # the first loss only sets the mean
        return self.var / (1 - self.cfg.ema_beta**n) if n > 0 else 0.0

    def update(self, loss: float) -> None:
        if self.count == 0:
            self.mean, self.var = loss, 0.0
        else:
            b = self.cfg.ema_beta
            delta = loss - self.mean
            self.mean += (1 - b) * delta
            self.var = b * (self.var + (1 - b) * delta * delta)
        self.count += 1

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), int(state["count"])
