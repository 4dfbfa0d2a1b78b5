"""What the headline commands turn on, under test: --compile, fp16 with its loss scale (GradScaler on
CPU), and adaptive gradient clipping (utils/grad_clip.py) against planted gradient spikes."""
import functools
import math

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from tests.utils.helpers import StreamLoader, ce_loss, tiny_model
from utils.grad_clip import AdaptiveClipConfig, GradClip
from utils.optim import OptimConfig
from utils.spike import SpikeConfig
from utils.train_loop import train
from tests.utils.test_train_loop import OPT, cfg


class ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times ``factor`` backward (a gradient spike or an fp16 overflow
    that the loss itself does not show)."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.factor, None


def spiking_loss(at: dict[int, float], snapshots: dict | None = None):
    """ce_loss whose gradient is multiplied by at[call] on those loss_fn calls (1-based, one call per
    step here); ``snapshots`` collects the parameters each call sees."""
    def fn(model, batch):
        fn.calls += 1
        if snapshots is not None:
            snapshots[fn.calls] = [p.detach().clone() for p in model.parameters()]
        loss, m = ce_loss(model, batch)
        return (ScaleGrad.apply(loss, at[fn.calls]) if fn.calls in at else loss), m

    fn.calls = 0
    return fn


@pytest.mark.slow  # inductor compiles the model on CPU (C++ codegen): ~20-60 s
def test_compiled_training_matches_eager(tmp_path, capsys):
    """Three steps through the loop with train.compile and without: the same losses within 1e-5
    (inductor reorders float sums: the difference measured is ~5e-7)."""
    eager = train(tiny_model(), StreamLoader(2), ce_loss, cfg(tmp_path / "eager", max_steps=3), OPT)
    compiled = train(tiny_model(), StreamLoader(2), ce_loss, cfg(tmp_path / "compiled", max_steps=3, compile=True), OPT)
    assert "| compiled" in capsys.readouterr().err
    a, b = [h["loss"] for h in eager.history], [h["loss"] for h in compiled.history]
    assert len(a) == 3 and a[0] != a[-1]  # it trained
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-5, (a, b)


def test_fp16_loss_scale_skips_overflow_and_grows(tmp_path, monkeypatch):
    """fp16 autocast on CPU with the GradScaler: an overflowing gradient at step 3 skips that update
    (the weights step 4 sees are step 3's), halves the scale and is not a bad step (max_bad_steps=1
    would stop the run); two good steps in a row double the scale."""
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0**10,
                                                                   growth_interval=2))
    seen: dict = {}
    run = train(tiny_model(), StreamLoader(2), spiking_loss({3: math.inf}, seen),
                cfg(tmp_path / "fp16", max_steps=6, dtype="fp16", spike=SpikeConfig(max_bad_steps=1)), OPT)
    scales = [h["loss_scale"] for h in run.history]
    assert scales == [1024.0, 1024.0, 2048.0, 1024.0, 1024.0, 2048.0], scales
    assert not math.isfinite(run.history[2]["grad_norm"]) and [e["event"] for e in run.events] == ["nonfinite"]
    assert all(torch.equal(a, b) for a, b in zip(seen[3], seen[4]))  # step 3's update was skipped
    assert not all(torch.equal(a, b) for a, b in zip(seen[2], seen[3]))  # the others were applied
    assert run.checkpoint is not None and run.checkpoint.is_dir()
    fp32 = train(tiny_model(), StreamLoader(2), ce_loss, cfg(tmp_path / "fp32", max_steps=2), OPT)
    for a, b in zip(fp32.history, run.history[:2]):  # fp16 autocast really ran, and is close
        assert a["loss"] != b["loss"] and abs(a["loss"] - b["loss"]) < 0.05


