"""Checkpoints of parallel.engine=deepspeed are the layout-free ones of the native engine (DCP keys
model.<fqn>, optim.state.<fqn>.<name>, optim.param_groups.<fqn>.<option>): a run stopped under DeepSpeed
resumes under the native engine at another layout (tp2, one process) and under DeepSpeed at another ZeRO
stage, and a native run resumes under DeepSpeed, each continuing to the losses and weights of a run that
never stopped."""

import pytest
import torch

from scaletrain.parallel.multiprocess import run_on_ranks
from train_utils import full_params, make_trainer, resumed_run, stopped_run, tiny_overrides

STOP_AT, TOTAL = 2, 4
EXTRA = [f"trainer.max_steps={TOTAL}", "trainer.micro_batch=1", "optim=sgd", "optim.lr=0.05", "optim.momentum=0.9"]
LAYOUTS = {
    "ds_zero1": ["parallel.engine=deepspeed", "parallel.zero=1", "parallel.dp_shard=2"],
    "ds_zero2": ["parallel.engine=deepspeed", "parallel.zero=2", "parallel.dp_shard=2"],
    "ds_zero3": ["parallel.engine=deepspeed", "parallel.zero=3", "parallel.dp_shard=2"],
    "tp2": ["parallel.tp=2", "parallel.dp_shard=1"],
    "single": [],
}


def _stopped_run(run_dir, overrides):
    return stopped_run(run_dir, overrides, STOP_AT)


def _resumed_run(run_dir, overrides, checkpoint):
    return resumed_run(run_dir, overrides, checkpoint, STOP_AT)


def _on_ranks(rank, world_size, tmp_path, family, stops, resumes):
    base = tiny_overrides(family, *EXTRA)
    saved = {name: _stopped_run(tmp_path / f"{name}-stopped", base + LAYOUTS[name]) for name in stops}
    resumed = {f"{source}->{name}": _resumed_run(tmp_path / f"{source}-to-{name}", base + LAYOUTS[name], path)
               for name, source, path in resumes}
    return saved, resumed


@pytest.mark.parametrize("family", ["gpt", "bert", "encdec"])
def test_deepspeed_checkpoints_resume_natively_at_other_layouts_and_back(tmp_path, family):
    base = tiny_overrides(family, *EXTRA)
    straight = make_trainer(tmp_path / "straight", base)
    straight.train()
    expected = full_params(straight)
    single_stop = _stopped_run(tmp_path / "single-stopped", base)

    saved, resumed = run_on_ranks(_on_ranks, 2, tmp_path, family, ["ds_zero3", "ds_zero1"],
                                  [("ds_zero3", "single", single_stop)])[0]
    later = [("tp2", "ds_zero3", saved["ds_zero3"]), ("ds_zero2", "ds_zero1", saved["ds_zero1"]),
             ("ds_zero1", "ds_zero3", saved["ds_zero3"])]
    resumed.update(run_on_ranks(_on_ranks, 2, tmp_path, family, [], later)[0][1])
    resumed["ds_zero3->single"] = _resumed_run(tmp_path / "ds-to-single", base, saved["ds_zero3"])

    assert len(resumed) == 5
    for what, (losses, params) in resumed.items():
        assert losses == pytest.approx(straight.losses[STOP_AT:], rel=1e-5, abs=1e-6), what
        assert set(params) == set(expected), what
        for name, value in expected.items():
            torch.testing.assert_close(params[name], value, rtol=1e-4, atol=1e-6, msg=f"{what}: {name}")
