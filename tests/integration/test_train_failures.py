"""fp16 loss scaling, NaN/Inf skipping and the divergence stop, on the real trainer in this process."""

import math

import pytest
import torch

from scaletrain.checkpoint.manager import verify
from scaletrain.train.trainer import TrainingDiverged
from train_utils import make_trainer, model_params, tiny_overrides


def test_fp16_dynamic_loss_scale(tmp_path):
    # 2^40 overflows fp16 gradients for sure; every overflow halves it until the gradients fit.
    trainer = make_trainer(tmp_path, tiny_overrides("gpt", "precision=fp16", "trainer.max_steps=40",
                                                    "trainer.loss_scale_init=1099511627776",
                                                    "trainer.loss_scale_growth_interval=2"))
    history = []
    for _ in range(24):
        before, scale = model_params(trainer), trainer.scaler.scale
        trainer.train_step(next(trainer.loader))
        changed = any(not torch.equal(p, before[n]) for n, p in model_params(trainer).items())
        history.append((scale, trainer.scaler.scale, changed))
    overflows = [h for h in history if h[1] < h[0]]
    assert overflows and history[0][1] == 2.0**39 and not history[0][2]
    for scale_before, scale_after, changed in history:
        if scale_after < scale_before:  # an overflow: halved, no update
            assert scale_after == scale_before / 2 and not changed
        else:
            assert changed and scale_after in (scale_before, scale_before * 2)
    growths = sum(1 for h in history if h[1] > h[0])
    clean = len(history) - len(overflows)
    assert growths >= 1 and trainer.state.skipped_steps == len(overflows)
    assert all(math.isfinite(loss) for loss in trainer.losses)
    assert clean > growths  # growth needs growth_interval=2 clean steps in a row


def _poison(trainer, bad_steps):
    """The trainer's loss_fn returns NaN on the given (0-based) steps."""
    loss_fn = trainer.loss_fn

    def poisoned(outputs, batch, kernels_choice="auto"):
        loss, count = loss_fn(outputs, batch, kernels_choice)
        return (loss * float("nan"), count) if trainer.state.step in bad_steps else (loss, count)

    trainer.loss_fn = poisoned


def test_nan_loss_skips_the_update(tmp_path):
    trainer = make_trainer(tmp_path, tiny_overrides("gpt", "trainer.max_steps=6"))
    _poison(trainer, {2, 3})
    snapshots = []
    original = trainer.train_step

    def recording_step(micro_batches):
        metrics = original(micro_batches)
        snapshots.append(model_params(trainer))
        return metrics

    trainer.train_step = recording_step
    assert trainer.train() == 0
    assert [math.isnan(x) for x in trainer.losses] == [False, False, True, True, False, False]
    assert trainer.state.skipped_steps == 2 and trainer.state.nonfinite_streak == 0
    for step in (2, 3):  # the skipped steps left every parameter untouched
        assert all(torch.equal(snapshots[step][n], snapshots[1][n]) for n in snapshots[1])
    assert not all(torch.equal(snapshots[4][n], snapshots[3][n]) for n in snapshots[3])


def test_consecutive_nans_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path, tiny_overrides("gpt", "trainer.max_steps=20", "checkpoint.every=2",
                                                    "trainer.max_nonfinite_steps=3"))
    _poison(trainer, set(range(3, 100)))
    with pytest.raises(TrainingDiverged, match=r"NaN/Inf for 3 consecutive steps .*step-000002 is intact"):
        trainer.train()
    checkpoints = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert checkpoints == ["step-000002"] and verify(tmp_path / "checkpoints" / "step-000002") is None
