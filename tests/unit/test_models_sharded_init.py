"""init_weights on sharded (DTensor) parameters gives the single-process values: FSDP2 on two gloo ranks, and
write_full_ on uneven Shard placements. Two CPU processes; the model code itself stays distributed-free."""

import torch

from scaletrain.models.init import write_full_
from scaletrain.parallel.multiprocess import run_on_ranks


def _fsdp_init_matches_single_process(rank, world_size, name):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    from scaletrain.models.registry import build_model, load_model_config

    cfg = load_model_config(name)
    reference = build_model(cfg, device="meta")
    reference.to_empty(device="cpu")
    reference.init_weights(11)
    mesh = init_device_mesh("cpu", (world_size,))
    sharded = build_model(cfg, device="meta")
    for layer in sharded.layers.values():
        fully_shard(layer, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    sharded.to_empty(device="cpu")
    sharded.init_weights(11)
    mismatched = [n for n, p in sharded.named_parameters()
                  if not torch.equal(p.full_tensor(), reference.get_parameter(n))]
    local_sizes = [p.to_local().numel() for p in sharded.parameters()]

    full = torch.arange(35.0).reshape(5, 7)  # uneven over two ranks in both dims
    uneven = [distribute_tensor(torch.zeros(5, 7), mesh, [Shard(dim)]) for dim in (0, 1)]
    for tensor in uneven:
        write_full_(tensor, full)
    return mismatched, sum(local_sizes), [torch.equal(t.full_tensor(), full) for t in uneven]


def test_fsdp_sharded_init_equals_single_process_init():
    results = run_on_ranks(_fsdp_init_matches_single_process, 2, "gpt_tiny", timeout=240)
    total = 35_712  # gpt_tiny's parameter count
    for mismatched, local, uneven_ok in results:
        assert mismatched == []
        assert local < total  # each rank really holds a shard
        assert uneven_ok == [True, True]
