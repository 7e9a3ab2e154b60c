"""Softmax cross-entropy over the (possibly vocab-sharded) logits as one autograd.Function.

The forward reduces each row to four fp32 statistics (max, sum-exp, target logit, logit sum), combines them
across tensor-parallel ranks when the logits are a vocab shard, and forms the loss from them; the backward
recomputes the softmax chunk by chunk. A backend (Triton kernels or the chunked torch reference) supplies
the two passes over the logits, so neither path holds the full fp32 softmax."""

from __future__ import annotations

import torch

from scaletrain.errors import ConfigError

_REDUCTIONS = ("sum", "mean", "none")


def _combine_across_shards(stats: torch.Tensor, tp_group) -> torch.Tensor:
    # stats (4, rows) per shard -> global: max by all-reduce MAX, then the sum-exp rescaled to the global max,
    # and target logit (nonzero on one shard only) and logit sum by one packed all-reduce SUM.
    import torch.distributed as dist  # only here: models import this module and must not touch distributed

    global_max = stats[0].clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=tp_group)
    sums = stats[1:].clone()
    sums[0] *= torch.exp(stats[0] - global_max)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=tp_group)
    return torch.cat([global_max[None], sums])


class CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index, label_smoothing, reduction, tp_group, backend):
        local_vocab = logits.shape[-1]
        logits2d = logits.reshape(-1, local_vocab).contiguous()  # (rows, local_vocab)
        labels1d = labels.reshape(-1).contiguous()
        vocab_start, vocab_size = 0, local_vocab
        if tp_group is not None:
            import torch.distributed as dist

            vocab_start = dist.get_rank(tp_group) * local_vocab
            vocab_size = dist.get_world_size(tp_group) * local_vocab
        stats = backend.cross_entropy_row_stats(logits2d, labels1d, vocab_start, label_smoothing > 0)
        if tp_group is not None:
            stats = _combine_across_shards(stats, tp_group)
        lse = stats[0] + torch.log(stats[1])  # (rows,) log-sum-exp over the whole vocabulary
        valid = labels1d != ignore_index
        losses = (1.0 - label_smoothing) * (lse - stats[2])
        if label_smoothing > 0:
            losses = losses + label_smoothing * (lse - stats[3] / vocab_size)
        losses = torch.where(valid, losses, 0.0)
        ctx.save_for_backward(logits2d, labels1d, lse, valid)
        ctx.config = (logits.shape, reduction, vocab_start, vocab_size, label_smoothing, backend)
        if reduction == "none":
            return losses.reshape(labels.shape)
        total = losses.sum()
        return total / valid.sum() if reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad_output):
        logits2d, labels1d, lse, valid = ctx.saved_tensors
        shape, reduction, vocab_start, vocab_size, label_smoothing, backend = ctx.config
        if reduction == "none":
            row_scale = grad_output.reshape(-1).float()
        elif reduction == "mean":
            row_scale = (grad_output.float() / valid.sum()).expand(labels1d.shape[0])
        else:
            row_scale = grad_output.float().expand(labels1d.shape[0])
        row_scale = torch.where(valid, row_scale, 0.0)
        grad = backend.cross_entropy_logits_grad(logits2d, labels1d, lse, row_scale, vocab_start, vocab_size,
                                                 label_smoothing)
        return grad.reshape(shape), None, None, None, None, None, None


def check_arguments(logits, labels, label_smoothing: float, reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ConfigError(f"cross_entropy reduction={reduction!r} is unknown; use one of {', '.join(_REDUCTIONS)}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ConfigError(f"label_smoothing={label_smoothing} is outside [0, 1); pick a value like 0.1")
    if logits.shape[:-1] != labels.shape:
        raise ConfigError(f"cross_entropy got logits {tuple(logits.shape)} for labels {tuple(labels.shape)}; "
                          "logits must be labels.shape + (vocab,)")
