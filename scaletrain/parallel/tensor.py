"""Tensor (+ sequence) parallel plans on DTensor, one per family, as dicts module name -> ParallelStyle.

Megatron's layout on the contract's module names (docs/contracts.md), model code unchanged:
- q/k/v and fc_in/fc_gate are column-parallel: each rank holds n_heads/tp heads and ffn/tp columns, so
  attention and the activation run on local shards with no communication;
- out_proj and fc_out are row-parallel: one all-reduce (or, with sequence parallel, a reduce-scatter to
  sequence shards) per sub-block;
- token / position / token-type embeddings are vocab-parallel (rows sharded; DTensor masks out-of-range
  ids and all-reduces), the LM head is column-parallel with vocab-sharded logits left as DTensors for
  the vocab-parallel cross-entropy (parallel/loss.py), so the full (B, T, V) logits never exist on one rank;
- the T5 relative bias table (buckets, n_heads) is sharded by heads, like the attention it feeds; so are
  XLNet's relative-position projection (r_proj, column-parallel) and its per-head biases and segment
  embeddings (r_w_bias, r_r_bias, r_s_bias (H, Dh), seg_embed (2, H, Dh)).
Sequence parallel: inside each layer stack the residual stream is a DTensor sharded on the sequence dim
(B, T/tp, D); norms (and dropout) run on the shards; attention and MLP inputs are all-gathered. The stack
input is split (no communication) and its output all-gathered, so embeddings, final norms and heads see a
plain replicated tensor whatever the layout."""

from __future__ import annotations

import dataclasses
import logging
from typing import Dict

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (ColwiseParallel, ParallelStyle, RowwiseParallel,
                                               SequenceParallel, parallelize_module)

from scaletrain.configs.schema import ModelConfig
from scaletrain.models.blocks import Attention, Block
from scaletrain.models.xlnet import RelativeAttention

log = logging.getLogger(__name__)

Plan = Dict[str, ParallelStyle]


def padded_model_config(model_cfg: ModelConfig, tp: int = 1) -> ModelConfig:
    """The vocab rounded up to pad_vocab_multiple x tp (Megatron): every rank's vocab shard is equal and
    a multiple of 128 for fast matmuls. The extra rows are ordinary trained rows no label ever hits."""
    padded = model_cfg.padded_vocab_size(tp)
    if padded != model_cfg.vocab_size:
        log.info("vocab padded from %d to %d (multiple of %d x tp=%d): %d extra rows", model_cfg.vocab_size,
                 padded, model_cfg.pad_vocab_multiple, tp, padded - model_cfg.vocab_size)
    # pad_vocab_multiple=1 marks the config as already padded, so padding twice is a no-op.
    return dataclasses.replace(model_cfg, vocab_size=padded, pad_vocab_multiple=1)


class FirstArgLayout(ParallelStyle):
    """Re-lays the first positional input and/or the first output of a module, leaving the other inputs
    (masks, relative bias, encoder memory) untouched; PrepareModuleInput needs every positional input."""

    def __init__(self, *, input_from=None, input_to=None, output_from=None, output_to=None,
                 use_local_output: bool = False):
        self.input_from, self.input_to = input_from, input_to
        self.output_from, self.output_to = output_from, output_to
        self.use_local_output = use_local_output

    def _relayout(self, tensor, source, target, mesh, local: bool):
        if not isinstance(tensor, DTensor):
            tensor = DTensor.from_local(tensor, mesh, (source,), run_check=False)
        if tensor.placements != (target,):
            tensor = tensor.redistribute(mesh, (target,))
        return tensor.to_local() if local else tensor

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        if self.input_to is not None:
            def pre_hook(mod, args, kwargs):
                first = self._relayout(args[0], self.input_from, self.input_to, device_mesh, self.use_local_output)
                return (first, *args[1:]), kwargs
            module.register_forward_pre_hook(pre_hook, with_kwargs=True)
        if self.output_to is not None:
            def post_hook(mod, args, output):
                if isinstance(output, tuple):
                    first = self._relayout(output[0], self.output_from, self.output_to, device_mesh, True)
                    return (first, *output[1:])
                return self._relayout(output, self.output_from, self.output_to, device_mesh, True)
            module.register_forward_hook(post_hook)
        return module