def test_adaptive_limit_is_the_moving_mean_plus_z_sigma():
    clip = GradClip(10.0, AdaptiveClipConfig(z_threshold=2.0, ema_beta=0.5, warmup_steps=3))
    for n in (1.0, 3.0):
        assert clip.limit() == 10.0  # warm-up: only the fixed ceiling
        clip.update(n)
    clip.update(2.0)
    # by hand: mean 1 -> 2 -> 2; var 0 -> 0.5*(0 + 0.5*4) = 1 -> 0.5*(1 + 0.5*0) = 0.5
    assert clip.mean == 2.0 and clip.var == 0.5 and clip.limit() == pytest.approx(2.0 + 2.0 * math.sqrt(0.5))
    w = torch.nn.Parameter(torch.zeros(4))
    w.grad = torch.full((4,), 50.0)  # norm 100: clipped down to the limit
    before, after = clip.clip([w])
    assert before == pytest.approx(100.0) and after == pytest.approx(clip.limit())
    assert w.grad.norm().item() == pytest.approx(clip.limit(), rel=1e-5)
    clip.update(after)  # the clipped value, not the spike, enters the statistics
    assert clip.mean < 3.0
    fixed = GradClip(1.0)
    fixed.update(1e6)
    assert fixed.limit() == 1.0 and GradClip(0.0).limit() == math.inf


@pytest.fixture
def applied_norms():
    """The global norm of the gradients each optimizer step applies (an optimizer pre-step hook)."""
    norms: list[float] = []
    handle = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: norms.append(float(torch.nn.utils.get_total_norm(
            [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]))))
    yield norms
    handle.remove()


def test_planted_gradient_spike_is_clipped_to_the_recent_norms(tmp_path, applied_norms):
    """A gradient 1000x too large at step 12: adaptive clipping applies it at mu + z sigma of the
    applied norms before it (computed here independently); without it (grad_clip off) the spike is
    applied whole, and the run's next losses stray further from the spike-free run."""
    adaptive = OptimConfig(lr=1e-2, warmup_steps=1, grad_clip=0.0, adaptive_clip=AdaptiveClipConfig(warmup_steps=5))
    plain = OptimConfig(lr=1e-2, warmup_steps=1, grad_clip=0.0)
    norms = applied_norms
    clean = train(tiny_model(), StreamLoader(2), ce_loss, cfg(tmp_path / "clean", max_steps=16), adaptive)
    norms.clear()
    clipped = train(tiny_model(), StreamLoader(2), spiking_loss({12: 1000.0}), cfg(tmp_path / "a", max_steps=16), adaptive)
    applied = list(norms)
    norms.clear()
    unclipped = train(tiny_model(), StreamLoader(2), spiking_loss({12: 1000.0}), cfg(tmp_path / "b", max_steps=16), plain)
    spike = clipped.history[11]
    assert spike["grad_norm"] > 100 * max(h["grad_norm"] for h in clipped.history[:11])
    mean, var = applied[0], 0.0  # the EMA of the 11 applied norms before the spike, by hand
    for n in applied[1:11]:
        mean, var = 0.97 * mean + 0.03 * n, 0.97 * (var + 0.03 * (n - mean) ** 2)
    assert applied[11] == pytest.approx(mean + 2.5 * math.sqrt(var), rel=1e-4)
    assert applied[11] == pytest.approx(spike["grad_norm_clipped"], rel=1e-4)
    assert norms[11] == pytest.approx(unclipped.history[11]["grad_norm"], rel=1e-4)  # the spike, applied whole
    after = slice(12, 16)
    gap = lambda run: sum(abs(a["loss"] - b["loss"]) for a, b in zip(run.history[after], clean.history[after]))  # noqa: E731
    assert gap(clipped) < 0.5 * gap(unclipped), (gap(clipped), gap(unclipped))


def test_adaptive_clip_state_resumes_with_the_run(tmp_path):
    """8 steps straight == 4 steps + resume + 4, with a spike at step 6 that only the saved statistics
    clip (warm-up 2): the clip state travels in train_state.pt."""
    opt = OptimConfig(lr=1e-2, warmup_steps=1, schedule="constant", adaptive_clip=AdaptiveClipConfig(warmup_steps=2))
    full = train(tiny_model(), StreamLoader(2), spiking_loss({6: 1000.0}), cfg(tmp_path / "a", max_steps=8), opt)
    train(tiny_model(), StreamLoader(2), spiking_loss({}), cfg(tmp_path / "b", max_steps=4), opt)
    resumed = train(tiny_model(), StreamLoader(2), spiking_loss({2: 1000.0}), cfg(tmp_path / "b", max_steps=8), opt)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    assert resumed.history[5]["grad_norm_clipped"] < resumed.history[5]["grad_norm"] / 10
