"""QLoRA base: NF4 Linear4bit through bitsandbytes (CPU backend here)."""
import sys

import pytest
import torch

from model import ModelConfig, Transformer
from model.lora import apply_lora, lora_layers, merge_and_unload, merge_lora
from utils.errors import UserError

bnb = pytest.importorskip("bitsandbytes")
from model.quant import base_bytes_per_param, check_bnb, dequantized_weight, quantize_linear, quantize_model  # noqa: E402

TINY = dict(vocab_size=96, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=32)
IDX = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(5))


def tiny_model():
    torch.manual_seed(0)
    return Transformer(ModelConfig(**TINY)).eval()


def set_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.1)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)


def qlora_and_reference():
    """A QLoRA model and a plain-LoRA model whose base weights are its dequantized weights."""
    qmodel = tiny_model()
    names = quantize_model(qmodel, "all-linear", compute_dtype=torch.float32)
    ref = tiny_model()
    with torch.no_grad():
        for name in names:
            ref.get_submodule(name).weight.copy_(dequantized_weight(qmodel.get_submodule(name)))
    for m in (qmodel, ref):
        apply_lora(m, "all-linear", r=4, alpha=8)
        set_adapters(m)
    return qmodel, ref


def test_qlora_equals_lora_on_dequantized_weight():
    qmodel, ref = qlora_and_reference()
    assert type(lora_layers(qmodel)["layers.0.attn.q_proj"].base).__name__ == "Linear4bit"
    with torch.no_grad():
        diff = (qmodel(IDX) - ref(IDX)).abs().max().item()
    assert diff <= 1e-5, diff


def test_qlora_gradients_reach_adapters_only_and_match_reference():
    qmodel, ref = qlora_and_reference()
    for m in (qmodel, ref):
        torch.nn.functional.cross_entropy(m(IDX).flatten(0, 1), IDX.flatten()).backward()
    q_grads = {n: p.grad for n, p in qmodel.named_parameters() if p.grad is not None}
    r_grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    assert set(q_grads) == set(r_grads) and all("lora_" in n for n in q_grads) and len(q_grads) == 28
    for n in q_grads:
        assert torch.allclose(q_grads[n], r_grads[n], atol=1e-5, rtol=1e-4), n


def test_nf4_storage_and_error():
    torch.manual_seed(0)
    layer = torch.nn.Linear(1024, 256, bias=False)
    q = quantize_linear(layer, torch.float32, double_quant=True)
    model = torch.nn.Sequential(q)
    bpp = base_bytes_per_param(model)
    assert bpp <= 0.55, bpp
    err = (dequantized_weight(q) - layer.weight).abs()
    # NF4 with 16 levels: error bounded by half the widest gap times the block absmax
    assert err.max() < 0.25 * layer.weight.abs().max() and err.mean() < 0.1 * layer.weight.abs().mean()
    single = base_bytes_per_param(torch.nn.Sequential(quantize_linear(layer, torch.float32, double_quant=False)))
    assert bpp < single  # double quantization shrinks the block scales (fp32 -> 8 bit)


def test_merge_and_unload_dequantizes():
    qmodel, _ = qlora_and_reference()
    with torch.no_grad():
        adapted = qmodel(IDX)
    with pytest.raises(UserError, match="4-bit"):
        merge_lora(qmodel)
    merge_and_unload(qmodel)
    assert all(type(m).__name__ != "Linear4bit" for m in qmodel.modules())
    with torch.no_grad():
        assert (qmodel(IDX) - adapted).abs().max().item() <= 1e-5


def test_missing_bitsandbytes_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes "import bitsandbytes" fail
    with pytest.raises(UserError, match="LoRA recipe"):
        check_bnb("cpu")

