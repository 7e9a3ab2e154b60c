"""Data parallelism and ZeRO on FSDP2, behind `parallel.zero`.

- zero 0: replicated parameters; gradients all-reduced over every dp rank. We use FSDP2's `replicate`
  (DDP semantics on DTensor), not the classic DDP wrapper, because it composes with tensor-parallel DTensor
  parameters and with DCP's state dicts the same way fully_shard does.
- zero 1: zero 0 + each dp rank keeps the optimizer state of its 1/N_d slice of every parameter
  (`ZeroOneOptimizerState`, installed on the trainer's optimizer by `shard_optimizer_state`).
- zero 2: fully_shard with reshard_after_forward=False: parameters and gradients sharded, the gathered
  parameters kept from forward to backward (no second all-gather).
- zero 3: fully_shard per block + root, parameters resharded after forward.
- dp_replicate x dp_shard: HSDP, fully_shard on the 2-D (replicate, shard) mesh.
- offload=cpu: CPUOffloadPolicy (sharded parameters, gradients and optimizer step on the host).
- bf16 / fp16 precision: MixedPrecisionPolicy, parameters cast for compute, gradients reduced in fp32
  unless parallel.reduce_dtype=param."""

from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.fsdp import (CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard,
                                    register_fsdp_forward_method)
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from scaletrain.parallel.dims import ParallelDims

PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # precision= -> dtype


def transformer_blocks(model: nn.Module) -> Iterator[nn.Module]:
    """Every block of every layer stack (decoder-only/encoder-only `layers`, encdec encoder + decoder)."""
    for stack in (model, getattr(model, "encoder", None), getattr(model, "decoder", None)):
        layers = getattr(stack, "layers", None) if stack is not None else None
        if isinstance(layers, nn.ModuleDict):
            yield from layers.values()


def mixed_precision_policy(precision: str, reduce_dtype: str) -> MixedPrecisionPolicy:
    if precision == "fp32":
        return MixedPrecisionPolicy()
    param_dtype = PRECISION_DTYPES[precision]
    return MixedPrecisionPolicy(param_dtype=param_dtype,
                                reduce_dtype=torch.float32 if reduce_dtype == "fp32" else param_dtype)


def apply_data_parallel(model: nn.Module, dims: ParallelDims, precision: str = "fp32",
                        reduce_dtype: str = "fp32", offload: str = "none") -> nn.Module:
    if not dims.dp_enabled:
        return model
    mp_policy = mixed_precision_policy(precision, reduce_dtype)
    # Pinned host memory makes the copies to the GPU asynchronous; there is nothing to pin for on a CPU run.
    offload_policy = (CPUOffloadPolicy(pin_memory=dims.mesh.device_type != "cpu") if offload == "cpu"
                      else OffloadPolicy())
    if dims.fsdp_enabled:
        reshard = dims.zero == 3
        for block in transformer_blocks(model):
            fully_shard(block, mesh=dims.fsdp_mesh, reshard_after_forward=reshard, mp_policy=mp_policy,
                        offload_policy=offload_policy)
        # The root group (embeddings, final norms, heads) is needed again first thing in backward.
        fully_shard(model, mesh=dims.fsdp_mesh, reshard_after_forward=False, mp_policy=mp_policy,
                    offload_policy=offload_policy)
    else:
        replicate(model, mesh=dims.dp_mesh_flat, mp_policy=mp_policy, offload_policy=offload_policy)
    if hasattr(model, "classify"):  # finetuning calls classify(), not forward(): it needs the same hooks
        register_fsdp_forward_method(model, "classify")
    # The trainer divides the summed loss by the global token count (docs/contracts.md), so gradients are
    # summed over dp ranks, not averaged.
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            if dims.mesh.device_type == "cpu":
                module.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
    return model


