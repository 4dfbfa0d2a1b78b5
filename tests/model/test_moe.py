"""DeepSeekMoE against a token-by-token reference; routing, balancing bias and aux loss by hand."""
import pytest
import torch
import torch.nn.functional as F

from model import ModelConfig, Transformer
from model.ffn import GatedMLP
from model.moe import MoE, moe_aux_loss, moe_load_stats, route, sequence_aux_loss, update_moe_biases

MOE = dict(n_routed_experts=8, n_shared_experts=1, n_experts_per_tok=2, moe_d_ff=16, scoring="sigmoid",
           n_group=4, topk_group=2, routed_scaling_factor=2.5, first_k_dense=1)


def cfg(**moe):
    return ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=48, ffn="moe", moe={**MOE, **moe})


def make_moe(**moe) -> MoE:
    torch.manual_seed(0)
    layer = MoE(cfg(**moe))
    layer.reset_extra_parameters()
    torch.nn.init.normal_(layer.router.weight, std=0.5)
    for lin in (layer.shared_experts.gate_proj, layer.shared_experts.up_proj, layer.shared_experts.down_proj):
        torch.nn.init.normal_(lin.weight, std=0.1)
    return layer


def reference(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """One token at a time, selection by sorting every allowed expert (no shared code with route)."""
    E, k, g = layer.n_experts, layer.k, layer.n_group
    out = []
    for t in x.reshape(-1, x.shape[-1]):
        logits = layer.router.weight @ t
        s = logits.softmax(-1) if layer.scoring == "softmax" else logits.sigmoid()
        biased = s + layer.expert_bias
        per = E // g
        rate = [sorted(biased[i * per : (i + 1) * per].tolist(), reverse=True) for i in range(g)]
        rate = [sum(r[:2]) if layer.scoring == "sigmoid" else r[0] for r in rate]
        groups = sorted(range(g), key=lambda i: -rate[i])[: layer.topk_group]
        allowed = [e for e in range(E) if e // per in groups]
        chosen = sorted(allowed, key=lambda e: -biased[e].item())[:k]
        w = s[chosen] / (s[chosen].sum() if layer.norm_topk_prob else 1.0) * layer.scaling
        y = layer.shared_experts(t)
        for wi, e in zip(w, chosen):
            ex = layer.experts
            h = F.silu(ex.gate_proj[e] @ t) * (ex.up_proj[e] @ t)
            y = y + wi * (ex.down_proj[e] @ h)
        out.append(y)
    return torch.stack(out).view_as(x)


@pytest.mark.parametrize("moe", [{}, {"scoring": "softmax", "n_group": 1, "topk_group": 1, "norm_topk_prob": False}])
def test_moe_matches_token_loop_reference(moe):
    layer = make_moe(**moe)
    with torch.no_grad():
        layer.expert_bias.copy_(torch.randn(8) * 0.2)
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        assert (layer(x) - reference(layer, x)).abs().max().item() < 1e-5
    assert layer.last_load.sum().item() == 3 * 7 * 2


def test_dispatch_gradients_match_reference():
    layer = make_moe()
    x = torch.randn(2, 5, 32, requires_grad=True)
    layer(x).square().sum().backward()
    got = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    x.grad = None
    reference(layer, x).square().sum().backward()
    want = [x.grad] + [p.grad for p in layer.parameters()]
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-5)


def test_group_limited_routing_and_bias_only_steers_selection():
    logits = torch.tensor([[5.0, 4.0, 0.0, 0.0, 3.0, 2.5, 2.0, 2.0]])
    w, e, s = route(logits, torch.zeros(8), k=2, scoring="sigmoid", n_group=4, topk_group=1)
    assert sorted(e[0].tolist()) == [0, 1]  # group 0 rates 5+4, the best
    w, e, _ = route(logits, torch.zeros(8), k=3, scoring="sigmoid", n_group=4, topk_group=2)
    assert sorted(e[0].tolist()) == [0, 1, 4]  # groups 0 and 2 (3 + 2.5) allowed
    bias = torch.tensor([0.0, 0, 0, 0, 0, 0, 0, 10.0])
    w, e, s = route(logits, bias, k=2, scoring="sigmoid", n_group=1, topk_group=1, norm_topk_prob=False)
    assert sorted(e[0].tolist()) == [0, 7]
    # the gate of expert 7 is its raw score, the bias does not leak into the output weights
    assert w[0, e[0].tolist().index(7)].item() == pytest.approx(torch.sigmoid(torch.tensor(2.0)).item())


def test_aux_free_bias_update_rule():
    model = Transformer(cfg(aux_free_bias_update_rate=0.01)).train()
    layer = model.layers[1].ffn
    assert isinstance(model.layers[0].ffn, GatedMLP) and isinstance(layer, MoE)  # first_k_dense=1
    model(torch.randint(0, 64, (2, 16)))
    model(torch.randint(0, 64, (2, 16)))
    load = layer.load_since_update.clone()
    assert load.sum().item() == 2 * 2 * 16 * 2  # two forwards, k=2
    update_moe_biases(model)
    assert torch.equal(layer.expert_bias, 0.01 * torch.sign(load.mean() - load))
    assert layer.load_since_update.sum().item() == 0
    model.eval()
    model(torch.randint(0, 64, (2, 16)))  # eval forwards do not count toward balancing
    assert layer.load_since_update.sum().item() == 0
    assert "moe/layers.1.ffn/max_over_mean_load" in moe_load_stats(model)


def test_bias_balances_a_skewed_router():
    layer = make_moe(aux_free_bias_update_rate=0.02, n_group=1, topk_group=1).train()
    with torch.no_grad():
        layer.router.weight[0] += 1.0  # expert 0 favoured by every token direction below
    x = torch.randn(4, 32, 32).abs()
    with torch.no_grad():
        layer(x)
        before = layer.last_load.float()
        for _ in range(60):
            layer(x)
            layer.update_bias()
        layer(x)
        after = layer.last_load.float()
    assert before.max() / before.mean() > 3  # skewed: expert 0 takes half the assignments
    assert after.max() / after.mean() < 1.3  # balanced by the bias alone, no gradient involved


def test_sequence_aux_loss_by_hand():
    # 1 sequence, 2 tokens, 4 experts, k=1: token 0 -> expert 0, token 1 -> expert 1
    scores = torch.tensor([[0.6, 0.2, 0.1, 0.1], [0.1, 0.5, 0.2, 0.2]])
    experts = torch.tensor([[0], [1]])
    f = torch.tensor([4 / 2, 4 / 2, 0, 0])
    p = scores.mean(0)  # rows already sum to 1
    assert sequence_aux_loss(scores, experts, B=1, coef=0.1).item() == pytest.approx(0.1 * (f * p).sum().item())
    model = Transformer(cfg(seq_aux_loss_coef=0.01)).train()
    model(torch.randint(0, 64, (2, 8)))
    loss = moe_aux_loss(model)
    assert loss is not None and loss.requires_grad and loss.item() > 0
