import json
import os
import signal
from pathlib import Path

import pytest
import torch

from model import ModelConfig
from tests.utils.faults import flip_bytes, safetensors_data_start
from tests.utils.helpers import SEQ, StreamLoader, ce_loss, tiny_model
from utils.checkpoint import load_train_state, load_weights, read_meta
from utils.errors import UserError
from utils.optim import OptimConfig
from utils.spike import Diverged, SpikeConfig
from utils.train_loop import TrainConfig, grad_accum_steps, train

ROOT = Path(__file__).resolve().parents[2]
torch.set_num_threads(1)  # the box is shared; one thread is also the most reproducible


def cfg(tmp, **kw) -> TrainConfig:
    base = dict(out_dir=str(tmp), max_steps=4, batch_size=2, seq_len=SEQ, device="cpu", progress=False, log_every=100)
    base.update(kw)
    return TrainConfig(**base)


OPT = OptimConfig(lr=1e-2, warmup_steps=1)


class CtrlCAt(StreamLoader):
    """Delivers a real SIGINT while fetching micro-batch ``at`` (counted from 0)."""

    def __init__(self, *a, at: int, **kw):
        super().__init__(*a, **kw)
        self.at = at

    def __next__(self):
        if self.i == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return super().__next__()


def test_resume_two_plus_two_equals_four_bitwise(tmp_path):
    full = train(tiny_model(), StreamLoader(2), ce_loss, cfg(tmp_path / "a", max_steps=4), OPT)
    # Ctrl-C during step 2: the loop finishes the step, checkpoints, then raises.
    with pytest.raises(KeyboardInterrupt):
        train(tiny_model(), CtrlCAt(2, at=1), ce_loss, cfg(tmp_path / "b", max_steps=4), OPT)
    assert sorted(p.name for p in (tmp_path / "b").glob("step_*")) == ["step_00000002"]
    # A new model with another init and a fresh loader: weights, optimizer, RNG and data
    # position must all come from the checkpoint.
    second = train(tiny_model(seed=123), StreamLoader(2), ce_loss, cfg(tmp_path / "b", max_steps=4), OPT)
    losses_full = [h["loss"] for h in full.history]
    assert len(losses_full) == 4 and [h["loss"] for h in second.history] == losses_full  # 2 reloaded + 2 new
    a, b = load_weights(full.checkpoint), load_weights(second.checkpoint)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert load_train_state(tmp_path / "b" / "step_00000004")["ranks"][0]["data"] == {"i": 4}
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4]
    assert (tmp_path / "b" / "loss.png").stat().st_size > 1000


def _spy_gradients(monkeypatch) -> list[dict]:
    """Record the gradient each optimizer step applies (after accumulation and scaling)."""
    import utils.train_loop as loop

    seen: list[dict] = []
    real_build = loop.build_optimizer

    def build(model, params, cfg, device):
        opt = real_build(model, params, cfg, device)
        names = {id(p): n for n, p in model.named_parameters()}
        real_step = opt.step

        def step(*a, **k):
            seen.append({names[id(p)]: p.grad.clone() for g in opt.param_groups for p in g["params"]})
            return real_step(*a, **k)

        opt.step = step
        return opt

    monkeypatch.setattr(loop, "build_optimizer", build)
    return seen


def test_grad_accum_8x1_equals_1x8(tmp_path, monkeypatch):
    grads = _spy_gradients(monkeypatch)
    big = train(tiny_model(), StreamLoader(8), ce_loss, cfg(tmp_path / "a", batch_size=8, max_steps=3), OPT)
    small = train(tiny_model(), StreamLoader(1), ce_loss,
                  cfg(tmp_path / "b", batch_size=1, global_batch_size=8, max_steps=3), OPT)
    assert small.history[0]["tokens"] == big.history[0]["tokens"] == 8 * SEQ
    for h1, h2 in zip(big.history, small.history):
        assert abs(h1["loss"] - h2["loss"]) < 1e-6 and abs(h1["grad_norm"] - h2["grad_norm"]) < 1e-6
    assert len(grads) == 6
    for g1, g2 in zip(grads[:3], grads[3:]):  # every step's applied gradient, element-wise
        assert max((g1[k] - g2[k]).abs().max().item() for k in g1) < 1e-6


