"""Activation checkpointing over the transformer blocks: every block of every `layers` ModuleDict
(`layers`, `encoder.layers`, `decoder.layers`).

  full       a block keeps only its inputs; its whole forward reruns during backward (~1 extra forward).
  selective  a block keeps the outputs of its matmuls and attention kernels and recomputes the cheap ops
             between them (norms, activations, dropout, softmax of the math attention, residual adds):
             most of the memory of the elementwise activations back for a few % of compute.

The block's own `forward` is replaced instead of wrapping the block in another module, so parameter names
(which checkpoints, TP plans and pipeline splits key on) do not change. Dropout masks are identical in the
recompute because checkpoint restores the RNG state (preserve_rng_state)."""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

MODES = ("none", "full", "selective")

_aten = torch.ops.aten
# The ops whose outputs selective mode keeps: the expensive ones to recompute.
SAVED_OPS = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default,
             _aten._scaled_dot_product_flash_attention.default,
             _aten._scaled_dot_product_efficient_attention.default,
             _aten._scaled_dot_product_cudnn_attention.default,
             _aten._scaled_dot_product_flash_attention_for_cpu.default}


def _keep_matmul_outputs(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts():
    return create_selective_checkpoint_contexts(_keep_matmul_outputs)


def _checkpointed_forward(original_forward, mode: str, *args, **kwargs):
    if mode == "selective":
        return checkpoint(original_forward, *args, use_reentrant=False, context_fn=_selective_contexts, **kwargs)
    return checkpoint(original_forward, *args, use_reentrant=False, **kwargs)


def checkpoint_block(block: nn.Module, mode: str) -> None:
    if getattr(block, "activation_checkpointing", "none") != "none":
        raise ValueError(f"block already has activation checkpointing ({block.activation_checkpointing})")
    block.forward = functools.partial(_checkpointed_forward, block.forward, mode)
    block.activation_checkpointing = mode


def apply_activation_checkpointing(model: nn.Module, mode: str) -> nn.Module:
    """Checkpoint every block in place; returns the model. mode: none | full | selective."""
    if mode not in MODES:
        raise ValueError(f"activation checkpointing mode {mode!r} is not one of {', '.join(MODES)}")
    if mode == "none":
        return model
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == "layers" and isinstance(module, nn.ModuleDict):
            for block in module.values():
                checkpoint_block(block, mode)
    return model
