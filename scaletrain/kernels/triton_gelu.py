"""Fused bias + GELU (exact and tanh) and gated GELU (T5 v1.1: gelu_tanh(gate) * up) in Triton.

The math runs in fp32 whatever the storage dtype. tanh is written through the sigmoid and erf through
tl.math.erf: libdevice is unavailable under the CPU interpreter, and both forms are exact to fp32 rounding."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from scaletrain.kernels.launch import backward_programs

_ELEMENTWISE_BLOCK = 1024
_TILE_M, _TILE_N = 32, 128  # bias-grad tiles: rows x cols per loop step
# Globals a kernel reads must be tl.constexpr (the compiler rejects plain floats; the interpreter does not).
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_INV_SQRT_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_TANH_CUBIC = tl.constexpr(0.044715)


@triton.jit
def _tanh(z):
    # tanh saturates to +-1 in fp32 beyond |z| = 10; clamping keeps exp() finite.
    z = tl.minimum(tl.maximum(z, -10.0), 10.0)
    return 2.0 * tl.sigmoid(2.0 * z) - 1.0


@triton.jit
def _gelu_and_grad(x, APPROX_TANH: tl.constexpr):
    """(gelu(x), d gelu / dx) in fp32."""
    if APPROX_TANH:
        inner = _SQRT_2_OVER_PI * (x + _TANH_CUBIC * x * x * x)
        t = _tanh(inner)
        value = 0.5 * x * (1.0 + t)
        grad = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _TANH_CUBIC * x * x)
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(x * _INV_SQRT_2))
        value = x * cdf
        grad = cdf + x * tl.exp(-0.5 * x * x) * _INV_SQRT_2PI
    return value, grad


@triton.jit
def _bias_gelu_forward_kernel(X, BIAS, Y, n_elements, n_cols, HAS_BIAS: tl.constexpr,
                              APPROX_TANH: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x += tl.load(BIAS + offsets % n_cols, mask=mask, other=0.0).to(tl.float32)
    y, _ = _gelu_and_grad(x, APPROX_TANH)
    tl.store(Y + offsets, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_backward_kernel(X, BIAS, DY, DX, DBIAS_PARTIAL, n_rows, n_cols, rows_per_program,
                               HAS_BIAS: tl.constexpr, APPROX_TANH: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Grid (row groups, column blocks); each program walks its rows in (BLOCK_M, BLOCK_N) tiles and keeps
    # the bias-grad partial of its column block in fp32.
    pid_m = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    if HAS_BIAS:
        bias = tl.load(BIAS + cols, mask=col_mask, other=0.0).to(tl.float32)
    dbias = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start = pid_m.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for block_start in range(row_start, row_end, BLOCK_M):
        rows = block_start + tl.arange(0, BLOCK_M)
        mask = (rows < row_end)[:, None] & col_mask[None, :]
        offsets = rows[:, None] * n_cols + cols[None, :]  # (BLOCK_M, BLOCK_N)
        x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            x += bias[None, :]
        _, grad = _gelu_and_grad(x, APPROX_TANH)
        dx = tl.where(mask, tl.load(DY + offsets, mask=mask, other=0.0).to(tl.float32) * grad, 0.0)
        tl.store(DX + offsets, dx.to(DX.dtype.element_ty), mask=mask)
        dbias += tl.sum(dx, axis=0)
    if HAS_BIAS:
        tl.store(DBIAS_PARTIAL + pid_m * n_cols + cols, dbias, mask=col_mask)


@triton.jit
def _gated_gelu_forward_kernel(GATE, UP, Y, n_elements, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    gate = tl.load(GATE + offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(UP + offsets, mask=mask, other=0.0).to(tl.float32)
    activated, _ = _gelu_and_grad(gate, True)
    tl.store(Y + offsets, (activated * up).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gated_gelu_backward_kernel(GATE, UP, DY, DGATE, DUP, n_elements, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    gate = tl.load(GATE + offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(UP + offsets, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offsets, mask=mask, other=0.0).to(tl.float32)
    activated, grad = _gelu_and_grad(gate, True)
    tl.store(DGATE + offsets, (dy * up * grad).to(DGATE.dtype.element_ty), mask=mask)
    tl.store(DUP + offsets, (dy * activated).to(DUP.dtype.element_ty), mask=mask)


class _BiasGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, approx_tanh: bool):
        x = x.contiguous()
        y = torch.empty_like(x)
        n_elements = x.numel()
        grid = (triton.cdiv(n_elements, _ELEMENTWISE_BLOCK),)
        _bias_gelu_forward_kernel[grid](x, bias if bias is not None else x, y, n_elements, x.shape[-1],
                                        HAS_BIAS=bias is not None, APPROX_TANH=approx_tanh,
                                        BLOCK=_ELEMENTWISE_BLOCK, num_warps=4)
        ctx.save_for_backward(x, bias)
        ctx.approx_tanh = approx_tanh
        return y

    @staticmethod
    def backward(ctx, dy):
        x, bias = ctx.saved_tensors
        n_cols = x.shape[-1]
        n_rows = x.numel() // n_cols
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        programs, rows_per_program = backward_programs(n_rows, x.device)
        partials = torch.empty(programs, n_cols, dtype=torch.float32, device=x.device)
        grid = (programs, triton.cdiv(n_cols, _TILE_N))
        _bias_gelu_backward_kernel[grid](x, bias if bias is not None else x, dy, dx, partials, n_rows, n_cols,
                                         rows_per_program, HAS_BIAS=bias is not None,
                                         APPROX_TANH=ctx.approx_tanh, BLOCK_M=_TILE_M, BLOCK_N=_TILE_N,
                                         num_warps=8)  # 16 elements per thread: no spills on sm_90
        dbias = partials.sum(0).to(bias.dtype) if bias is not None else None
        return dx, dbias, None


class _GatedGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        y = torch.empty_like(gate)
        grid = (triton.cdiv(gate.numel(), _ELEMENTWISE_BLOCK),)
        _gated_gelu_forward_kernel[grid](gate, up, y, gate.numel(), BLOCK=_ELEMENTWISE_BLOCK, num_warps=4)
        ctx.save_for_backward(gate, up)
        return y

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dgate, dup = torch.empty_like(gate), torch.empty_like(up)
        grid = (triton.cdiv(gate.numel(), _ELEMENTWISE_BLOCK),)
        _gated_gelu_backward_kernel[grid](gate, up, dy.contiguous(), dgate, dup, gate.numel(),
                                          BLOCK=_ELEMENTWISE_BLOCK, num_warps=4)
        return dgate, dup


def bias_gelu(x, bias, approximate: str):
    return _BiasGelu.apply(x, bias, approximate == "tanh")


def gated_gelu(gate, up):
    return _GatedGelu.apply(gate, up)
