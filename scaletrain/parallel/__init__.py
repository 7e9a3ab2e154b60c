"""Parallelism as the trainer calls it (docs/contracts.md, "Parallelism"): ParallelDims owns the degrees and
the one DeviceMesh; `parallelize` applies the layout to a meta-device model from outside."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn

from scaletrain.configs.schema import TrainConfig
from scaletrain.parallel.data import apply_data_parallel, shard_optimizer_state, transformer_blocks
from scaletrain.parallel.dims import ParallelDims
from scaletrain.parallel.tensor import apply_tensor_parallel, padded_model_config

__all__ = ["ParallelDims", "parallelize", "materialize", "clip_grad_norm_", "loss_context",
           "padded_model_config", "shard_optimizer_state"]


def parallelize(model: nn.Module, dims: ParallelDims, cfg: TrainConfig) -> nn.Module:
    """Applies the layout to the model on the meta device and returns it (with pp > 1: this rank's
    PipelineModel, whose `stages` each got the same treatment); the caller materializes it."""
    # 1. Pipeline split first: it deletes the other stages' modules, so later steps see only this stage.
    if dims.pp_enabled:
        from scaletrain.parallel.pipeline import pipeline_split

        model = pipeline_split(model, dims, cfg)
        for stage in model.stages:
            _parallelize_part(stage, dims, cfg)
        return model
    return _parallelize_part(model, dims, cfg)


def _parallelize_part(model: nn.Module, dims: ParallelDims, cfg: TrainConfig) -> nn.Module:
    p = cfg.parallel
    # 2. Tensor parallel before data parallel: FSDP shards the TP DTensor shards again over dp (2-D).
    if dims.tp_enabled:
        apply_tensor_parallel(model, dims.tp_mesh, sequence_parallel=p.sequence_parallel)
    # 3. Activation checkpointing wraps whole (TP-sharded) blocks, so recomputation replays their collectives.
    if cfg.trainer.activation_checkpointing != "none":
        from scaletrain.parallel.checkpointing import apply_activation_checkpointing

        apply_activation_checkpointing(model, cfg.trainer.activation_checkpointing)
    # 4. Compile per block (same graph for every block, so one compilation is reused).
    if cfg.model.kernels == "compile":
        for block in transformer_blocks(model):
            block.compile()
    # 5. Data parallel / ZeRO last: FSDP's hooks go around the checkpointed, compiled blocks. Under
    # parallel.engine=deepspeed the trainer hands the plain model to DeepSpeed instead (parallel/deepspeed.py).
    if dims.engine == "deepspeed":
        return model
    apply_data_parallel(model, dims, precision=cfg.precision, reduce_dtype=p.reduce_dtype, offload=p.offload)
    return model


def materialize(model: nn.Module, device: str | torch.device, seed: int) -> nn.Module:
    """to_empty() + init_weights(seed). A plain to_empty() gives each module its own new Parameter (meta and
    real tensors cannot share a TensorImpl), which silently unties tied embeddings; swapping the tensors
    into the existing Parameter objects keeps ties and every reference FSDP holds."""
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.to_empty(device=device)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)
    model.init_weights(seed)
    return model


def loss_context(dims: ParallelDims):
    """Run forward + loss inside it: with tp the LM-head logits are vocab-sharded DTensors and
    F.cross_entropy on them runs on the shards (parallel/loss.py) instead of gathering (B, T, V)."""
    if dims.tp_enabled:
        from scaletrain.parallel.loss import vocab_parallel_loss

        return vocab_parallel_loss()
    return contextlib.nullcontext()


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, dims: ParallelDims | None = None) -> torch.Tensor:
    """Global L2 norm of all gradients across dp shards, tp shards and pp stages; scales them in place when
    it exceeds max_norm (max_norm <= 0: measure only). Returns the norm as a plain 0-d tensor."""
    from torch.distributed.tensor import DTensor

    params = [p for p in model.parameters() if p.grad is not None]
    grads = [p.grad for p in params]
    # The last stage's copy of a pipeline-tied embedding holds the same summed gradient as the first
    # stage's: count it once in the norm (it is still scaled below, so the copies stay identical).
    counted = [p.grad for p in params if not getattr(p, "pipeline_tied_copy", False)]
    # Group by layout: a DTensor norm reduces over its own mesh; plain tensors are complete on every rank.
    groups: dict = {}
    for grad in counted:
        key = (grad.device_mesh, grad.placements) if isinstance(grad, DTensor) else None
        groups.setdefault(key, []).append(grad)
    total_sq = torch.zeros((), dtype=torch.float32)
    for key, members in groups.items():
        norm = torch.nn.utils.get_total_norm(members, norm_type=2.0, foreach=True)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()  # Partial over shards -> the group's true norm
        total_sq = total_sq.to(norm.device) + norm.float() ** 2
    if dims is not None and dims.pp_enabled:
        import torch.distributed as dist

        dist.all_reduce(total_sq, group=dims.mesh["pp"].get_group())  # stages hold disjoint parameters
    total = total_sq.sqrt()
    if max_norm > 0 and math.isfinite(max_norm):
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for grad in grads:
            local = grad.to_local() if isinstance(grad, DTensor) else grad
            local.mul_(coef.to(local.device, local.dtype))
    return total