def test_loss_weight_makes_accumulation_a_token_weighted_mean(tmp_path):
    """Micro-batches with different target counts: weighting by the count reproduces the
    single big batch's token mean (the gradient-accumulation bug HF fixed in 2024)."""
    mask = torch.ones(8, SEQ, dtype=torch.bool)
    mask[:4, SEQ // 2:] = False  # first half of the rows has half its targets masked

    class Masked(StreamLoader):
        def __next__(self):
            x, y = super().__next__()
            start = ((self.i - 1) * self.world + self.rank) * self.B % 8
            y = y.masked_fill(~mask[start:start + self.B], -100)
            return x, y

    def weighted(model, batch):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1).float(), y.flatten(), ignore_index=-100)
        return loss, {"loss_weight": float((y != -100).sum())}

    big = train(tiny_model(), Masked(8, n_rows=8 + 1), weighted, cfg(tmp_path / "a", batch_size=8, max_steps=2), OPT)
    small = train(tiny_model(), Masked(4, n_rows=8 + 4), weighted,
                  cfg(tmp_path / "b", batch_size=4, global_batch_size=8, max_steps=2), OPT)
    for h1, h2 in zip(big.history, small.history):
        assert abs(h1["loss"] - h2["loss"]) < 1e-6 and abs(h1["grad_norm"] - h2["grad_norm"]) < 1e-5


def test_trainable_params_change_frozen_do_not(tmp_path):
    model = tiny_model()
    frozen = {"embed.weight", "layers.0.attn.q_proj.weight", "layers.1.ffn_norm.weight"}
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, StreamLoader(2), ce_loss, cfg(tmp_path, max_steps=2), OptimConfig(lr=1e-2, warmup_steps=0))
    for n, p in model.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        assert changed == (n not in frozen), n


def test_nonfinite_loss_skips_update_and_reports(tmp_path):
    def poisoned(model, batch):
        loss, m = ce_loss(model, batch)
        return (loss * float("nan") if model.training and poisoned.calls == 1 else loss), m

    poisoned.calls = 0

    def counting(model, batch):
        out = poisoned(model, batch)
        poisoned.calls += 1
        return out

    model = tiny_model()
    snapshots = []

    class Spy(StreamLoader):
        def __next__(self):
            snapshots.append({n: p.detach().clone() for n, p in model.named_parameters()})
            return super().__next__()

    res = train(model, Spy(2), counting, cfg(tmp_path, max_steps=3), OPT)
    # Step 2 had a NaN loss: the weights entering step 3 equal those entering step 2.
    assert all(torch.equal(snapshots[1][n], snapshots[2][n]) for n in snapshots[1])
    assert not all(torch.equal(snapshots[0][n], snapshots[1][n]) for n in snapshots[0])
    assert [e["event"] for e in res.events] == ["nonfinite"] and res.events[0]["step"] == 1
    events = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if "event" in x]
    assert events and events[0]["event"] == "nonfinite"


def _spiky(spike_at: set[int]):
    def fn(model, batch):
        loss, m = ce_loss(model, batch)
        fn.calls += 1
        return (loss * 50 if fn.calls in spike_at else loss), m

    fn.calls = 0
    return fn


def test_spike_skip_policy(tmp_path):
    spike = SpikeConfig(warmup_steps=3, z_threshold=6.0, policy="skip")
    res = train(tiny_model(), StreamLoader(2), _spiky({6}), cfg(tmp_path, max_steps=8, spike=spike), OPT)
    assert [(e["event"], e["step"]) for e in res.events] == [("loss_spike", 5)]
    assert res.final_step == 8 and "spike_z" in res.history[5]


