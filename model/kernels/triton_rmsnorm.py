"""Fused RMSNorm in Triton: one read of x and one write of y forward, one pass backward.

Same semantics as ``model.norms.RMSNorm`` (and ``reference.rms_norm_ref``):
  plain:       y = w * cast_x(x * rstd)            (output dtype: promote(x, w))
  unit_offset: y = cast_x(x * rstd * (1 + w))      (Gemma; output dtype: x's)
with rstd = 1 / sqrt(mean(x^2) + eps) in fp32. Every load is upcast to fp32 before any
arithmetic (also needed by TRITON_INTERPRET, whose bf16 arithmetic is wrong).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rmsnorm_fwd(X, W, Y, RSTD, stride_x, stride_y, N, eps, UNIT_OFFSET: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
    xn = x * rstd
    if UNIT_OFFSET:
        y = xn * (1.0 + w)
    else:  # the reference casts x*rstd to x's dtype before the weight multiplies it
        y = xn.to(X.dtype.element_ty).to(tl.float32) * w
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rmsnorm_bwd(
    DY, X, W, RSTD, DX, DW_PARTIAL, stride_dy, stride_x, stride_dx, M, N, rows_per_prog,
    UNIT_OFFSET: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Each program walks a contiguous range of rows and keeps its share of dW in registers;
    # the (programs, N) partial sums are added up by torch afterwards.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if UNIT_OFFSET:
        w = w + 1.0
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_prog
    for i in range(0, rows_per_prog):
        row = row_start + i
        m = mask & ((row + 0 * cols) < M)  # the last program may run past M
        x = tl.load(X + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=m, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row, mask=row < M, other=0.0)
        xn = x * rstd
        dxn = dy * w
        # d/dx of x*rstd: rstd * (dxn - xn * mean(dxn * xn))
        dx = rstd * (dxn - xn * (tl.sum(dxn * xn, axis=0) / N))
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=m)
        dw += dy * xn
    tl.store(DW_PARTIAL + pid * N + cols, dw, mask=mask)


def _bwd_programs(M: int, device: torch.device) -> int:
    if device.type == "cuda":
        return min(M, 4 * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(M, 4)  # interpreter: few programs, each a Python loop


# The launches are registered as torch custom ops: torch.compile then treats each as one opaque
# call (it cannot trace a Triton launch on CPU / in the interpreter), with shapes from the fakes.
@torch.library.custom_op("model_kernels::rms_norm_fwd", mutates_args=())
def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., N) -> y (..., N), rstd (M,) fp32 with M = x.numel() // N."""
    N = x.shape[-1]
    x2 = x.reshape(-1, N)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    out_dtype = x.dtype if unit_offset else torch.promote_types(x.dtype, weight.dtype)
    y = torch.empty((M, N), dtype=out_dtype, device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    BLOCK_N = triton.next_power_of_2(N)
    _rmsnorm_fwd[(M,)](
        x2, weight, y, rstd, x2.stride(0), y.stride(0), N, eps,
        UNIT_OFFSET=unit_offset, BLOCK_N=BLOCK_N, num_warps=_num_warps(BLOCK_N),
    )
    return y.view(x.shape), rstd


@rms_norm_fwd.register_fake
def _(x, weight, eps, unit_offset):
    out_dtype = x.dtype if unit_offset else torch.promote_types(x.dtype, weight.dtype)
    return x.new_empty(x.shape, dtype=out_dtype), x.new_empty(x.numel() // x.shape[-1], dtype=torch.float32)


@torch.library.custom_op("model_kernels::rms_norm_bwd", mutates_args=())
def rms_norm_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, unit_offset: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """dy, x (..., N) -> dx (..., N) in x's dtype, dweight (N,) in weight's dtype."""
    N = x.shape[-1]
    x2, dy2 = x.reshape(-1, N), dy.reshape(-1, N)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    dy2 = dy2 if dy2.stride(-1) == 1 else dy2.contiguous()
    M = x2.shape[0]
    dx = torch.empty((M, N), dtype=x.dtype, device=x.device)
    progs = _bwd_programs(M, x.device)
    dw_partial = torch.empty((progs, N), dtype=torch.float32, device=x.device)
    BLOCK_N = triton.next_power_of_2(N)
    _rmsnorm_bwd[(progs,)](
        dy2, x2, weight, rstd, dx, dw_partial, dy2.stride(0), x2.stride(0), dx.stride(0), M, N,
        triton.cdiv(M, progs), UNIT_OFFSET=unit_offset, BLOCK_N=BLOCK_N, num_warps=_num_warps(BLOCK_N),
    )
    return dx.view(x.shape), dw_partial.sum(0).to(weight.dtype)


@rms_norm_bwd.register_fake
def _(dy, x, weight, rstd, unit_offset):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight)


def _num_warps(block_n: int) -> int:
    return min(max(block_n // 256, 1), 16)


class RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool):
        y, rstd = rms_norm_fwd(x, weight, eps, unit_offset)
        ctx.save_for_backward(x, weight, rstd)
        ctx.unit_offset = unit_offset
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_bwd(dy, x, weight, rstd, ctx.unit_offset)
        return dx, dw, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False) -> torch.Tensor:
    """x (..., N), weight (N,) -> (..., N); differentiable in x and weight."""
    return RMSNormFn.apply(x, weight, eps, unit_offset)
