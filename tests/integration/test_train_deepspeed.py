"""parallel.engine=deepspeed through the trainer on 2 (and 4) gloo ranks: for each family, DeepSpeed ZeRO 1/2/3 give
the losses and final weights of the native engine at the same ZeRO stage (fp32, the same init and data,
gradient accumulation 2 and clipping from our config), within the native layout tests' tolerance."""

import pytest
import torch

from scaletrain.parallel.multiprocess import run_on_ranks
from train_utils import make_trainer, tiny_overrides, trained_weights

# SGD with momentum: per-parameter state, exact enough for 1e-5 parity; grad_clip low enough to clip.
EXTRA = ["trainer.max_steps=3", "trainer.micro_batch=1", "optim=sgd", "optim.lr=0.05", "optim.momentum=0.9",
         "trainer.grad_clip=0.5", "checkpoint.save_final=false", "parallel.dp_shard=2"]


def _both_engines(rank, world_size, tmp_path, family, zeros):
    results = {}
    for zero in zeros:
        for engine in ("native", "deepspeed"):
            trainer = make_trainer(tmp_path / f"{engine}-{zero}", tiny_overrides(
                family, *EXTRA, f"parallel.zero={zero}", f"parallel.engine={engine}"))
            assert trainer.loader.accumulation_steps == 2
            assert (type(trainer.optimizer).__name__ == "DeepSpeedEngine") == (engine == "deepspeed")
            trainer.train()
            results[engine, zero] = trainer.losses, trained_weights(trainer), trainer.last_record["grad_norm"]
    return results


@pytest.mark.parametrize("family", ["gpt", "bert", "encdec"])
def test_deepspeed_zero_stages_match_the_native_engine(tmp_path, family):
    zeros = (1, 2, 3)
    for results in run_on_ranks(_both_engines, 2, tmp_path, family, zeros):
        for zero in zeros:
            native_losses, native_weights, native_norm = results["native", zero]
            losses, weights, norm = results["deepspeed", zero]
            assert norm == pytest.approx(native_norm, rel=1e-5) and norm > 0.5  # the last step was clipped
            assert losses == pytest.approx(native_losses, rel=1e-5, abs=1e-6), zero
            assert set(weights) == set(native_weights)
            for name, value in native_weights.items():
                torch.testing.assert_close(weights[name], value, rtol=1e-4, atol=1e-5, msg=f"zero {zero}: {name}")


@pytest.mark.parametrize("family", ["gpt", "bert", "encdec"])
def test_four_ranks_match_the_native_engine(tmp_path, family):
    """4 ranks: other shards, and no accumulation (global_batch 4 = micro_batch 1 x 4)."""
    for results in run_on_ranks(_four_ranks, 4, tmp_path, family):
        for zero in (1, 2, 3):
            (native_losses, native_weights), (losses, weights) = results["native", zero], results["deepspeed", zero]
            assert losses == pytest.approx(native_losses, rel=1e-5, abs=1e-6), zero
            for name, value in native_weights.items():
                torch.testing.assert_close(weights[name], value, rtol=1e-4, atol=1e-5, msg=f"zero {zero}: {name}")


def _four_ranks(rank, world_size, tmp_path, family):
    results = {}
    for zero in (1, 2, 3):
        for engine in ("native", "deepspeed"):
            overrides = [o for o in EXTRA if o != "parallel.dp_shard=2"] + ["parallel.dp_shard=4"]
            trainer = make_trainer(tmp_path / f"{engine}-{zero}", tiny_overrides(
                family, *overrides, f"parallel.zero={zero}", f"parallel.engine={engine}"))
            trainer.train()
            results[engine, zero] = trainer.losses, trained_weights(trainer)
    return results