def _block_plan(prefix: str, block: nn.Module, sequence_parallel: bool) -> Plan:
    """One transformer block: attention (and cross-attention), MLP, and with SP their norms."""
    # Row-parallel outputs join the residual stream: a plain tensor, or with SP a (B, T/tp, D) DTensor.
    residual = Shard(1) if sequence_parallel else Replicate()
    plan: Plan = {}
    for attn_name in ("attn", "cross_attn"):
        if getattr(block, attn_name, None) is None:
            continue
        for proj in ("q_proj", "k_proj", "v_proj", "r_proj"):  # r_proj: XLNet's relative-position keys
            if getattr(getattr(block, attn_name), proj, None) is not None:
                plan[f"{prefix}.{attn_name}.{proj}"] = ColwiseParallel()
        if isinstance(getattr(block, attn_name), RelativeAttention):
            plan[f"{prefix}.{attn_name}"] = HeadShardedParameters(XLNET_HEAD_PARAMETERS)
        plan[f"{prefix}.{attn_name}.out_proj"] = RowwiseParallel(output_layouts=residual,
                                                                 use_local_output=not sequence_parallel)
        if sequence_parallel:
            # (B, T/tp, D) DTensor -> all-gathered plain (B, T, D) for the column-parallel projections.
            plan[f"{prefix}.{attn_name}"] = FirstArgLayout(input_from=Shard(1), input_to=Replicate(),
                                                           use_local_output=True)
    mlp = block.mlp
    plan[f"{prefix}.mlp.fc_in"] = ColwiseParallel()
    if getattr(mlp, "fc_gate", None) is not None:
        plan[f"{prefix}.mlp.fc_gate"] = ColwiseParallel()
    plan[f"{prefix}.mlp.fc_out"] = RowwiseParallel(output_layouts=residual, use_local_output=not sequence_parallel)
    if sequence_parallel:
        plan[f"{prefix}.mlp"] = FirstArgLayout(input_from=Shard(1), input_to=Replicate(), use_local_output=True)
        for norm in ("attn_norm", "cross_attn_norm", "mlp_norm"):
            if isinstance(getattr(block, norm, None), nn.Module):
                plan[f"{prefix}.{norm}"] = SequenceParallel()
    return plan


def _stack_plan(prefix: str, layers: nn.ModuleDict, sequence_parallel: bool) -> Plan:
    plan: Plan = {}
    keys = list(layers.keys())
    for key in keys:
        plan.update(_block_plan(f"{prefix}layers.{key}", layers[key], sequence_parallel))
    if sequence_parallel and keys:  # a pipeline stage may own no layers of this stack (T5's decoder-only stage)
        # Enter the stack: split the replicated (B, T, D) stream into sequence shards (no communication);
        # leave it: all-gather back to a plain tensor for the final norm / heads / cross-attention memory.
        first, last = f"{prefix}layers.{keys[0]}", f"{prefix}layers.{keys[-1]}"
        enter = dict(input_from=Replicate(), input_to=Shard(1))
        leave = dict(output_from=Shard(1), output_to=Replicate())
        if first == last:
            plan[first] = FirstArgLayout(**enter, **leave)
        else:
            plan[first], plan[last] = FirstArgLayout(**enter), FirstArgLayout(**leave)
    return plan


def _vocab_parallel() -> RowwiseParallel:
    # Embedding rows sharded over tp; ids are replicated; the output is all-reduced to a plain tensor.
    return RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())


def _lm_head() -> ColwiseParallel:
    # Logits stay a DTensor sharded on the vocab dim (B, T, V/tp) for the vocab-parallel loss (loss.py).
    return ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)


def _shardable_table(module, tp: int) -> bool:
    # A table with rows not divisible by tp (BERT's 2 token types, RoBERTa's 514 positions at tp=4) stays
    # replicated: it is tiny, and uneven row shards break DTensor's embedding-gradient accumulation.
    return isinstance(module, nn.Embedding) and module.num_embeddings % tp == 0


def tensor_parallel_plan(model: nn.Module, tp: int, sequence_parallel: bool = False) -> Plan:
    """The plan for any family, keyed on the contract's module names present in `model`."""
    plan: Plan = {}
    for name in ("tok_embeddings", "pos_embeddings", "type_embeddings"):
        if _shardable_table(getattr(model, name, None), tp):
            plan[name] = _vocab_parallel()
    if isinstance(getattr(model, "layers", None), nn.ModuleDict):
        plan.update(_stack_plan("", model.layers, sequence_parallel))
    for stack_name in ("encoder", "decoder"):
        stack = getattr(model, stack_name, None)
        if stack is None:
            continue
        plan.update(_stack_plan(f"{stack_name}.", stack.layers, sequence_parallel))
        for name in ("tok_embeddings", "pos_embeddings"):
            if _shardable_table(getattr(stack, name, None), tp):
                plan[f"{stack_name}.{name}"] = _vocab_parallel()
        bias = getattr(stack, "relative_bias", None)
        if bias is not None:
            plan.update(_relative_bias_plan(f"{stack_name}.relative_bias", bias))
    if isinstance(getattr(model, "lm_head", None), nn.Linear):
        plan["lm_head"] = _lm_head()
    if isinstance(getattr(getattr(model, "mlm_head", None), "decoder", None), nn.Linear):
        plan["mlm_head.decoder"] = _lm_head()
    return plan


class HeadShardedTable(ParallelStyle):
    """T5's relative bias: the (buckets, n_heads) `weight` becomes a DTensor sharded on heads, and the module
    computes with its local (buckets, n_heads/tp) piece, giving the (1, n_heads/tp, Tq, Tk) bias of this
    rank's heads. The model's forward is reused unchanged; only the tensor it reads is the local shard."""

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        module.weight = nn.Parameter(distribute_tensor(module.weight, device_mesh, [Shard(1)]))
        compute = type(module).forward

        def local_forward(*args, **kwargs):
            sharded = module._parameters["weight"]
            module._parameters["weight"] = sharded.to_local()  # differentiable: grads land in the shard
            try:
                return compute(module, *args, **kwargs)
            finally:
                module._parameters["weight"] = sharded

        module.forward = local_forward
        return module