def test_spike_rollback_policy_reloads_last_checkpoint_and_lowers_lr(tmp_path):
    spike = SpikeConfig(warmup_steps=3, z_threshold=6.0, policy="rollback", lr_drop=0.5)
    res = train(tiny_model(), StreamLoader(2), _spiky({7}), cfg(tmp_path, max_steps=8, save_every=4, spike=spike),
                OptimConfig(lr=1e-2, warmup_steps=1, schedule="constant"))
    kinds = [e["event"] for e in res.events]
    assert kinds == ["loss_spike", "rollback"]
    rb = res.events[1]
    assert rb["from_step"] == 6 and rb["to_step"] == 4 and rb["lr_scale"] == 0.5
    assert res.final_step == 8
    assert res.history[-1]["lr"] == pytest.approx(0.5e-2)
    assert load_train_state(tmp_path / "step_00000008")["schedule"]["scale"] == 0.5


def test_a_step_with_nothing_to_learn_is_a_user_error(tmp_path):
    """Every target masked (an SFT prompt longer than seq_len): a ZeroDivisionError traceback before."""
    def all_masked(model, batch):
        loss, m = ce_loss(model, batch)
        return loss * 0, {"loss_weight": 0.0}

    with pytest.raises(UserError, match="step 1: no micro-batch on any process holds a token to learn from"):
        train(tiny_model(), StreamLoader(1), all_masked, cfg(tmp_path, batch_size=1, global_batch_size=2), OPT)


def test_batch_not_dividing_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not divide"):
        grad_accum_steps(cfg(tmp_path, global_batch_tokens=1000), world_size=2)
    assert grad_accum_steps(cfg(tmp_path, global_batch_tokens=2 * SEQ * 2 * 3), world_size=2) == 3
    with pytest.raises(UserError, match="does not divide"):
        grad_accum_steps(cfg(tmp_path, global_batch_size=6), world_size=4)


def test_resume_from_another_model_is_a_user_error(tmp_path):
    train(tiny_model(), StreamLoader(2), ce_loss, cfg(tmp_path / "a", max_steps=1), OPT)
    other = tiny_model(cfg=ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, max_seq_len=64))
    with pytest.raises(UserError, match="different model"):
        train(other, StreamLoader(2), ce_loss, cfg(tmp_path / "b", resume=str(tmp_path / "a" / "step_00000001")), OPT)
    with pytest.raises(UserError, match="cannot be resumed"):
        train(tiny_model(), StreamLoader(2), ce_loss, cfg(tmp_path / "c", resume=str(tmp_path / "a" / "final")), OPT)
    with pytest.raises(UserError, match="optim.name"):
        train(tiny_model(), StreamLoader(2), ce_loss, cfg(tmp_path / "a", max_steps=2), OptimConfig(name="muon"))


def test_bf16_autocast_on_cpu_tracks_fp32(tmp_path):
    fp32 = train(tiny_model(), StreamLoader(2), ce_loss, cfg(tmp_path / "a", max_steps=3), OPT)
    bf16 = train(tiny_model(), StreamLoader(2), ce_loss, cfg(tmp_path / "b", max_steps=3, dtype="bf16"), OPT)
    for a, b in zip(fp32.history, bf16.history):
        assert a["loss"] != b["loss"] and abs(a["loss"] - b["loss"]) < 0.05  # autocast really ran, and is close
    assert all(v.dtype == torch.float32 for v in load_weights(bf16.checkpoint).values())  # master weights stay fp32
    # fp16 with its loss scale: tests/utils/test_precision.py


# ----------------------------------------------------------------------------- divergence


def _nan_at(calls: set[int] | range):
    """ce_loss, but NaN on the given loss_fn calls (1-based; one call per step here)."""
    def fn(model, batch):
        loss, m = ce_loss(model, batch)
        fn.calls += 1
        return (loss * float("nan") if fn.calls in calls else loss), m

    fn.calls = 0
    return fn


