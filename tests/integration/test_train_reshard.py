"""Resharding through the trainer and the checkpoint manager: a run stopped at pp2 x tp2 x dp2 (8 ranks)
resumes at dp4, at tp4 and in one process, and runs stopped at dp4, tp4 and in one process resume at
pp2 x tp2 x dp2. Every resumed run continues to the losses and parameters of a run that never stopped."""

import pytest
import torch

from scaletrain.parallel.multiprocess import run_on_ranks
from train_utils import full_params, make_trainer, resumed_run, stopped_run, tiny_overrides

STOP_AT, TOTAL = 2, 4
# SGD with momentum: a per-parameter state that must reshard too, and exact enough for 1e-5 parity.
EXTRA = [f"trainer.max_steps={TOTAL}", "trainer.micro_batch=1", "optim=sgd", "optim.lr=0.05", "optim.momentum=0.9"]
LAYOUTS = {
    "pp2_tp2_dp2": ["parallel.pp=2", "parallel.tp=2", "parallel.dp_shard=2", "parallel.zero=3"],
    "dp4": ["parallel.dp_shard=4", "parallel.zero=3"],
    "tp4": ["parallel.tp=4", "parallel.dp_shard=1"],
    "single": [],
    # ZBV: rank 0 holds stages 0 and 3, so both copies of the tied table (needs 4 layers)
    "pp2_zbv": ["parallel.pp=2", "parallel.pp_virtual=2", "parallel.pp_schedule=zbv", "parallel.dp_shard=1"],
}


def _stopped_run(run_dir, overrides):
    return stopped_run(run_dir, overrides, STOP_AT)


def _resumed_run(run_dir, overrides, checkpoint):
    return resumed_run(run_dir, overrides, checkpoint, STOP_AT)


def _on_ranks(rank, world_size, tmp_path, family, stops, resumes, extra=()):
    """Each layout in `stops` runs to the stop and saves; each (layout, checkpoint) in `resumes` continues."""
    base = tiny_overrides(family, *EXTRA, *extra)
    saved = {name: _stopped_run(tmp_path / f"{name}-stopped", base + LAYOUTS[name]) for name in stops}
    resumed = {f"{source}->{name}": _resumed_run(tmp_path / f"{source}-to-{name}", base + LAYOUTS[name], path)
               for name, source, path in resumes}
    return saved, resumed


def _merged(per_rank_results):
    """Rank 0's stop checkpoints and losses; parameters merged over the ranks (pipeline stages differ)."""
    saved, resumed = per_rank_results[0]
    for _, others in per_rank_results[1:]:
        for what, (_, params) in others.items():
            resumed[what][1].update(params)
    return saved, resumed


@pytest.mark.parametrize("family", ["gpt", "bert", "encdec"])
def test_3d_checkpoint_resumes_on_other_layouts_and_back(tmp_path, family):
    base = tiny_overrides(family, *EXTRA)
    straight = make_trainer(tmp_path / "straight", base)
    straight.train()
    expected_params = full_params(straight)

    saved, _ = run_on_ranks(_on_ranks, 8, tmp_path, family, ["pp2_tp2_dp2"], [])[0]
    three_d = saved["pp2_tp2_dp2"]
    single_stop = _stopped_run(tmp_path / "single-stopped", base)
    saved, resumed = _merged(run_on_ranks(_on_ranks, 4, tmp_path, family, ["dp4", "tp4"],
                                          [("dp4", "pp2_tp2_dp2", three_d), ("tp4", "pp2_tp2_dp2", three_d)]))
    resumed["pp2_tp2_dp2->single"] = _resumed_run(tmp_path / "3d-to-single", base, three_d)
    back = [("pp2_tp2_dp2", source, path) for source, path in [("single", single_stop), *saved.items()]]
    resumed.update(_merged(run_on_ranks(_on_ranks, 8, tmp_path, family, [], back))[1])

    assert len(resumed) == 6
    for what, (losses, params) in resumed.items():
        assert losses == pytest.approx(straight.losses[STOP_AT:], rel=1e-5, abs=1e-6), what
        assert set(expected_params) <= set(params), what
        for name, value in params.items():  # a pipeline's head copy of the tied table equals the table
            expected = expected_params.get(name, expected_params["tok_embeddings.weight"])
            torch.testing.assert_close(value, expected, rtol=1e-4, atol=1e-6, msg=f"{what}: {name}")


def test_v_schedule_rank_with_both_tied_copies_resumes_from_one_process(tmp_path):
    base = tiny_overrides("gpt", *EXTRA, "model.n_layers=4")
    straight = make_trainer(tmp_path / "straight", base)
    straight.train()
    single_stop = _stopped_run(tmp_path / "single-stopped", base)
    _, resumed = _merged(run_on_ranks(_on_ranks, 2, tmp_path, "gpt", [], [("pp2_zbv", "single", single_stop)],
                                      ["model.n_layers=4"]))
    losses, params = resumed["single->pp2_zbv"]
    assert losses == pytest.approx(straight.losses[STOP_AT:], rel=1e-5, abs=1e-6)
    expected = full_params(straight)
    for name, value in params.items():
        torch.testing.assert_close(value, expected.get(name, expected["tok_embeddings.weight"]), rtol=1e-4,
                                   atol=1e-6, msg=name)
