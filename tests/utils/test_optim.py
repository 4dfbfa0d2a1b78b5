import io

import pytest
import torch

from model import ModelConfig, Transformer
from utils.errors import UserError
from utils.optim import LRSchedule, Muon, OptimConfig, build_optimizer, lr_multiplier, newton_schulz, param_groups

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, qkv_bias=True, tie_embeddings=False)


def test_newton_schulz_output_is_nearly_orthogonal():
    torch.manual_seed(0)
    for shape in [(16, 16), (24, 8), (8, 40)]:
        G = torch.randn(*shape)
        X = newton_schulz(G, steps=5)
        s = torch.linalg.svdvals(X)
        # The quintic's tuned coefficients leave singular values in ~[0.7, 1.2], not exactly 1.
        assert s.min() > 0.6 and s.max() < 1.25, (shape, s)
        # Same direction as the exact polar factor U V^T.
        U, _, Vh = torch.linalg.svd(G, full_matrices=False)
        cos = (X * (U @ Vh)).sum() / (X.norm() * (U @ Vh).norm())
        assert cos > 0.97, (shape, cos)


def test_muon_update_is_orthogonal_and_loss_falls():
    torch.manual_seed(0)
    A = torch.randn(32, 16)
    W_true = torch.randn(16, 24)
    W = torch.nn.Parameter(torch.zeros(16, 24))
    opt = Muon([{"params": [W], "use_muon": True, "weight_decay": 0.0, "lr": 0.05}], momentum=0.9)
    losses, n = [], 100
    for it in range(n):
        # Orthogonalised steps have a fixed spectral size, so the LR must decay to converge.
        opt.param_groups[0]["lr"] = 0.3 * (1 - it / n) if it else 0.05
        loss = ((A @ W - A @ W_true) ** 2).mean()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        before = W.detach().clone()
        opt.step()
        if it == 0:
            # First step: the buffer is g, the Nesterov input g + 0.9 g, no decay, r < c;
            # so the update is lr * NS(1.9 g), whose singular values are all near 1.
            update = (before - W.detach()) / 0.05
            s = torch.linalg.svdvals(update)
            assert s.min() > 0.6 and s.max() < 1.25, s
    assert losses[-1] < 1e-3 * losses[0], (losses[0], losses[-1])


def test_muon_state_dict_round_trip_is_exact():
    torch.manual_seed(0)

    def make():
        torch.manual_seed(1)
        model = Transformer(CFG)
        return model, build_optimizer(model, None, OptimConfig(name="muon"), torch.device("cpu"))

    def step(model, opt, seed):
        torch.manual_seed(seed)
        x = torch.randint(0, 64, (2, 8))
        model(x).logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()

    a, opt_a = make()
    step(a, opt_a, 0)
    b, opt_b = make()
    # Through bytes, as a checkpoint does (a live state_dict shares its step tensors).
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "optim": opt_a.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    b.load_state_dict(saved["model"])
    opt_b.load_state_dict(saved["optim"])
    step(a, opt_a, 1)
    step(b, opt_b, 1)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), n


def test_param_groups_no_decay_on_norms_biases_embeddings():
    model = Transformer(CFG)
    groups = {g["name"]: g for g in param_groups(model, None, OptimConfig())}
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups["decay"]["params"]}
    no_decay = {names[id(p)] for p in groups["no_decay"]["params"]}
    assert "embed.weight" in no_decay and "lm_head.weight" in no_decay
    assert all(("norm" in n or n.endswith("bias") or n in ("embed.weight", "lm_head.weight")) for n in no_decay)
    assert "layers.0.attn.q_proj.weight" in decay and "layers.1.ffn.down_proj.weight" in decay
    assert not any(n.endswith("bias") or "norm" in n for n in decay)
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    assert len(decay) + len(no_decay) == len(list(model.parameters()))


def test_muon_groups_take_hidden_matrices_only():
    model = Transformer(CFG)
    groups = {g["name"]: g for g in param_groups(model, None, OptimConfig(name="muon"))}
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for p in groups["muon"]["params"]}
    assert muon and all(n.startswith("layers.") and n.endswith("proj.weight") for n in muon)
    assert "embed.weight" not in muon and "lm_head.weight" not in muon
    assert groups["muon"]["base_lr"] == 0.02


def test_param_subset_and_frozen_params():
    model = Transformer(CFG)
    model.embed.weight.requires_grad_(False)
    subset = [model.layers[0].attn.q_proj.weight, model.norm.weight]
    groups = param_groups(model, subset, OptimConfig())
    got = {id(p) for g in groups for p in g["params"]}
    assert got == {id(p) for p in subset}
    with pytest.raises(UserError, match="not parameters"):
        param_groups(model, [torch.nn.Parameter(torch.zeros(2))], OptimConfig())


def test_schedules():
    cos = OptimConfig(schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_multiplier(0, cos, 100) == pytest.approx(0.1)
    assert lr_multiplier(9, cos, 100) == pytest.approx(1.0)
    assert lr_multiplier(10, cos, 100) == pytest.approx(1.0)
    assert lr_multiplier(55, cos, 100) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_multiplier(100, cos, 100) == pytest.approx(0.1)
    wsd = OptimConfig(schedule="wsd", warmup_steps=10, decay_frac=0.2, min_lr_ratio=0.0)
    assert lr_multiplier(50, wsd, 100) == 1.0 and lr_multiplier(79, wsd, 100) == 1.0
    assert lr_multiplier(90, wsd, 100) == pytest.approx(0.5)
    assert lr_multiplier(100, wsd, 100) == pytest.approx(0.0)
    const = OptimConfig(schedule="constant", warmup_steps=0)
    assert lr_multiplier(0, const, 10) == 1.0 and lr_multiplier(9, const, 10) == 1.0
    # monotone non-increasing after warmup
    vals = [lr_multiplier(s, cos, 100) for s in range(10, 101)]
    assert all(a >= b - 1e-12 for a, b in zip(vals, vals[1:]))


def test_schedule_scales_each_group_from_its_base_lr():
    model = Transformer(CFG)
    opt = build_optimizer(model, None, OptimConfig(name="muon", warmup_steps=0, schedule="constant", lr=1e-3), torch.device("cpu"))
    sched = LRSchedule(OptimConfig(name="muon", warmup_steps=0, schedule="constant"), 10)
    sched.scale = 0.5
    sched.apply(opt, 3)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert set(lrs) == {"muon", "no_decay"}  # every hidden matrix is on Muon
    assert lrs["muon"] == pytest.approx(0.01) and lrs["no_decay"] == pytest.approx(5e-4)


def test_bad_optim_config():
    bad = [({"betas": [0.9]}, "betas"), ({"betas": [0.9, 1.0]}, "betas"), ({"lr": 0.0}, "optim.lr"),
           ({"muon_lr": -0.02}, "muon_lr"), ({"warmup_steps": -1}, "warmup_steps"), ({"min_lr_ratio": 2.0}, "min_lr_ratio"),
           ({"decay_frac": 0.0}, "decay_frac"), ({"decay_frac": 1.5}, "decay_frac")]
    bad += [({"weight_decay": -0.1}, "weight_decay must be >= 0"), ({"eps": 0.0}, "eps")]  # trained silently before
    for fields, name in bad:
        with pytest.raises(UserError, match=name):
            OptimConfig(**fields)
    # the edges of each range are valid: a check that is off by one refuses them
    for fields in ({"betas": [0.0, 0.999]}, {"warmup_steps": 0}, {"min_lr_ratio": 0.0}, {"min_lr_ratio": 1.0}, {"decay_frac": 1.0}):
        OptimConfig(**fields)
