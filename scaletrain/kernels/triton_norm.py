"""Fused LayerNorm / RMSNorm and the Megatron-style residual-add + dropout + norm, in Triton.

One forward kernel and one backward kernel serve all three ops; constexpr flags compile out what an op does
not use. Forward: one program per row, the row in registers. Backward: a fixed number of programs, each
walking a contiguous range of rows and keeping its partial weight / bias grads in fp32 registers; the
partials (programs, cols) are then summed, so no atomics and a deterministic result."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from scaletrain.errors import ConfigError
from scaletrain.kernels.launch import backward_programs

_MAX_FUSED_BYTES = 65536  # one row must fit in registers / shared memory


@triton.jit
def _norm_forward_kernel(
    X, RESIDUAL, X_BIAS, H_OUT, Y, WEIGHT, NORM_BIAS, MEAN, RSTD,
    n_cols, eps, dropout_p, seed,
    IS_RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_X_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    STORE_H: tl.constexpr, HAS_NORM_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    offsets = row * n_cols + cols  # (BLOCK_N,) int64: also the Philox counter of each element
    h = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_X_BIAS:
        h += tl.load(X_BIAS + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        keep = tl.rand(seed, offsets) >= dropout_p
        h = tl.where(keep, h / (1.0 - dropout_p), 0.0)
    if HAS_RESIDUAL:
        h += tl.load(RESIDUAL + offsets, mask=mask, other=0.0).to(tl.float32)
    if STORE_H:
        # Normalize the rounded residual stream, so forward equals norm(new_residual) and backward
        # (which reloads H_OUT) sees the same input.
        h_rounded = h.to(H_OUT.dtype.element_ty)
        tl.store(H_OUT + offsets, h_rounded, mask=mask)
        h = h_rounded.to(tl.float32)
    if IS_RMS:
        mean = 0.0
        centered = h
    else:
        mean = tl.sum(h, axis=0) / n_cols
        centered = tl.where(mask, h - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / n_cols + eps)
    y = centered * rstd * tl.load(WEIGHT + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM_BIAS:
        y += tl.load(NORM_BIAS + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offsets, y.to(Y.dtype.element_ty), mask=mask)
    if not IS_RMS:
        tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _norm_backward_kernel(
    DY, DH_OUT, H, WEIGHT, MEAN, RSTD, DH, DX, DWEIGHT_PARTIAL, DNORM_BIAS_PARTIAL, DX_BIAS_PARTIAL,
    n_rows, n_cols, rows_per_program, dropout_p, seed,
    IS_RMS: tl.constexpr, HAS_DH_OUT: tl.constexpr, STORE_DH: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HAS_NORM_BIAS: tl.constexpr, HAS_X_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # H is the norm's input (x, or the new residual stream); DH = dL/dH; DX = dL/dx through the dropout.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    weight = tl.load(WEIGHT + cols, mask=mask, other=0.0).to(tl.float32)
    dweight = tl.zeros([BLOCK_N], dtype=tl.float32)
    dnorm_bias = tl.zeros([BLOCK_N], dtype=tl.float32)
    dx_bias = tl.zeros([BLOCK_N], dtype=tl.float32)
    # int64 rows: row * n_cols overflows int32 for large batches.
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row in range(row_start, row_end):
        offsets = row * n_cols + cols
        h = tl.load(H + offsets, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offsets, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        if IS_RMS:
            h_hat = h * rstd
        else:
            h_hat = tl.where(mask, (h - tl.load(MEAN + row)) * rstd, 0.0)
        dweight += dy * h_hat
        if HAS_NORM_BIAS:
            dnorm_bias += dy
        # d(normalized) = w * dy; project out the directions the statistics remove.
        w_dy = weight * dy
        dh = w_dy - h_hat * (tl.sum(w_dy * h_hat, axis=0) / n_cols)
        if not IS_RMS:
            dh -= tl.sum(w_dy, axis=0) / n_cols
        dh *= rstd
        if HAS_DH_OUT:
            dh += tl.load(DH_OUT + offsets, mask=mask, other=0.0).to(tl.float32)
        if STORE_DH:
            tl.store(DH + offsets, dh.to(DH.dtype.element_ty), mask=mask)
        dx = dh
        if HAS_DROPOUT:
            keep = tl.rand(seed, offsets) >= dropout_p
            dx = tl.where(keep, dh / (1.0 - dropout_p), 0.0)
        tl.store(DX + offsets, dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_X_BIAS:
            dx_bias += dx
    partial_offsets = pid * n_cols + cols
    tl.store(DWEIGHT_PARTIAL + partial_offsets, dweight, mask=mask)
    if HAS_NORM_BIAS:
        tl.store(DNORM_BIAS_PARTIAL + partial_offsets, dnorm_bias, mask=mask)
    if HAS_X_BIAS:
        tl.store(DX_BIAS_PARTIAL + partial_offsets, dx_bias, mask=mask)


def _row_block(x: torch.Tensor) -> tuple[int, int]:
    n_cols = x.shape[-1]
    block_n = triton.next_power_of_2(n_cols)
    if block_n * x.element_size() > _MAX_FUSED_BYTES:
        raise ConfigError(f"fused norm supports rows up to {_MAX_FUSED_BYTES // x.element_size()} elements of "
                          f"{x.dtype}, got hidden size {n_cols}; use model.kernels=torch for this model")
    # ~8 fp32 elements of each row vector per thread: more makes the backward (which also holds the weight
    # and up to three grad accumulators) spill registers. Rows wider than 8192 get 16 per thread.
    num_warps = min(max(block_n // 256, 4), 32)
    return block_n, num_warps


def _dummy(like: torch.Tensor) -> torch.Tensor:
    # Stands in for an absent optional pointer; the constexpr flag guarantees it is never read.
    return like.new_empty(1)


class _FusedNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, x_bias, weight, norm_bias, eps, dropout_p, is_rms, store_h):
        shape = x.shape
        x2d = x.reshape(-1, shape[-1]).contiguous()
        n_rows, n_cols = x2d.shape
        residual2d = residual.reshape(-1, n_cols).contiguous() if residual is not None else None
        block_n, num_warps = _row_block(x2d)
        y = torch.empty_like(x2d)
        h_dtype = residual.dtype if residual is not None else x.dtype
        h = torch.empty(n_rows, n_cols, dtype=h_dtype, device=x.device) if store_h else x2d
        mean = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        rstd = torch.empty_like(mean)
        # The dropout seed comes from torch's CPU generator: reproducible from torch.manual_seed, restored by
        # activation checkpointing's RNG bookkeeping, and no device sync.
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) if dropout_p > 0 else 0
        _norm_forward_kernel[(n_rows,)](
            x2d, residual2d if residual2d is not None else _dummy(x2d),
            x_bias if x_bias is not None else _dummy(x2d), h, y, weight,
            norm_bias if norm_bias is not None else _dummy(x2d), mean, rstd, n_cols, eps, dropout_p, seed,
            IS_RMS=is_rms, HAS_RESIDUAL=residual is not None, HAS_X_BIAS=x_bias is not None,
            HAS_DROPOUT=dropout_p > 0, STORE_H=store_h, HAS_NORM_BIAS=norm_bias is not None,
            BLOCK_N=block_n, num_warps=num_warps)
        ctx.save_for_backward(h, weight, mean, rstd)
        ctx.config = (dropout_p, seed, is_rms, shape, residual is not None, norm_bias is not None)
        ctx.x_bias_dtype = x_bias.dtype if x_bias is not None else None
        if store_h:
            return y.reshape(shape), h.reshape(shape)
        return y.reshape(shape)

    @staticmethod
    def backward(ctx, dy, dh_out=None):
        h, weight, mean, rstd = ctx.saved_tensors
        dropout_p, seed, is_rms, shape, has_residual, has_norm_bias = ctx.config
        has_x_bias = ctx.x_bias_dtype is not None
        n_rows, n_cols = h.shape
        dy = dy.reshape(n_rows, n_cols).contiguous()
        if dh_out is not None:
            dh_out = dh_out.reshape(n_rows, n_cols).contiguous()
        block_n, num_warps = _row_block(h)
        programs, rows_per_program = backward_programs(n_rows, h.device)
        partials = torch.empty(3, programs, n_cols, dtype=torch.float32, device=h.device)
        dx = torch.empty(n_rows, n_cols, dtype=dy.dtype, device=h.device)
        dh = torch.empty(n_rows, n_cols, dtype=h.dtype, device=h.device) if has_residual else dx
        _norm_backward_kernel[(programs,)](
            dy, dh_out if dh_out is not None else _dummy(dy), h, weight, mean, rstd, dh, dx,
            partials[0], partials[1], partials[2], n_rows, n_cols, rows_per_program, dropout_p, seed,
            IS_RMS=is_rms, HAS_DH_OUT=dh_out is not None, STORE_DH=has_residual, HAS_DROPOUT=dropout_p > 0,
            HAS_NORM_BIAS=has_norm_bias, HAS_X_BIAS=has_x_bias, BLOCK_N=block_n, num_warps=num_warps)
        dweight = partials[0].sum(0).to(weight.dtype)
        dnorm_bias = partials[1].sum(0).to(weight.dtype) if has_norm_bias else None
        dx_bias = partials[2].sum(0).to(ctx.x_bias_dtype) if has_x_bias else None
        dresidual = dh.reshape(shape) if has_residual else None
        return dx.reshape(shape), dresidual, dx_bias, dweight, dnorm_bias, None, None, None, None


def layer_norm(x, weight, bias, eps: float):
    return _FusedNorm.apply(x, None, None, weight, bias, eps, 0.0, False, False)


def rms_norm(x, weight, eps: float):
    return _FusedNorm.apply(x, None, None, weight, None, eps, 0.0, True, False)


def residual_dropout_norm(x, residual, bias, p: float, training: bool, weight, norm_bias, eps: float,
                          norm_kind: str):
    dropout_p = float(p) if training else 0.0
    return _FusedNorm.apply(x, residual, bias, weight, norm_bias, eps, dropout_p, norm_kind == "rmsnorm", True)


__all__ = ["layer_norm", "rms_norm", "residual_dropout_norm"]
