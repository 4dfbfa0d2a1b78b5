"""Loss-spike and divergence detector, and the rule that stops a run that has diverged.

A step's loss is a spike when, after ``warmup_steps`` normal steps, either

    z = (loss - mu) / sqrt(var) > z_threshold      (a jump against the recent steps), or
    loss > max_loss_ratio * max(best, 1)            (far above the best the run has reached)

with mu, var an EMA of the mean and variance of the normal steps' losses
(mu <- b mu + (1-b) loss, var <- b var + (1-b) (loss - mu)^2, var bias-corrected like Adam's
moments, since it starts at 0) and best the lowest mu so far. The z-score catches a sudden
jump; the ratio catches a slow climb, which the EMA follows and the z-score never sees (a
learning rate ramped too high). A best below 1 counts as 1, so a finetuned loss of a few
hundredths wandering to a few tenths is not called a divergence. Spiking losses are not folded
into the statistics.

The training loop skips a spiking step's update or rolls back to the newest healthy checkpoint
with a lower LR (``policy``). Non-finite losses or gradients are always skipped. After
``max_bad_steps`` consecutive skipped (non-finite or spiking) steps the run has diverged: the
loop raises ``Diverged`` (a UserError: one paragraph, exit 2) and writes no ``final/``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

from utils.errors import UserError


class Diverged(UserError):
    """Training stopped because the run diverged (too many consecutive bad steps)."""


@dataclass
class SpikeConfig:
    """Recipe section ``train.spike``."""

    enabled: bool = True  # false: no spike detection (non-finite steps are still skipped and counted)
    z_threshold: float = 6.0
    max_loss_ratio: Optional[float] = 2.0  # loss above this times the best smoothed loss is a spike (raise it for
    # very noisy small-batch runs; null: off)
    ema_beta: float = 0.98
    warmup_steps: int = 50  # normal steps observed before the detector may fire
    policy: Literal["skip", "rollback"] = "skip"
    lr_drop: float = 0.5  # rollback: multiply the LR by this (cumulative)
    max_rollbacks: int = 3  # after that, spikes are skipped
    max_bad_steps: int = 10  # this many consecutive non-finite or spiking steps stop the run

    def __post_init__(self) -> None:
        if not 0.0 < self.ema_beta < 1.0:
            raise UserError(f"train.spike.ema_beta must be in (0, 1), got {self.ema_beta}.")
        if self.z_threshold <= 0:
            raise UserError(f"train.spike.z_threshold must be positive, got {self.z_threshold}.")
        if self.max_loss_ratio is not None and self.max_loss_ratio <= 1.0:
            raise UserError(f"train.spike.max_loss_ratio must be above 1 (or null to turn it off), got {self.max_loss_ratio}.")
        if not 0.0 < self.lr_drop <= 1.0:
            raise UserError(f"train.spike.lr_drop must be in (0, 1], got {self.lr_drop}.")
        if self.max_bad_steps < 1:
            raise UserError(f"train.spike.max_bad_steps must be >= 1, got {self.max_bad_steps}.")
        if self.warmup_steps < 0 or self.max_rollbacks < 0:
            raise UserError("train.spike.warmup_steps and max_rollbacks must be >= 0.")


def ema_moments(mean: float, var: float, x: float, beta: float, first: bool = False) -> tuple[float, float]:
    """One step of the exponential moving mean and variance (the first value only sets the mean):
    mu <- b mu + (1-b) x,  var <- b (var + (1-b) (x - mu_old)^2)."""
    if first:
        return x, 0.0
    delta = x - mean
    return mean + (1 - beta) * delta, beta * (var + (1 - beta) * delta * delta)


class SpikeDetector:
    def __init__(self, cfg: SpikeConfig):
        self.cfg = cfg
        self.mean, self.var, self.count = 0.0, 0.0, 0
        self.best = math.inf  # lowest EMA mean so far

    def check(self, loss: float) -> Optional[dict]:
        """Why ``loss`` is a spike (``{"z": ...}`` and/or ``{"over_best": loss / best}``), else None.
        The state is unchanged."""
        if not self.cfg.enabled or self.count < self.cfg.warmup_steps:
            return None
        why = {}
        z = (loss - self.mean) / math.sqrt(self.variance + 1e-12)
        if z > self.cfg.z_threshold:
            why["z"] = z
        ratio = self.cfg.max_loss_ratio
        if ratio is not None and loss > ratio * max(self.best, 1.0):
            why["over_best"] = loss / max(self.best, 1.0)
        return why or None

    @property
    def variance(self) -> float:
        """EMA variance with Adam-style bias correction: the raw EMA starts at 0 and would
        under-estimate the spread (and fire on noise) for the first ~1/(1-b) steps."""
        n = self.count - 1  # the first loss only sets the mean
        return self.var / (1 - self.cfg.ema_beta**n) if n > 0 else 0.0

    def update(self, loss: float) -> None:
        self.mean, self.var = ema_moments(self.mean, self.var, loss, self.cfg.ema_beta, first=self.count == 0)
        self.count += 1
        self.best = min(self.best, self.mean)

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count, "best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), int(state["count"])
        self.best = float(state.get("best", math.inf))  # checkpoints from before the ratio check lack it
