"""Vocab-parallel cross-entropy (Megatron's), installed as a TorchFunctionMode around the model's loss.

With tensor parallelism the LM head returns logits as a DTensor sharded on the vocab dim, (N, V/tp) per
rank. Inside `vocab_parallel_loss()` every `F.cross_entropy` on such a DTensor runs on the local shards
with three all-reduces of (N,) vectors (max, sum of exps, target logit) instead of gathering (N, V), and
returns a plain tensor, so the trainer's loss arithmetic, `.item()` and other (plain) losses such as
BERT's NSP mix freely. torch's own `loss_parallel` returns DTensor losses whose backward refuses plain
cross-entropy terms in the same graph; this one composes."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.overrides import TorchFunctionMode


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local_logits, target, vocab_start, group, ignore_index):
        # local_logits (N, Vl): this rank's columns [vocab_start, vocab_start + Vl); target (N,) global ids
        n, vocab_local = local_logits.shape
        # at least fp32 for the exp / log-sum (as F.cross_entropy does internally); float64 stays float64
        logits = local_logits if local_logits.dtype == torch.float64 else local_logits.float()
        if vocab_local:
            row_max = logits.max(dim=-1).values
        else:  # an empty shard (fewer classes than ranks) still joins every collective
            row_max = torch.full((n,), float("-inf"), dtype=logits.dtype, device=logits.device)
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - row_max[:, None]
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        valid = target != ignore_index
        in_shard = valid & (target >= vocab_start) & (target < vocab_start + vocab_local)
        local_target = (target - vocab_start).clamp(0, max(vocab_local - 1, 0))
        target_logit = torch.zeros(n, dtype=logits.dtype, device=logits.device)
        if vocab_local:
            target_logit = shifted.gather(1, local_target[:, None]).squeeze(1) * in_shard
        dist.all_reduce(target_logit, group=group)
        loss = (sum_exp.log() - target_logit) * valid
        ctx.save_for_backward(exp / sum_exp[:, None], local_target, in_shard, valid)
        ctx.input_dtype = local_logits.dtype
        return loss.to(local_logits.dtype)  # F.cross_entropy returns the input's dtype

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_target, in_shard, valid = ctx.saved_tensors
        # d loss_i / d logit_ij = softmax_ij - [j == target_i]; no communication needed
        grad = softmax.clone()  # (N, Vl)
        if grad.shape[1]:
            rows = torch.arange(grad.shape[0], device=grad.device)
            grad[rows, local_target] -= in_shard.to(grad.dtype)
        grad *= (grad_loss.to(grad.dtype) * valid)[:, None]
        return grad.to(ctx.input_dtype), None, None, None, None


def _shard_offset(size: int, parts: int, index: int) -> int:
    chunk = -(-size // parts)  # torch.chunk / DTensor Shard sizes
    return min(index * chunk, size)


def vocab_parallel_cross_entropy(logits: DTensor, target: torch.Tensor, ignore_index: int = -100,
                                 reduction: str = "mean") -> torch.Tensor:
    """logits (N, V) DTensor sharded on dim 1 over a 1-D mesh; target (N,) plain. Returns a plain tensor."""
    mesh = logits.device_mesh
    vocab = logits.shape[1]
    start = _shard_offset(vocab, mesh.size(), mesh.get_local_rank())
    target = target.to_local() if isinstance(target, DTensor) else target
    per_row = _VocabParallelCrossEntropy.apply(logits.to_local(), target, start, mesh.get_group(), ignore_index)
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    return per_row.sum() / (target != ignore_index).sum().clamp(min=1)


def _is_vocab_sharded(tensor) -> bool:
    return (isinstance(tensor, DTensor) and tensor.device_mesh.ndim == 1 and tensor.ndim == 2
            and tensor.placements[0].is_shard() and tensor.placements[0].dim in (1, -1))


class vocab_parallel_loss(TorchFunctionMode):
    """Context manager: F.cross_entropy on vocab-sharded DTensor logits becomes the vocab-parallel one."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.cross_entropy and _is_vocab_sharded(args[0] if args else kwargs.get("input")):
            return self._cross_entropy(*args, **kwargs)
        return func(*args, **kwargs)

    @staticmethod
    def _cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                       reduction="mean", label_smoothing=0.0):
        if weight is not None or label_smoothing or size_average is not None or reduce is not None:
            raise NotImplementedError("vocab-parallel cross-entropy supports no class weights or smoothing")
        return vocab_parallel_cross_entropy(input, target, ignore_index, reduction)
