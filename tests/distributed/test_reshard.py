"""Checkpoint resharding with DCP on the model + optimizer state dicts (get/set_state_dict): save at
dp2 x tp2, load at dp4, tp4 and in a single process. Parameters and SGD momentum buffers come back equal,
and training continues to the losses of a single-process run that never stopped."""

import pytest
import torch

from scaletrain.models.registry import load_model_config
from scaletrain.parallel.equivalence import LayoutRun
from scaletrain.parallel.multiprocess import run_on_ranks

SAVE_AT, TOTAL = 2, 4  # steps before the checkpoint, steps in all


def _save(rank, world_size, model_cfg, layout, path):
    run = LayoutRun(model_cfg, layout, world_size)
    for step in range(SAVE_AT):
        run.step(step)
    run.save(path)
    saved = (run.full_params(), run.full_optimizer_state())
    return saved if rank == 0 else None


def _load_and_continue(rank, world_size, model_cfg, layouts_and_paths):
    results = {}
    for layout, path in layouts_and_paths:
        run = LayoutRun(model_cfg, layout, world_size)
        run.load(path)
        loaded = (run.full_params(), run.full_optimizer_state())
        losses = [run.step(step)[0] for step in range(SAVE_AT, TOTAL)]
        results[layout] = (loaded, losses)
    return results if rank == 0 else None


def assert_same_state(actual, expected, what):
    params, optim = actual
    expected_params, expected_optim = expected
    assert params.keys() == expected_params.keys()
    for name, value in expected_params.items():
        torch.testing.assert_close(params[name], value, rtol=0, atol=0, msg=f"{what}: {name}")
    assert optim.keys() == expected_optim.keys() and expected_optim
    for name, states in expected_optim.items():
        for key, value in states.items():
            torch.testing.assert_close(optim[name][key], value, rtol=0, atol=0, msg=f"{what}: {name}.{key}")


@pytest.mark.parametrize("model_name, save_layout", [("gpt_tiny", "dp2_tp2"), ("t5_tiny", "dp2_tp2_sp_zero1")])
def test_save_at_dp2_tp2_and_resume_at_dp4_tp4_and_one_process(tmp_path, model_name, save_layout):
    cfg = load_model_config(model_name)
    never_stopped = LayoutRun(cfg, "single", 1)
    expected_losses = [never_stopped.step(step)[0] for step in range(TOTAL)][SAVE_AT:]

    path = str(tmp_path / "step-2")
    saved = run_on_ranks(_save, 4, cfg, save_layout, path)[0]
    momentum = next(iter(saved[1].values()))["momentum_buffer"]
    assert momentum.abs().sum() > 0  # two steps in, the optimizer state is not trivially zero

    resumed = run_on_ranks(_load_and_continue, 4, cfg, [("dp4_zero3", path), ("tp4", path)])[0]
    single = LayoutRun(cfg, "single", 1)
    single.load(path)
    resumed["single"] = ((single.full_params(), single.full_optimizer_state()),
                         [single.step(step)[0] for step in range(SAVE_AT, TOTAL)])
    for layout, (loaded, losses) in resumed.items():
        assert_same_state(loaded, saved, f"{save_layout} -> {layout}")
        assert losses == pytest.approx(expected_losses, rel=1e-5), layout