XLNET_HEAD_PARAMETERS = {"r_w_bias": 0, "r_r_bias": 0, "r_s_bias": 0, "seg_embed": 1}  # name -> heads dim


class HeadShardedParameters(ParallelStyle):
    """Per-head parameters of a module (name -> its heads dim) become DTensors sharded on heads; the forward
    sees the local (.., H/tp, ..) pieces, matching the H/tp heads of the column-parallel projections."""

    def __init__(self, heads_dims: dict[str, int]):
        self.heads_dims = heads_dims

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        for name, dim in self.heads_dims.items():
            setattr(module, name, nn.Parameter(distribute_tensor(getattr(module, name), device_mesh, [Shard(dim)])))
        compute = type(module).forward

        def local_forward(*args, **kwargs):
            sharded = {name: module._parameters[name] for name in self.heads_dims}
            for name, parameter in sharded.items():
                module._parameters[name] = parameter.to_local()  # differentiable: grads land in the shard
            try:
                return compute(module, *args, **kwargs)
            finally:
                module._parameters.update(sharded)

        module.forward = local_forward
        return module


def _relative_bias_plan(prefix: str, bias: nn.Module) -> Plan:
    if isinstance(bias, nn.Embedding):
        return {prefix: ColwiseParallel(input_layouts=Replicate(), output_layouts=Shard(-1))}
    return {prefix: HeadShardedTable()}


def _tied_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(owner, alias) module paths whose `weight` is the same Parameter (tied embeddings)."""
    owners: dict[int, str] = {}
    pairs = []
    for name, module in model.named_modules(remove_duplicate=False):
        weight = module._parameters.get("weight") if hasattr(module, "_parameters") else None
        if weight is None:
            continue
        if id(weight) in owners and owners[id(weight)] != name:
            pairs.append((owners[id(weight)], name))
        else:
            owners.setdefault(id(weight), name)
    return pairs


def apply_tensor_parallel(model: nn.Module, tp_mesh, sequence_parallel: bool = False) -> nn.Module:
    """Shards `model` in place over the 1-D tp mesh; tied weights stay tied (both sides are Shard(0))."""
    tied = _tied_pairs(model)
    parallelize_module(model, tp_mesh, tensor_parallel_plan(model, tp_mesh.size(), sequence_parallel))
    for owner, alias in tied:
        # parallelize_module replaced each module's Parameter with its own DTensor; re-tie them.
        model.get_submodule(alias).weight = model.get_submodule(owner).weight
    logits_bias = getattr(model, "final_logits_bias", None)
    if isinstance(logits_bias, torch.Tensor):
        # BART's (1, V) bias is added to vocab-sharded logits, so it is vocab-sharded the same way.
        model.final_logits_bias = distribute_tensor(logits_bias, tp_mesh, [Shard(1)])
    # The tp ranks are seeded alike (replicated dropout needs equal masks), so attention-probability
    # dropout on each rank's (B, H/tp, T, Dh) heads needs its own RNG stream or head h of every rank
    # would share one mask. The MLP has no dropout between fc_in and fc_out, so attention is the only one.
    # Sequence parallel: the residual stream's dropout acts on (B, T/tp, D) shards; on CUDA DTensor's
    # offset RNG gives each shard its own piece of one global mask, a CPU mesh needs a stream per rank.
    residual_streams = sequence_parallel and tp_mesh.device_type == "cpu"
    for module in model.modules():
        if isinstance(module, (Attention, RelativeAttention)):
            module.dropout_stream = tp_mesh.get_local_rank() + 1
        if isinstance(module, Block) and residual_streams:
            module.dropout_stream = tp_mesh.get_local_rank() + 1
    _keep_each_ranks_rng(tp_mesh)
    return model


def _keep_each_ranks_rng(tp_mesh) -> None:
    """DTensor's first random op (dropout on the sequence-parallel residual stream) on a CUDA mesh builds its
    RNG tracker with a state sync: a broadcast of rank 0's generator over the default group, i.e. the whole
    world. Every data-parallel replica and pipeline stage would then draw rank 0's dropout masks for the
    rest of the run. A tracker built here without that sync keeps each rank's seeded state (seed + dp_rank,
    the same on the tp ranks of a replica, which is what DTensor's per-shard offsets need). CPU meshes have
    no DTensor RNG: there the blocks draw sequence-parallel dropout from a stream per rank instead."""
    if tp_mesh.device_type == "cpu":
        return
    from torch.distributed.tensor import _random

    if _random._rng_tracker is None and _random.is_rng_supported_mesh(tp_mesh):
        _random._rng_tracker = _random.OffsetBasedRNGTracker(tp_mesh, run_state_sync=False)
