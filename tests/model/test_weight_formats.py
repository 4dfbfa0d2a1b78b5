"""Low-precision weight formats (model/weight_formats.py): quantizers, kernels against the
dequantized weight, the model swap and its refusals, loading through model/load.py."""
import pytest
import torch
import torch.nn as nn

from model import ModelConfig, Transformer
from model.weight_formats import (
    BF16Linear, Int4Linear, Int8Linear, apply_weight_format, dequantize_int4, linear_weight_bytes, quantize_int4,
    quantize_int8,
)
from utils.errors import UserError


def _layer(out_f: int, in_f: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        layer.weight.mul_(torch.rand(out_f, 1) * 4)  # rows of different scales, so per-row scales matter
    return layer


def _bf16_close(y: torch.Tensor, ref: torch.Tensor) -> None:
    """The kernels round their result to bf16 (8 significant bits): 2^-8 of the largest value."""
    assert (y - ref).abs().max() <= ref.abs().max() * 2**-7, (y - ref).abs().max()


def test_int8_rounding_error_is_at_most_half_a_step():
    w = _layer(48, 64).weight.detach()
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert ((q.float() * s[:, None] - w).abs() <= s[:, None] / 2 + 1e-7).all()
    assert torch.equal(q.abs().amax(1), torch.full((48,), 127, dtype=torch.int8))  # each row uses its whole range


def test_int4_rounding_error_is_at_most_half_a_step():
    w = _layer(32, 256).weight.detach()
    codes, scale, zero = quantize_int4(w, 64)
    assert codes.max() <= 15 and scale.shape == (32, 4)
    err = (dequantize_int4(codes, scale, zero) - w).abs().view(32, 4, 64)
    assert (err <= scale.float()[..., None] * 0.51 + 1e-6).all()


@pytest.mark.parametrize("out_f", [48, 40])  # 40: not a multiple of 16, padded for the kernel
def test_int4_kernel_equals_dequantized_matmul(out_f):
    layer = _layer(out_f, 128)
    q = Int4Linear(layer, 32)
    x = torch.randn(3, 5, 128)
    codes, scale, zero = quantize_int4(layer.weight.detach(), 32)
    ref = torch.nn.functional.linear(x.bfloat16().float(), dequantize_int4(codes, scale, zero), layer.bias)
    _bf16_close(q(x), ref)
    _bf16_close(Int4Linear(layer, 32, portable=True)(x), ref)  # the layout other devices dequantize
    assert q(x).shape == (3, 5, out_f) and q(x).dtype == torch.float32


def test_int8_kernel_equals_dequantized_matmul(monkeypatch):
    from model import weight_formats

    layer = _layer(40, 96)
    q = Int8Linear(layer)
    x = torch.randn(2, 7, 96)
    ref = torch.nn.functional.linear(x.bfloat16().float(), q.dequantize(), layer.bias)
    _bf16_close(q(x), ref)  # several tokens: aten's int8 kernel on bf16 inputs
    _bf16_close(BF16Linear(layer)(x), layer(x))
    one = x[:1, :1]  # one token: the compiled product, in fp32
    torch.testing.assert_close(q(one), torch.nn.functional.linear(one, q.dequantize(), layer.bias), rtol=1e-5, atol=1e-5)
    monkeypatch.setitem(weight_formats._MATVEC, "fn", None)  # no compiler here: aten's kernel instead
    _bf16_close(q(one), torch.nn.functional.linear(one.bfloat16().float(), q.dequantize(), layer.bias))


def _model(**kw) -> Transformer:
    torch.manual_seed(0)
    cfg = dict(vocab_size=96, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64)
    return Transformer(ModelConfig(**{**cfg, **kw})).eval()


@pytest.mark.parametrize("fmt,cls,ratio", [("bf16", BF16Linear, 2), ("int8", Int8Linear, 3.5), ("int4", Int4Linear, 6)])
def test_apply_swaps_every_linear_and_keeps_logits_close(fmt, cls, ratio):
    model = _model()
    full_bytes = linear_weight_bytes(model)
    x = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        ref = model(x)
        apply_weight_format(model, fmt, group_size=32)
        got = model(x)
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert sum(isinstance(m, cls) for m in model.modules()) == 2 * 7 + 1  # q k v o gate up down per layer + head
    assert full_bytes / linear_weight_bytes(model) >= ratio
    rel = (got - ref).norm() / ref.norm()
    assert rel < {"bf16": 0.01, "int8": 0.02, "int4": 0.15}[fmt], rel


def test_moe_router_stays_exact():
    model = _model(ffn="moe", d_ff=64, moe=dict(n_routed_experts=4, n_experts_per_tok=2, moe_d_ff=32, n_shared_experts=1))
    apply_weight_format(model, "int8")
    routers = [m for n, m in model.named_modules() if n.endswith("router")]
    assert routers and all(type(m) is nn.Linear for m in routers)


def test_refusals_name_the_fix():
    with pytest.raises(UserError, match="group_size=128"):  # 96-wide inputs: 32 divides them, 128 does not
        apply_weight_format(_model(d_model=96, n_heads=3, n_kv_heads=1), "int4", group_size=128)
    with pytest.raises(UserError, match="32, 64, 128, 256"):
        apply_weight_format(_model(), "int4", group_size=48)
    with pytest.raises(UserError, match="not one of"):
        apply_weight_format(_model(), "int3")
    model = _model()
    apply_weight_format(model, "int4", group_size=64)  # the refusal changed nothing before it; this one fits


def test_load_applies_the_format_and_refuses_training(tmp_path):
    from model.load import load_model
    from utils.checkpoint import save_checkpoint

    ckpt = save_checkpoint(tmp_path / "ckpt", _model())
    model = load_model(ckpt, weights="int8")
    assert isinstance(model.lm_head, Int8Linear) and model.weight_format == "int8"
    with pytest.raises(UserError, match="inference format"):
        load_model(ckpt, weights="int4", train=True)
