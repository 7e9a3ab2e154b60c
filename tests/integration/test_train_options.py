"""Trainer options against plain reference runs: activation checkpointing, bf16, max_tokens, async saves."""

import pytest
import torch

from train_utils import make_trainer, model_params, tiny_overrides


def _run(run_dir, *extra):
    trainer = make_trainer(run_dir, tiny_overrides("gpt", "trainer.max_steps=3", "model.dropout=0.1", *extra))
    assert trainer.train() == 0
    return trainer


def test_activation_checkpointing_leaves_losses_and_params_bitwise_unchanged(tmp_path):
    plain = _run(tmp_path / "none")
    for mode in ("full", "selective"):
        checkpointed = _run(tmp_path / mode, f"trainer.activation_checkpointing={mode}")
        assert checkpointed.losses == plain.losses
        for name, value in model_params(plain).items():
            assert torch.equal(model_params(checkpointed)[name], value), (mode, name)


def test_bf16_autocast_tracks_fp32_with_fp32_master_weights(tmp_path):
    fp32 = _run(tmp_path / "fp32")
    bf16 = _run(tmp_path / "bf16", "precision=bf16")
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())
    assert bf16.losses == pytest.approx(fp32.losses, abs=0.05) and bf16.losses != fp32.losses


def test_max_tokens_stops_at_the_first_step_past_the_budget(tmp_path):
    trainer = make_trainer(tmp_path, tiny_overrides("gpt", "trainer.max_steps=0", "trainer.max_tokens=300"))
    trainer.train()  # 128 tokens per step: the budget of 300 needs 3 steps
    assert trainer.state.step == 3 and trainer.state.tokens == 384


def test_async_checkpoints_resume_exactly(tmp_path):
    straight = _run(tmp_path / "straight")
    first = _run(tmp_path / "async", "checkpoint.async_save=true", "checkpoint.every=1", "trainer.max_steps=2")
    assert sorted(p.name for p in (tmp_path / "async" / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    resumed = make_trainer(tmp_path / "async", tiny_overrides("gpt", "trainer.max_steps=3", "model.dropout=0.1",
                                                              "checkpoint.async_save=true"))
    assert resumed.resumed_from.name == "step-000002"
    resumed.train()
    assert first.losses + resumed.losses == straight.losses
