"""Reference PyTorch implementations of the fused ops: the `torch` choice of `model.kernels`, the body that
`compile` hands to torch.compile, and the ground truth the Triton kernels are tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Philox4x32 constants (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11).
_PHILOX_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
_PHILOX_KEY_STEPS = (0x9E3779B9, 0xBB67AE85)
_UINT32 = 0xFFFFFFFF
_INT31_TO_UNIT = 4.6566127342e-10  # the largest scale with (2**31 - 1) * scale < 1 in fp32


def layer_norm(x, weight, bias, eps: float):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def rms_norm(x, weight, eps: float):
    # Statistics in fp32 whatever the input dtype, as the Triton kernel does.
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * weight.float()).to(x.dtype)


def bias_gelu(x, bias, approximate: str):
    return F.gelu(x if bias is None else x + bias, approximate=approximate)


def gated_gelu(gate, up):
    return F.gelu(gate, approximate="tanh") * up


def residual_dropout_norm(x, residual, bias, p: float, training: bool, weight, norm_bias, eps: float,
                          norm_kind: str, keep_mask=None):
    """new_residual = residual + dropout(x + bias); normed = norm(new_residual). `keep_mask` replaces torch's
    dropout draw with a given mask (the Triton kernel's Philox mask, for tests)."""
    branch = x if bias is None else x + bias
    if training and p > 0:
        branch = F.dropout(branch, p) if keep_mask is None else branch * keep_mask / (1.0 - p)
    new_residual = branch if residual is None else residual + branch
    if norm_kind == "rmsnorm":
        return rms_norm(new_residual, weight, eps), new_residual
    return layer_norm(new_residual, weight, norm_bias, eps), new_residual


def _mul_hi_lo(multiplier: int, value: torch.Tensor):
    # 32x32 -> 64-bit product in int64 without overflow: split `value` into 16-bit halves.
    value_hi, value_lo = value >> 16, value & 0xFFFF
    high_part, low_part = multiplier * value_hi, multiplier * value_lo  # each < 2**48
    hi = (high_part + (low_part >> 16)) >> 16
    lo = (((high_part & 0xFFFF) << 16) + low_part) & _UINT32
    return hi, lo


def philox_uniform(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) floats equal bit for bit to Triton's `tl.rand(seed, offsets)` for int64 offsets:
    Philox4x32-10 on counter (offset_lo, offset_hi, 0, 0) with key (seed_lo, seed_hi), first output word."""
    offsets = offsets.to(torch.int64)
    c0, c1 = offsets & _UINT32, (offsets >> 32) & _UINT32
    c2, c3 = torch.zeros_like(c0), torch.zeros_like(c0)
    k0, k1 = seed & _UINT32, (seed >> 32) & _UINT32
    for _ in range(10):
        hi0, lo0 = _mul_hi_lo(_PHILOX_MULTIPLIERS[0], c0)
        hi1, lo1 = _mul_hi_lo(_PHILOX_MULTIPLIERS[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _PHILOX_KEY_STEPS[0]) & _UINT32, (k1 + _PHILOX_KEY_STEPS[1]) & _UINT32
    signed = torch.where(c0 >= 2**31, c0 - 2**32, c0)
    magnitude = torch.where(signed < 0, -signed - 1, signed)  # ~x for negative int32
    return magnitude.to(torch.float32) * torch.tensor(_INT31_TO_UNIT, dtype=torch.float32)


def dropout_keep_mask(seed: int, shape: tuple[int, ...], p: float) -> torch.Tensor:
    """The keep mask the Triton residual-dropout-norm kernel draws for a (rows, cols) input: element
    (r, c) uses Philox offset r * cols + c, kept when its uniform is >= p."""
    offsets = torch.arange(int(torch.tensor(shape).prod()), dtype=torch.int64).reshape(shape)
    return philox_uniform(seed, offsets) >= p


# Cross-entropy, chunked over rows. On CPU a chunk of about 1 MB of fp32 stays in cache across the passes
# (max, exp, sum; exp, scale, scatter): 1.5-2x faster than F.cross_entropy's whole-matrix log_softmax and
# its backward. On GPUs the chunk only bounds memory (at most 2**24 fp32 elements at a time).
_CROSS_ENTROPY_CHUNK = {"cpu": 2**18}
_CROSS_ENTROPY_CHUNK_DEFAULT = 2**24


def _row_chunks(logits2d: torch.Tensor):
    elements = _CROSS_ENTROPY_CHUNK.get(logits2d.device.type, _CROSS_ENTROPY_CHUNK_DEFAULT)
    rows_per_chunk = max(1, elements // max(logits2d.shape[1], 1))
    for start in range(0, logits2d.shape[0], rows_per_chunk):
        yield slice(start, start + rows_per_chunk)


def _local_targets(labels: torch.Tensor, vocab_start: int, local_vocab: int):
    local = labels - vocab_start
    in_shard = (local >= 0) & (local < local_vocab)
    return local.clamp(0, local_vocab - 1), in_shard


def cross_entropy_row_stats(logits2d, labels, vocab_start: int, need_logit_sum: bool):
    """Per row of the (rows, local_vocab) shard, in fp32: (max, sum exp(z - max), target logit or 0 when the
    label lives on another shard, sum of logits)."""
    rows, local_vocab = logits2d.shape
    stats = torch.zeros(4, rows, dtype=torch.float32, device=logits2d.device)
    local, in_shard = _local_targets(labels, vocab_start, local_vocab)
    for chunk in _row_chunks(logits2d):
        z = logits2d[chunk].float()  # (chunk_rows, local_vocab)
        row_max = z.amax(-1)
        stats[0, chunk] = row_max
        stats[1, chunk] = torch.exp(z - row_max[:, None]).sum(-1)
        stats[2, chunk] = z.gather(1, local[chunk, None]).squeeze(1) * in_shard[chunk]
        if need_logit_sum:
            stats[3, chunk] = z.sum(-1)
    return stats


def cross_entropy_logits_grad(logits2d, labels, lse, row_scale, vocab_start: int, vocab_size: int,
                              label_smoothing: float):
    """d loss / d logits for the shard: (softmax - (1 - eps) * onehot - eps / V) * row_scale, with row_scale
    already zero on ignored rows."""
    grad = torch.empty_like(logits2d)
    local, in_shard = _local_targets(labels, vocab_start, logits2d.shape[1])
    target_delta = (-(1.0 - label_smoothing) * in_shard.float() * row_scale)[:, None]  # (rows, 1)
    for chunk in _row_chunks(logits2d):
        # a fresh chunk and in-place ops: on CPU, torch.sub(..., out=grad[chunk]) takes a slow path (2x)
        probs = (logits2d[chunk].float() - lse[chunk, None]).exp_()
        if label_smoothing > 0:
            probs -= label_smoothing / vocab_size
        probs *= row_scale[chunk, None]
        probs.scatter_add_(1, local[chunk, None], target_delta[chunk])
        grad[chunk] = probs  # cast to the logits' dtype on the copy
    return grad


def cross_entropy(logits, labels, ignore_index: int = -100, label_smoothing: float = 0.0,
                  reduction: str = "sum"):
    """The unchunked reference (materializes fp32 logits); torch.compile fuses the upcast away."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=ignore_index, label_smoothing=label_smoothing,
                           reduction=reduction).reshape(labels.shape if reduction == "none" else ())
