"""Exact resume: 2N steps in one go == N steps, a stop, and N more from the checkpoint (fp32, CPU)."""

import pytest
import torch

from scaletrain.errors import REQUEUE_EXIT_CODE
from train_utils import make_trainer, model_params, stop_after, tiny_overrides

N = 3


@pytest.mark.parametrize("family", ["gpt", "bert", "encdec"])
def test_stop_and_resume_is_bitwise_identical(tmp_path, family):
    # Dropout on, so the restored RNG state matters too.
    overrides = tiny_overrides(family, f"trainer.max_steps={2 * N}", "model.dropout=0.1")
    straight = make_trainer(tmp_path / "straight", overrides)
    assert straight.train() == 0

    first = make_trainer(tmp_path / "split", overrides)
    stop_after(first, N)
    assert first.train() == REQUEUE_EXIT_CODE and first.state.step == N
    second = make_trainer(tmp_path / "split", overrides)
    assert second.resumed_from.name == f"step-{N:06d}" and second.state.step == N
    assert second.train() == 0

    assert first.losses + second.losses == straight.losses
    expected = model_params(straight)
    for name, value in model_params(second).items():
        assert torch.equal(value, expected[name]), name
    assert second.state.tokens == straight.state.tokens == 2 * N * 4 * 32


def test_same_seed_same_losses_other_seed_differs(tmp_path):
    overrides = tiny_overrides("gpt", "trainer.max_steps=3", "model.dropout=0.1")
    losses = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):  # one after the other: they share the global RNG
        run = make_trainer(tmp_path / name, overrides + [f"seed={seed}"])
        run.train()
        losses.append(run.losses)
    assert losses[0] == losses[1] and losses[0] != losses[2]


def test_accumulation_matches_one_big_micro_batch(tmp_path):
    accumulated = make_trainer(tmp_path / "acc", tiny_overrides("gpt", "trainer.max_steps=3"))
    accumulated.train()
    single = make_trainer(tmp_path / "one", tiny_overrides("gpt", "trainer.max_steps=3", "trainer.micro_batch=4"))
    single.train()
    assert accumulated.losses == pytest.approx(single.losses, rel=1e-6, abs=1e-6)
    for name, value in model_params(single).items():
        torch.testing.assert_close(model_params(accumulated)[name], value, rtol=1e-4, atol=1e-5)