def test_a_run_that_stays_nonfinite_stops_and_writes_no_final(tmp_path, capsys):
    spike = SpikeConfig(max_bad_steps=5)
    # NaN from step 5 on: steps 5-9 are skipped, the fifth in a row stops the run (it ran to the end before).
    with pytest.raises(Diverged, match=r"diverged at step 9: 5 consecutive steps .*newest healthy checkpoint is "
                                       r".*step_00000004; running the same command again resumes from it"):
        train(tiny_model(), StreamLoader(2), _nan_at(range(5, 10**6)), cfg(tmp_path, max_steps=40, save_every=4,
                                                                          keep_last=1, spike=spike), OPT)
    assert not (tmp_path / "final").exists()
    # step 8 was saved mid-streak: marked unhealthy; keep_last=1 kept it and, beside it, the newest healthy one.
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000004", "step_00000008"]
    assert read_meta(tmp_path / "step_00000004")["healthy"] is True and read_meta(tmp_path / "step_00000008")["healthy"] is False
    events = [json.loads(x)["event"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if "event" in x]
    assert events == ["nonfinite"] * 5 + ["diverged"]
    # Run again (the divergence fixed): resume=auto starts from the healthy checkpoint, not the newest.
    capsys.readouterr()
    res = train(tiny_model(), StreamLoader(2), ce_loss, cfg(tmp_path, max_steps=6, keep_last=1), OPT)
    assert "resuming from the newest healthy checkpoint" in capsys.readouterr().err
    assert [h["step"] for h in res.history] == [1, 2, 3, 4, 5, 6] and (tmp_path / "final").is_dir()


def test_bad_last_steps_mean_no_final(tmp_path):
    with pytest.raises(Diverged, match="the last 1 step"):
        train(tiny_model(), StreamLoader(2), _nan_at({4}), cfg(tmp_path, max_steps=4), OPT)
    assert not (tmp_path / "final").exists() and read_meta(tmp_path / "step_00000004")["healthy"] is False


def _climbing(start: int, per_call: float):
    """ce_loss times a factor that grows steadily from call ``start`` on: a slow divergence."""
    def fn(model, batch):
        loss, m = ce_loss(model, batch)
        fn.calls += 1
        return loss * (1 + per_call * max(0, fn.calls - start)), m

    fn.calls = 0
    return fn


def test_a_slow_climb_is_stopped_early_and_the_healthy_checkpoint_survives_pruning(tmp_path):
    """The loss climbs 5% of its value per step from step 20: the ratio to the best fires as it
    passes 2x (the z-score alone let such a run go on to 2000x); skipping cannot help, so after
    max_bad_steps the run stops. keep_last=2 would have pruned every healthy checkpoint."""
    spike = SpikeConfig(warmup_steps=10, max_bad_steps=10)
    with pytest.raises(Diverged) as err:
        train(tiny_model(), StreamLoader(2), _climbing(20, 0.05),
              cfg(tmp_path, max_steps=200, save_every=5, keep_last=2, spike=spike), OPT)
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first_spike = next(r for r in records if r.get("event") == "loss_spike")
    assert first_spike["over_best"] > 2.0 and first_spike["step"] < 45  # caught at 2x, not at 1e4
    healthy = [p for p in sorted(tmp_path.glob("step_*")) if read_meta(p)["healthy"]]
    assert healthy and str(healthy[-1]) in str(err.value)
    assert len(list(tmp_path.glob("step_*"))) == 3  # keep_last=2 unhealthy ones + the newest healthy one


def test_rollback_goes_to_the_newest_healthy_checkpoint(tmp_path):
    """Step 8 is non-finite (skipped) and saved mid-streak, so step_8 is unhealthy; the spike at
    step 11 rolls back to step 4, the newest checkpoint saved while the run was healthy."""
    spike = SpikeConfig(warmup_steps=3, policy="rollback")
    nan_at_8 = _nan_at({8})

    def fn(model, batch):
        loss, m = nan_at_8(model, batch)
        return (loss * 50 if nan_at_8.calls == 11 else loss), m

    res = train(tiny_model(), StreamLoader(2), fn, cfg(tmp_path, max_steps=12, save_every=4, spike=spike),
                OptimConfig(lr=1e-2, warmup_steps=1, schedule="constant"))
    rollback = next(e for e in res.events if e["event"] == "rollback")
    assert rollback["from_step"] == 10 and rollback["to_step"] == 4 and rollback["checkpoint"].endswith("step_00000004")
    assert res.final_step == 12 and (tmp_path / "final").is_dir()


# ----------------------------------------------------------------------------- resume and checkpoints


def test_an_lr_changed_on_resume_is_applied_and_logged(tmp_path, monkeypatch):
    """Before: the optimizer kept the checkpoint's LR while metrics.jsonl logged the new one."""
    import utils.train_loop as loop

    used: list[list[float]] = []
    real_build = loop.build_optimizer

    def build(*a, **k):
        opt = real_build(*a, **k)
        real_step = opt.step
        opt.step = lambda *x, **y: (used.append([(g["lr"], g["weight_decay"]) for g in opt.param_groups]), real_step(*x, **y))[1]
        return opt

    monkeypatch.setattr(loop, "build_optimizer", build)
    const = dict(warmup_steps=0, schedule="constant")
    train(tiny_model(), StreamLoader(2), ce_loss, cfg(tmp_path, max_steps=2), OptimConfig(lr=1e-2, weight_decay=0.1, **const))
    res = train(tiny_model(), StreamLoader(2), ce_loss, cfg(tmp_path, max_steps=4), OptimConfig(lr=3e-2, weight_decay=0.0, **const))
    assert used[:2] == [[(1e-2, 0.1), (1e-2, 0.0)]] * 2 and used[2:] == [[(3e-2, 0.0), (3e-2, 0.0)]] * 2
    assert [h["lr"] for h in res.history] == [1e-2, 1e-2, 3e-2, 3e-2]  # the log says what was done
    event = next(e for e in res.events if e["event"] == "recipe_changed")
    assert event["applied"] == "optim.lr: 0.01 -> 0.03, optim.weight_decay: 0.1 -> 0.0"


def test_unfinished_saves_are_removed_at_start(tmp_path, capsys):
    import multiprocessing as mp

    from tests.utils.faults import write_then_die

    train(tiny_model(), StreamLoader(2), ce_loss, cfg(tmp_path, max_steps=2), OPT)
    for _ in range(2):  # two saves killed mid-write, as by SIGKILL or a power cut
        proc = mp.get_context("spawn").Process(target=write_then_die, args=(tmp_path / "step_00000003",))
        proc.start()
        proc.join(120)
        assert proc.exitcode == 1
    orphans = list(tmp_path.glob(".step_00000003.tmp-*"))
    assert len(orphans) == 2
    size = sum(f.stat().st_size for d in orphans for f in d.rglob("*") if f.is_file())
    capsys.readouterr()
    res = train(tiny_model(), StreamLoader(2), ce_loss, cfg(tmp_path, max_steps=3), OPT)
    assert f"removed 2 unfinished checkpoint save(s) left in {tmp_path} by an interrupted run ({size / 1e6:.1f} MB)" \
        in capsys.readouterr().err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")] and res.history[-1]["step"] == 3


@pytest.mark.parametrize("damage,fragment", [
    (lambda d: flip_bytes(d / "model.safetensors", 4, seed=0, start=safetensors_data_start(d / "model.safetensors")),
     "model.safetensors does not match the checksum"),  # resumed silently at loss 3113 before
    (lambda d: flip_bytes(d / "train_state.pt", 1, seed=0, start=2000), "train_state.pt does not match the checksum"),
    (lambda d: (d / "meta.json").write_text("\x00garbage{"), "meta.json is not valid JSON"),
    (lambda d: (d / "model_config.json").write_text('{"d_model": "big"}'), "model_config.json holds an invalid model config \(d_model='big', expected int"),
])
def test_damaged_resume_checkpoints_are_one_clear_error(tmp_path, damage, fragment):
    """The newest of two checkpoints is damaged: an error naming it, not a quiet resume from the older one."""
    train(tiny_model(), StreamLoader(2), ce_loss, cfg(tmp_path, max_steps=4, save_every=2), OPT)
    damage(tmp_path / "step_00000004")
    with pytest.raises(UserError, match=fragment):
        train(tiny_model(), StreamLoader(2), ce_loss, cfg(tmp_path, max_steps=5), OPT)
