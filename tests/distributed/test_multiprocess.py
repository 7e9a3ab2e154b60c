import pytest
import torch
import torch.distributed as dist

from scaletrain.parallel.multiprocess import run_on_ranks


def _all_reduce_rank(rank, world_size):
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    return value.item(), torch.get_num_threads()


def _fail_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("boom on rank one")
    return rank


def test_all_reduce_over_gloo_ranks():
    results = run_on_ranks(_all_reduce_rank, 4)
    assert [total for total, _ in results] == [10.0] * 4
    assert all(threads == 1 for _, threads in results)


def test_failure_carries_the_rank_traceback():
    with pytest.raises(RuntimeError, match="boom on rank one"):
        run_on_ranks(_fail_on_rank_one, 2, timeout=60)
