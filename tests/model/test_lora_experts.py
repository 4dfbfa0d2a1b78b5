"""LoRA and NF4 on the routed experts of an MoE layer (model/lora_experts.py, model/quant.py NF4Experts)."""
import pytest
import torch
import torch.nn.functional as F

from model import ModelConfig, Transformer, architectures
from model.lora import (
    adapter_tensors, apply_lora, load_lora, lora_layers, match_linears, merge_and_unload, merge_lora, unmerge_lora,
)
from model.lora_experts import LoRAExperts
from model.moe import PROJECTIONS, Experts
from tests.model.test_moe import make_moe
from utils.errors import UserError

bnb = pytest.importorskip("bitsandbytes")
from model.quant import NF4Experts, base_bytes_per_param, quantize_model, quantized_params  # noqa: E402

X = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(2))


def randomize_adapters(model, seed=1, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for t in adapter_tensors(layer).values():
                t.copy_(torch.randn(t.shape, generator=g) * scale)


def token_loop(layer, x, weights):
    """The MoE layer one token at a time with the given per-expert weights {proj: (E, out, in)}: no
    dispatch, no adapters, no quantization code (the routing is the layer's own)."""
    from model.moe import route

    flat = x.reshape(-1, x.shape[-1])
    gates, experts, _ = route(flat @ layer.router.weight.t(), layer.expert_bias, layer.k, layer.scoring,
                              layer.n_group, layer.topk_group, layer.norm_topk_prob, layer.scaling)
    out = []
    for t, g_row, e_row in zip(flat, gates, experts):
        y = layer.shared_experts(t)
        for g, e in zip(g_row, e_row.tolist()):
            h = F.silu(weights["gate_proj"][e] @ t) * (weights["up_proj"][e] @ t)
            y = y + g * (weights["down_proj"][e] @ h)
        out.append(y)
    return torch.stack(out).view_as(x)


def adapted_weights(layer: LoRAExperts) -> dict:
    """W_e + s B_e A_e, expert by expert, from the (dequantized) base."""
    return {p: torch.stack([layer.base.stacked(p)[e] + layer.scaling * layer.lora_B[p][e] @ layer.lora_A[p][e]
                            for e in range(layer.n_experts)]) for p in PROJECTIONS}


@pytest.mark.parametrize("nf4", [False, True])
def test_adapted_experts_equal_base_plus_low_rank_delta(nf4):
    """Forward and gradients of LoRA over (NF4) experts == the dequantized weight + s B A per expert."""
    moe = make_moe()
    if nf4:
        quantize_model(moe, ["experts"], torch.float32)
        assert isinstance(moe.experts, NF4Experts)
    apply_lora(moe, ["experts"], r=4, alpha=8)
    assert isinstance(moe.experts, LoRAExperts)
    randomize_adapters(moe)
    got = moe(X)
    want = token_loop(moe, X, adapted_weights(moe.experts))
    assert (got - want).abs().max().item() <= 1e-5
    got.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in moe.named_parameters() if p.grad is not None}
    assert set(grads) == {f"experts.lora_{ab}.{p}" for ab in "AB" for p in PROJECTIONS}  # the base stays frozen
    moe.zero_grad()
    token_loop(moe, X, adapted_weights(moe.experts)).square().sum().backward()
    for n, p in moe.named_parameters():
        if n in grads:
            assert torch.allclose(grads[n], p.grad, atol=1e-5, rtol=1e-4), n


def test_nf4_experts_are_the_dequantized_weights():
    moe = make_moe()
    plain = {p: moe.experts.stacked(p).detach().clone() for p in PROJECTIONS}
    quantize_model(moe, "all-linear", torch.float32)
    deq = {p: moe.experts.stacked(p) for p in PROJECTIONS}
    for p in PROJECTIONS:  # NF4: 16 levels per block of 64, so close but not equal
        err = (deq[p] - plain[p]).abs()
        assert 0 < err.max() < 0.25 * plain[p].abs().max(), p
    with torch.no_grad():
        assert (moe(X) - token_loop(moe, X, deq)).abs().max().item() <= 1e-5


def test_targets_select_experts_shared_experts_and_the_router():
    model = Transformer(ModelConfig(**architectures.architecture("deepseek/v3_nano").values | dict(n_layers=2)))
    assert match_linears(model, ["experts"]) == ["layers.1.ffn.experts"]
    assert match_linears(model, ["shared_experts"]) == [f"layers.1.ffn.shared_experts.{p}" for p in PROJECTIONS]
    assert match_linears(model, ["gate"]) == ["layers.1.ffn.router"]  # HF's name for the router
    assert "layers.1.ffn.experts" in match_linears(model, "all-linear")
    assert not any(n.endswith("router") for n in match_linears(model, "all-linear"))
    with pytest.raises(UserError, match="routes tokens"):
        quantize_model(model, ["gate"], torch.float32)


