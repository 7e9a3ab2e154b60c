"""What a rank holds beyond its shards and its kept activations (plan/memory.py adds them up): the backward's
transients, whose weight gradients autograd holds apart until AccumulateGrad adds them to .grad, and FSDP's
gathered layers and unsharded gradients. The dry run (parallel/dryrun.py) measures the transients on the CPU
and adds the FSDP buffers from these same formulas."""

from __future__ import annotations

from typing import TYPE_CHECKING

from scaletrain.configs.schema import ModelConfig

if TYPE_CHECKING:  # plan/memory.py imports this module
    from scaletrain.plan.memory import Layout


def accumulation_bytes(layout: Layout, full_elements: int, microbatches: int, precision: str) -> float:
    """What FSDP (ZeRO 2/3) holds besides its shards while gradients accumulate over micro-batches: the
    trainer (and torch's pipeline schedules) turn gradient sync off until the last micro-batch, so FSDP2
    accumulates the unsharded gradients in the reduce dtype (fp32) and reduce-scatters once per step; under
    pp the schedules also keep the parameters unsharded after each backward (reshard_after_backward=False),
    so ZeRO-3 holds the gathered 16-bit stage too. full_elements: the rank's tp-local parameter elements."""
    if layout.zero < 2 or layout.shard_degree == 1:
        return 0.0
    held = full_elements * 4.0 if microbatches > 1 else 0.0
    if layout.zero == 3 and layout.pp > 1:
        held += full_elements * (4 if precision == "fp32" else 2)
    return held


def fsdp_gather_bytes(layout: Layout, full_elements: float, layers: int, precision: str) -> float:
    """ZeRO-3: FSDP all-gathers one layer while prefetching the next, and holds its unsharded gradients."""
    if layout.zero < 3:
        return 0.0
    value_bytes = 4 if precision == "fp32" else 2
    return full_elements / max(layers, 1) * (2 * value_bytes + 4)


def block_gradient_bytes(cfg: ModelConfig, rows: float, tp: int, residual_split: int, value_bytes: int) -> float:
    """A block's backward transient: the gradients of its widest activation (rows, ffn/tp) and of the residual
    stream (rows, D / residual_split: tp under sequence parallelism), and of its widest weight (ffn/tp, D), which
    autograd holds apart until AccumulateGrad adds it to .grad (the dry run measures it)."""
    ffn = cfg.ffn_dim / tp
    return (rows * (ffn + 2 * cfg.d_model / residual_split) + ffn * cfg.d_model) * value_bytes


def embedding_gradient_bytes(cfg: ModelConfig, tp: int, value_bytes: int) -> float:
    """The token table's dense gradient, made by the embedding's backward before it joins .grad: the whole
    padded (V, D) table even under tp, where the vocab-parallel lookup's backward (DTensor) builds it unsharded
    (the dry run measures it so)."""
    return cfg.padded_vocab_size(tp) * cfg.d_model * value_bytes


def head_gradient_bytes(cfg: ModelConfig, logits: float, rows: float, tp: int, value_bytes: int, first: bool,
                        head_kept: float) -> float:
    """The last stage's backward transient: the loss's gradient of the vocab-sharded logits and its fp32 copy,
    then the head's weight gradient (V/tp, D) with its input's (rows, D). Where the rank also embeds and the
    table is tied, the embedding's dense gradient of the same table meets the head's and autograd sums them out
    of place: three (V/tp, D) tensors, after the head's kept activations are freed."""
    table = cfg.padded_vocab_size(tp) / tp * cfg.d_model * value_bytes
    transient = max(logits * (value_bytes + 4), table + rows * cfg.d_model * value_bytes)
    if first and cfg.tie_embeddings:
        transient = max(transient, 3 * table - head_kept)
    return transient