class ZeroOneOptimizerState:
    """ZeRO stage 1 on the trainer's own torch optimizer. Each dp rank owns rows [start, end) (torch.chunk
    on dim 0, as DTensor's Shard(0)) of every parameter's (tensor-parallel) local tensor and keeps optimizer
    state only for them. Around `optimizer.step()`:
      pre-hook:  each param group steps row-slice Parameters whose .grad is the slice of the all-reduced grad;
      post-hook: the updated slices are all-gathered back into the full parameters.
    At rest the state is keyed by the model's own Parameters and each state tensor is a DTensor sharded on
    dim 0 over the dp ranks, so DCP's get_state_dict / set_state_dict save and reshard it like FSDP state."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, dims: ParallelDims):
        self.group = dims.dp_mesh_flat.get_group()
        self.world, self.rank = dims.dp_size, dims.dp_mesh_flat.get_local_rank()
        self.optimizer = optimizer
        self.slices: dict[nn.Parameter, nn.Parameter] = {}
        for group in optimizer.param_groups:
            for param in group["params"]:
                rows = self._rows(param)
                self.slices[param] = nn.Parameter(self._local(param.data)[rows[0]:rows[1]].clone())
        optimizer.register_step_pre_hook(lambda *_: self._before_step())
        optimizer.register_step_post_hook(lambda *_: self._after_step())

    @staticmethod
    def _local(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to_local() if isinstance(tensor, DTensor) else tensor

    def _rows(self, param: torch.Tensor) -> tuple[int, int, int]:
        """(start, end, chunk): this rank's rows of the local tensor; the last ranks' chunks may be short."""
        n = self._local(param.data).shape[0] if param.dim() else 1
        chunk = -(-n // self.world)
        start = min(self.rank * chunk, n)
        return start, min(start + chunk, n), chunk

    def _state_placements(self, param: torch.Tensor):
        """The placements of a dim-0 slice state: the dp mesh dims shard dim 0 (after tp's own Shard(0),
        hence "strided", as FSDP2 does), the tp dim keeps the parameter's placement."""
        names = param.device_mesh.mesh_dim_names
        tp_dim0 = "tp" in names and param.placements[names.index("tp")] == Shard(0)
        tp_size = param.device_mesh.size(names.index("tp")) if "tp" in names else 1
        placements = []
        for name, placement in zip(names, param.placements):
            if name == "tp":
                placements.append(placement)
            else:
                placements.append(_StridedShard(0, split_factor=tp_size) if tp_dim0 else Shard(0))
        return tuple(placements)

    @torch.no_grad()
    def _before_step(self) -> None:
        state = self.optimizer.state
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                piece = self.slices[param]
                start, end, _ = self._rows(param)
                piece.grad = None if param.grad is None else self._local(param.grad)[start:end].clone()
                if param in state:  # resting DTensor state -> local tensors keyed by the slice
                    state[piece] = {k: self._local(v) for k, v in state.pop(param).items()}
            group["params"] = [self.slices[p] for p in group["params"]]

    @torch.no_grad()
    def _after_step(self) -> None:
        state = self.optimizer.state
        model_param = {id(piece): param for param, piece in self.slices.items()}
        for group in self.optimizer.param_groups:
            group["params"] = [model_param[id(piece)] for piece in group["params"]]
            for param in group["params"]:
                piece = self.slices[param]
                self._gather_into(param, piece)
                piece.grad = None
                if piece in state:
                    state[param] = {k: self._as_dtensor(param, v) for k, v in state.pop(piece).items()}

    def _as_dtensor(self, param: torch.Tensor, value):
        if not torch.is_tensor(value) or value.dim() == 0 or not isinstance(param, DTensor):
            return value  # Adam's step counter, or a plain parameter (no mesh to describe it)
        return DTensor.from_local(value, param.device_mesh, self._state_placements(param), run_check=False,
                                  shape=param.shape, stride=param.stride())

    def _gather_into(self, param: torch.Tensor, piece: torch.Tensor) -> None:
        local = self._local(param.data)
        start, end, chunk = self._rows(param)
        row = local[0].numel() if local.dim() else 1
        padded = torch.zeros(chunk * row, dtype=local.dtype, device=local.device)
        padded[: (end - start) * row] = piece.data.reshape(-1)
        gathered = torch.empty(chunk * row * self.world, dtype=local.dtype, device=local.device)
        dist.all_gather_into_tensor(gathered, padded, group=self.group)
        local.copy_(gathered[: local.numel()].view_as(local))


def shard_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module,
                          dims: ParallelDims) -> torch.optim.Optimizer:
    """ZeRO-1: call right after building the optimizer. A no-op unless zero=1 and dp > 1."""
    if dims.zero == 1 and dims.dp_enabled and dims.engine == "native":
        optimizer._zero_one = ZeroOneOptimizerState(optimizer, model, dims)  # keeps the hooks' owner alive
    return optimizer
