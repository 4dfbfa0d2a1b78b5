"""The spike/divergence detector (utils/spike.py) on hand-made loss curves."""
import math
import random

import pytest

from utils.errors import UserError
from utils.spike import SpikeConfig, SpikeDetector


def first_fire(cfg: SpikeConfig, losses: list[float]):
    """Feed ``losses`` as the training loop does (only non-spiking losses update the statistics);
    return (index, reason) of the first spike, or None."""
    det = SpikeDetector(cfg)
    for i, loss in enumerate(losses):
        why = det.check(loss)
        if why:
            return i, why
        det.update(loss)
    return None


def noisy_plateau_then_ramp(slope: float, seed: int = 0) -> list[float]:
    """100 steps of a noisy loss near 4, then a steady climb of ``slope`` per step (an LR ramped
    too high): what a run that diverges slowly looks like."""
    rng = random.Random(seed)
    flat = [4.0 + rng.gauss(0, 0.05) for _ in range(100)]
    return flat + [4.0 + slope * t + rng.gauss(0, 0.05) for t in range(1, 1000)]


@pytest.mark.parametrize("slope", [0.005, 0.02, 0.05])
def test_a_steady_climb_is_caught_by_the_ratio_not_by_the_z_score(slope):
    losses = noisy_plateau_then_ramp(slope)
    # The z-score alone follows the climb with its EMA and never fires, up to 2.2-13x the best (the failure).
    assert first_fire(SpikeConfig(max_loss_ratio=None), losses) is None
    # With the ratio the run is stopped as the loss passes twice its best, on the step it does.
    i, why = first_fire(SpikeConfig(max_loss_ratio=2.0), losses)
    assert "over_best" in why and 8.0 < losses[i] < 8.0 + slope + 0.3
    assert all(x <= 2.0 * 4.05 for x in losses[:i])


def test_a_sudden_jump_is_caught_by_the_z_score():
    rng = random.Random(1)
    losses = [3.0 + rng.gauss(0, 0.02) for _ in range(80)] + [3.6]  # +20%: far out for the z-score, under 2x
    i, why = first_fire(SpikeConfig(), losses)
    assert i == 80 and set(why) == {"z"} and why["z"] > 6


def test_small_losses_near_zero_are_not_a_divergence():
    """A finetuned loss at 0.02 wandering to 0.5 is 25x its best, but not a divergence: a best under 1 counts as 1."""
    rng = random.Random(2)
    losses = [abs(0.02 + rng.gauss(0, 0.2)) for _ in range(300)]
    assert first_fire(SpikeConfig(z_threshold=1e9), losses) is None
    assert first_fire(SpikeConfig(z_threshold=1e9), losses + [2.5])[1] == {"over_best": pytest.approx(2.5)}


def test_nothing_fires_during_warmup_and_state_round_trips():
    cfg = SpikeConfig(warmup_steps=5)
    det = SpikeDetector(cfg)
    for loss in (9.0, 5.0, 4.0, 4.0):
        assert det.check(1e6) is None  # still warming up
        det.update(loss)
    det.update(4.0)
    assert det.check(1e6) is not None
    again = SpikeDetector(cfg)
    again.load_state_dict(det.state_dict())
    assert again.state_dict() == det.state_dict() and again.best == det.best < 9.0
    old = {k: v for k, v in det.state_dict().items() if k != "best"}  # a checkpoint from before the ratio check
    again.load_state_dict(old)
    assert again.best == math.inf


@pytest.mark.parametrize("key,value", [("max_loss_ratio", 1.0), ("max_bad_steps", 0), ("warmup_steps", -1)])
def test_bad_spike_settings_are_user_errors(key, value):
    with pytest.raises(UserError, match=key):
        SpikeConfig(**{key: value})
