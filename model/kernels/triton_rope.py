"""Rotary position embedding in Triton, the "halves" layout of ``model.positions.apply_rotary``.

With R = rotary dims and x1 = x[:R/2], x2 = x[R/2:R] (c, s the matching halves of cos, sin):
  forward:  y1 = x1*c1 - x2*s1,   y2 = x2*c2 + x1*s2,   y[R:] = x[R:]
  backward: dx1 = dy1*c1 + dy2*s2, dx2 = dy2*c2 - dy1*s1 (the transpose of the rotation)
x may be a strided view (q/k after ``.transpose(1, 2)``): only the last dim must be contiguous.
cos/sin get no gradient (in the model they come from positions and a buffer).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(
    X, COS, SIN, Y, H, T,
    sxb, sxh, sxt, syb, syh, syt, scb, sct, ssb, sst,
    HALF: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr, BACKWARD: tl.constexpr,
):
    # grid: (B * H, cdiv(T, BLOCK_T)); a program rotates BLOCK_T positions of one (batch, head)
    pid_bh = tl.program_id(0)
    b, h = pid_bh // H, pid_bh % H
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    i = tl.arange(0, BLOCK_HALF)
    m = (t[:, None] < T) & (i[None, :] < HALF)
    x_row = X + b.to(tl.int64) * sxb + h.to(tl.int64) * sxh + t[:, None].to(tl.int64) * sxt
    y_row = Y + b.to(tl.int64) * syb + h.to(tl.int64) * syh + t[:, None].to(tl.int64) * syt
    c_row = COS + b.to(tl.int64) * scb + t[:, None].to(tl.int64) * sct
    s_row = SIN + b.to(tl.int64) * ssb + t[:, None].to(tl.int64) * sst
    x1 = tl.load(x_row + i[None, :], mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + HALF + i[None, :], mask=m, other=0.0).to(tl.float32)
    c1 = tl.load(c_row + i[None, :], mask=m, other=0.0).to(tl.float32)
    c2 = tl.load(c_row + HALF + i[None, :], mask=m, other=0.0).to(tl.float32)
    s1 = tl.load(s_row + i[None, :], mask=m, other=0.0).to(tl.float32)
    s2 = tl.load(s_row + HALF + i[None, :], mask=m, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    tl.store(y_row + i[None, :], y1.to(Y.dtype.element_ty), mask=m)
    tl.store(y_row + HALF + i[None, :], y2.to(Y.dtype.element_ty), mask=m)
    if D > 2 * HALF:  # partial rotary: copy the channels that do not turn
        j = 2 * HALF + tl.arange(0, BLOCK_PASS)
        mp = (t[:, None] < T) & (j[None, :] < D)
        xp = tl.load(x_row + j[None, :], mask=mp, other=0.0)
        tl.store(y_row + j[None, :], xp.to(Y.dtype.element_ty), mask=mp)


# A torch custom op, so torch.compile treats the launch as one opaque call (see triton_rmsnorm).
@torch.library.custom_op("model_kernels::rope", mutates_args=())
def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out_dtype: torch.dtype, backward: bool) -> torch.Tensor:
    """x (B, H, T, D) -> rotated (B, H, T, D) contiguous in out_dtype (backward: the transpose)."""
    B, H, T, D = x.shape
    R = cos.shape[-1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.expand(B, 1, T, R), sin.expand(B, 1, T, R)  # broadcasting -> stride 0
    if cos.stride(-1) != 1:
        cos = cos.contiguous()
    if sin.stride(-1) != 1:
        sin = sin.contiguous()
    y = torch.empty((B, H, T, D), dtype=out_dtype, device=x.device)
    BLOCK_T = min(16, triton.next_power_of_2(T))
    _rope_kernel[(B * H, triton.cdiv(T, BLOCK_T))](
        x, cos, sin, y, H, T,
        x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1), y.stride(2),
        cos.stride(0), cos.stride(2), sin.stride(0), sin.stride(2),
        HALF=R // 2, D=D, BLOCK_T=BLOCK_T, BLOCK_HALF=triton.next_power_of_2(R // 2),
        BLOCK_PASS=triton.next_power_of_2(max(D - R, 1)), BACKWARD=backward,
    )
    return y


@rope.register_fake
def _(x, cos, sin, out_dtype, backward):
    return x.new_empty(x.shape, dtype=out_dtype)


class RotaryFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        out_dtype = torch.promote_types(x.dtype, torch.promote_types(cos.dtype, sin.dtype))
        ctx.save_for_backward(cos, sin)
        ctx.x_dtype = x.dtype
        return rope(x, cos, sin, out_dtype, False)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return rope(dy, cos, sin, ctx.x_dtype, True), None, None


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D), cos/sin (B or 1, 1, T, R), R even and <= D -> (B, H, T, D)."""
    if cos.shape[-1] % 2 or cos.shape[-1] > x.shape[-1]:
        raise ValueError(f"rotary dims {cos.shape[-1]} must be even and <= head_dim {x.shape[-1]}")
    return RotaryFn.apply(x, cos, sin)