def test_router_adapter_trains_through_the_routing():
    moe = make_moe()
    apply_lora(moe, ["gate"], r=2, alpha=4)
    randomize_adapters(moe, scale=0.5)
    moe(X).square().sum().backward()
    assert moe.router.lora_A.grad.abs().sum() > 0 and moe.router.lora_B.grad.abs().sum() > 0


def test_merge_unmerge_and_unload():
    moe = make_moe()
    apply_lora(moe, ["experts"], r=4, alpha=8)
    randomize_adapters(moe)
    with torch.no_grad():
        adapted = moe(X)
        merge_lora(moe)
        assert (moe(X) - adapted).abs().max().item() <= 1e-5
        unmerge_lora(moe)
        assert (moe(X) - adapted).abs().max().item() <= 1e-5
    merge_and_unload(moe)
    assert type(moe.experts) is Experts
    with torch.no_grad():
        assert (moe(X) - adapted).abs().max().item() <= 1e-5


def test_merging_an_nf4_base_in_place_and_a_rank_too_large_are_refused():
    moe = make_moe()
    quantize_model(moe, ["experts"], torch.float32)
    apply_lora(moe, ["experts"], r=2, alpha=4)
    with pytest.raises(UserError, match="4-bit base"):
        merge_lora(moe)
    with pytest.raises(UserError, match="rank r=17 does not fit the experts"):
        apply_lora(make_moe(), ["experts"], r=17, alpha=4)  # moe_d_ff is 16


def test_v3_nano_qlora_base_is_stored_in_nf4_experts_included():
    torch.manual_seed(0)
    model = Transformer(architectures.get("deepseek/v3_nano")).eval()
    quantize_model(model, "all-linear", torch.float32)
    experts = [m for m in model.modules() if isinstance(m, NF4Experts)]
    assert len(experts) == model.cfg.n_layers - model.cfg.moe["first_k_dense"]
    routed = sum(quantized_params(m) for m in experts)
    assert routed == 7_864_320  # 5 layers x 16 experts x 3 x 128 x 256: 65% of the 12.1M
    assert sum(quantized_params(m) for m in model.modules() if type(m).__name__ == "Linear4bit") > 0
    assert base_bytes_per_param(model) <= 0.55, base_bytes_per_param(model)


def test_qlora_experts_adapter_saves_loads_and_exports_merged_to_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from model.hf_interop import export_hf
    from model.load import load_model
    from model.lora import LoRAConfig, save_adapter
    from model.peft_export import export_merged_hf
    from tests.model.hf_check import FAMILY_CASES, IDX
    from tests.model.test_hf_parity import randomize
    from utils.checkpoint import save_checkpoint

    torch.manual_seed(0)
    base = Transformer(FAMILY_CASES["deepseek_v3"]).eval()
    randomize(base)
    save_checkpoint(tmp_path / "base", base)
    model = load_model(tmp_path / "base")
    quantized = quantize_model(model, "all-linear", torch.float32)
    lora_cfg = LoRAConfig(r=2, alpha=4, targets="all-linear")
    apply_lora(model, lora_cfg.targets, lora_cfg.r, lora_cfg.alpha)
    assert any(isinstance(m, LoRAExperts) for m in lora_layers(model).values())
    randomize_adapters(model, seed=3)
    with torch.no_grad():
        adapted = model(IDX)
    save_adapter(tmp_path / "adapter", model, lora_cfg, base_checkpoint=str(tmp_path / "base"), qlora=True,
                 quantized=quantized)
    loaded = load_model(tmp_path / "adapter")  # NF4 base again, adapters applied and merged
    fresh = load_model(tmp_path / "base")
    quantize_model(fresh, quantized, torch.float32)
    load_lora(fresh, tmp_path / "adapter")
    export_merged_hf(model, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        assert (loaded(IDX) - adapted).abs().max().item() <= 1e-5
        assert torch.equal(fresh(IDX), adapted)
        assert (hf(input_ids=IDX).logits - adapted).abs().max().item() <= 1e-4
        export_hf(base, tmp_path / "hf_base")  # the adapters change the output, so the match means something
        plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf_base", dtype=torch.float32).eval()
        assert (plain(input_ids=IDX).logits - adapted).abs().max().item() > 1e-2
