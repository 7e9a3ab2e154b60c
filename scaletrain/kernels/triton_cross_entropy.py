"""Cross-entropy over the vocabulary in Triton: one program per row walks the row in BLOCK_V chunks with an
online max / sum-exp, so no fp32 softmax is ever stored. The backward kernel recomputes the softmax from the
saved logits and the log-sum-exp, writing the gradient once."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_CUDA_BLOCK_V = 4096
_INTERPRETER_BLOCK_V = 128  # small chunks under the interpreter so tests cross chunk boundaries


@triton.jit
def _row_stats_kernel(LOGITS, LABELS, STATS, n_rows, n_cols, vocab_start,
                      NEED_LOGIT_SUM: tl.constexpr, BLOCK_V: tl.constexpr):
    # STATS is (4, n_rows) fp32: max, sum exp(z - max), target logit (0 off-shard), sum of logits.
    row = tl.program_id(0).to(tl.int64)
    row_logits = LOGITS + row * n_cols
    running_max = float("-inf")
    running_sum = 0.0
    logit_sum = 0.0
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(row_logits + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(z, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(z - new_max), axis=0)
        running_max = new_max
        if NEED_LOGIT_SUM:
            logit_sum += tl.sum(tl.where(cols < n_cols, z, 0.0), axis=0)
    local_label = tl.load(LABELS + row) - vocab_start
    in_shard = (local_label >= 0) & (local_label < n_cols)
    target = tl.load(row_logits + local_label, mask=in_shard, other=0.0).to(tl.float32)
    tl.store(STATS + row, running_max)
    tl.store(STATS + n_rows + row, running_sum)
    tl.store(STATS + 2 * n_rows + row, target)
    if NEED_LOGIT_SUM:
        tl.store(STATS + 3 * n_rows + row, logit_sum)


@triton.jit
def _logits_grad_kernel(LOGITS, LABELS, LSE, ROW_SCALE, GRAD, n_cols, vocab_start, smoothing_per_class,
                        target_weight, BLOCK_V: tl.constexpr):
    # grad = (softmax - target_weight * onehot - smoothing_per_class) * row_scale
    row = tl.program_id(0).to(tl.int64)
    lse = tl.load(LSE + row)
    scale = tl.load(ROW_SCALE + row)
    local_label = tl.load(LABELS + row) - vocab_start
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < n_cols
        z = tl.load(LOGITS + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        grad = tl.exp(z - lse) - smoothing_per_class - tl.where(cols == local_label, target_weight, 0.0)
        tl.store(GRAD + row * n_cols + cols, (grad * scale).to(GRAD.dtype.element_ty), mask=mask)


def _block_v(logits2d: torch.Tensor) -> tuple[int, int]:
    cap = _CUDA_BLOCK_V if logits2d.is_cuda else _INTERPRETER_BLOCK_V
    block_v = min(triton.next_power_of_2(logits2d.shape[1]), cap)
    return block_v, 8 if block_v >= 2048 else 4


def cross_entropy_row_stats(logits2d, labels, vocab_start: int, need_logit_sum: bool):
    n_rows, n_cols = logits2d.shape
    stats = torch.zeros(4, n_rows, dtype=torch.float32, device=logits2d.device)
    if n_rows == 0:
        return stats
    block_v, num_warps = _block_v(logits2d)
    _row_stats_kernel[(n_rows,)](logits2d, labels, stats, n_rows, n_cols, vocab_start,
                                 NEED_LOGIT_SUM=need_logit_sum, BLOCK_V=block_v, num_warps=num_warps)
    return stats


def cross_entropy_logits_grad(logits2d, labels, lse, row_scale, vocab_start: int, vocab_size: int,
                              label_smoothing: float):
    n_rows, n_cols = logits2d.shape
    grad = torch.empty_like(logits2d)
    if n_rows == 0:
        return grad
    block_v, num_warps = _block_v(logits2d)
    _logits_grad_kernel[(n_rows,)](logits2d, labels, lse, row_scale.contiguous(), grad, n_cols, vocab_start,
                                   label_smoothing / vocab_size, 1.0 - label_smoothing,
                                   BLOCK_V=block_v, num_warps=num_warps)
    return grad
