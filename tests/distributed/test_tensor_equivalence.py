"""Tensor parallel (with and without sequence parallel) and 2-D dp x tp against a single process, for the
decoder, the encoder and both encoder-decoders (T5: relative bias sharded by heads; BART: learned
positions, final_logits_bias), on 3 SGD steps of float64 parameters."""

import pytest

from scaletrain.models.registry import load_model_config
from scaletrain.parallel.equivalence import run_layouts_on_rank
from scaletrain.parallel.multiprocess import run_on_ranks

from test_zero_equivalence import assert_equivalent, reference

MODELS = {"gpt": "gpt_tiny", "bert": "bert_tiny", "t5": "t5_tiny", "bart": "bart_tiny", "xlnet": "xlnet_tiny"}


@pytest.mark.parametrize("family", list(MODELS))
def test_tp2_with_and_without_sequence_parallel(family):
    cfg = load_model_config(MODELS[family])
    layouts = ["tp2"] + (["tp2_sp"] if family != "xlnet" else [])  # XLNet: no sequence parallel
    results = run_on_ranks(run_layouts_on_rank, 2, [(cfg, layout) for layout in layouts], {})[0]
    for layout in layouts:
        assert_equivalent(results[(cfg.name, layout)], reference(cfg.name), f"{family} {layout}")


@pytest.mark.parametrize("family", list(MODELS))
def test_tp4_and_dp2_x_tp2(family):
    cfg = load_model_config(MODELS[family])
    layouts = ["tp4", "dp2_tp2"] + (["dp2_tp2_sp_zero1"] if family == "gpt" else [])
    results = run_on_ranks(run_layouts_on_rank, 4, [(cfg, layout) for layout in layouts], {})[0]
    for layout in layouts:
        assert_equivalent(results[(cfg.name, layout)], reference(cfg.name), f"{family} {layout}")


def _vocab_parallel_loss_cases(rank, world_size):
    import torch
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from scaletrain.parallel.loss import vocab_parallel_loss

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    results = []
    for vocab in (16, 10, 2):  # even, uneven (3, 3, 3, 1) and empty shards (1, 1, 0, 0)
        for reduction in ("sum", "mean", "none"):
            g = torch.Generator().manual_seed(vocab)
            full = torch.randn(6, vocab, generator=g, dtype=torch.float64)
            target = torch.randint(0, vocab, (6,), generator=g)
            target[1] = -100
            expected_logits = full.clone().requires_grad_()
            expected = F.cross_entropy(expected_logits, target, ignore_index=-100, reduction=reduction)
            expected.sum().backward()
            sharded = distribute_tensor(full, mesh, [Shard(1)]).requires_grad_()
            with vocab_parallel_loss():
                loss = F.cross_entropy(sharded, target, ignore_index=-100, reduction=reduction)
            loss.sum().backward()
            results.append((type(loss) is torch.Tensor, torch.allclose(loss, expected),
                            torch.allclose(sharded.grad.full_tensor(), expected_logits.grad)))
    return results


def test_vocab_parallel_cross_entropy_matches_the_full_one():
    for rank_results in run_on_ranks(_vocab_parallel_loss_cases, 4):
        assert rank_results and all(all(checks) for checks in rank_results), rank_results
