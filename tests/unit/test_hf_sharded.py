"""to_hf_state_dict on an FSDP2-sharded model (DTensor parameters, two gloo ranks) gathers the full tensors:
every rank gets the state dict of the same model built in one process."""

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from scaletrain.models.blocks import Block
from scaletrain.models.hf import to_hf_state_dict
from scaletrain.models.registry import build_model, load_model_config
from scaletrain.parallel.multiprocess import run_on_ranks


def _export_differences(name, mesh):
    """(keys only one export has, keys whose tensors differ or are not plain tensors)."""
    cfg = load_model_config(name)
    reference = build_model(cfg, device="meta")
    reference.to_empty(device="cpu")
    reference.init_weights(5)
    expected = to_hf_state_dict(reference)

    sharded = build_model(cfg, device="meta")
    for block in [m for m in sharded.modules() if isinstance(m, Block)]:
        fully_shard(block, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    sharded.to_empty(device="cpu")
    sharded.init_weights(5)
    assert all(hasattr(p, "full_tensor") for p in sharded.parameters())  # every parameter is a DTensor
    exported = to_hf_state_dict(sharded)
    mismatched = [key for key in expected if type(exported.get(key)) is not torch.Tensor
                  or not torch.equal(exported[key], expected[key])]
    return sorted(set(exported) ^ set(expected)), mismatched


def _sharded_exports(rank, world_size, names):
    mesh = init_device_mesh("cpu", (world_size,))
    return [_export_differences(name, mesh) for name in names]


def test_export_of_an_fsdp_sharded_model_equals_the_single_process_export():
    names = ["gpt_tiny", "t5_v1_1_tiny"]  # tied head; untied head, gated MLP, two stacks
    for per_model in run_on_ranks(_sharded_exports, 2, names, timeout=240):
        assert per_model == [([], [])] * len(names)
