"""Activation memory measured on CPU, the reference the analytic formulas in memory.py are checked against.

A dispatch mode remembers every op's output; after forward, the storages still alive (less the parameters')
are exactly what autograd and the checkpoint frames keep for backward. One layer's share is
(kept by an L+2-layer model - kept by an L-layer model) / 2, which cancels embeddings and logits.
DTensor outputs are measured by their local shard, so the same works per rank under tensor parallelism."""

from __future__ import annotations

import dataclasses
import gc
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from scaletrain.configs.schema import ModelConfig


def _local(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor._local_tensor if isinstance(tensor, DTensor) else tensor


class LiveOutputs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.refs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.refs += [weakref.ref(_local(t)) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        return out

    def live_bytes(self, exclude: set) -> int:
        storages = {}
        for ref in self.refs:
            tensor = ref()
            if tensor is not None:
                storage = tensor.untyped_storage()
                if storage.data_ptr() not in exclude:
                    storages[storage.data_ptr()] = storage.nbytes()
        return sum(storages.values())


def kept_bytes(model: torch.nn.Module, batch: dict) -> int:
    """Bytes the forward of `model` on `batch` leaves alive for backward."""
    exclude = {_local(p).untyped_storage().data_ptr() for p in model.parameters()}
    with LiveOutputs() as tracker:
        outputs = model(**batch)
    gc.collect()  # garbage in reference cycles (DTensor / autograd internals) is not kept for backward
    kept = tracker.live_bytes(exclude)
    del outputs
    return kept


def _build(cfg: ModelConfig, layers: int, recompute: str, tp_mesh=None, sequence_parallel: bool = False):
    from scaletrain.models.registry import build_model
    from scaletrain.parallel.checkpointing import apply_activation_checkpointing

    cfg = dataclasses.replace(cfg, n_layers=layers)
    model = build_model(cfg, "meta")
    if tp_mesh is not None:
        from scaletrain.parallel.tensor import apply_tensor_parallel

        apply_tensor_parallel(model, tp_mesh, sequence_parallel)
    apply_activation_checkpointing(model, recompute)
    model.to_empty(device="cpu")
    model.init_weights(0)
    return model.train()


def layer_bytes(cfg: ModelConfig, recompute: str, batch: int, seq: int, tp_mesh=None,
                sequence_parallel: bool = False) -> float:
    """Measured activation bytes of one GPT layer (this rank's share under TP)."""
    torch.manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    kept = [kept_bytes(_build(cfg, layers, recompute, tp_mesh, sequence_parallel), {"input_ids": ids})
            for layers in (4, 2)]
    return (kept[0] - kept[1]) / 2


def layer_bytes_on_rank(rank: int, world_size: int, cfg: ModelConfig, recompute: str, batch: int, seq: int,
                        sequence_parallel: bool) -> float:
    """run_on_ranks target: the same measurement with the model tensor-parallel over all ranks."""
    from torch.distributed.device_mesh import init_device_mesh

    from scaletrain.parallel.tensor import padded_model_config

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    return layer_bytes(padded_model_config(cfg, world_size), recompute, batch, seq, mesh, sequence_parallel)
