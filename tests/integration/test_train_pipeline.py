"""Pipeline parallelism through the real trainer: pp2 (1F1B, and the V-shaped ZBV / DualPipeV with their
forward-only validation) and a 3D pp2 x tp2 x dp2 run through the CLI train to the losses, gradient norms
and parameters of the same run in one process, for every family (XLNet: both streams between stages)."""

import json

import pytest
import torch

from scaletrain.parallel.multiprocess import run_on_ranks
from train_utils import full_params, make_trainer, model_params, run_cli, tiny_overrides

# SGD: no per-element state, so the layouts agree to fp32 rounding (AdamW would amplify it).
EXTRA = ["trainer.max_steps=3", "trainer.micro_batch=1", "optim=sgd", "optim.lr=0.05", "trainer.eval_every=3",
         "trainer.eval_batches=4"]


def _train_on_rank(rank, world_size, run_dir, overrides):
    trainer = make_trainer(run_dir, overrides)
    trainer.train()
    return trainer.losses, trainer.last_record["grad_norm"], trainer.last_eval["val_loss"], full_params(trainer)


@pytest.mark.parametrize("family, schedule", [("gpt", "1f1b"), ("bert", "1f1b"), ("encdec", "1f1b"), ("xlnet", "1f1b"),
                                              ("gpt", "dualpipev"), ("encdec", "zbv"), ("xlnet", "zbv")])
def test_two_pipeline_stages_match_one_process(tmp_path, family, schedule):
    # ZBV / DualPipeV: 4 stages on 2 ranks (stages 0 and 3 on rank 0), and a forward-only validation
    v_shaped = schedule != "1f1b"
    four_layers = v_shaped and family in ("gpt", "xlnet")
    overrides = tiny_overrides(family, *EXTRA, *(["model.n_layers=4"] if four_layers else []))
    single = make_trainer(tmp_path / "single", overrides)
    single.train()
    reference = model_params(single)
    layout = ["parallel.pp=2", "parallel.dp_shard=1", f"parallel.pp_schedule={schedule}"]
    layout += ["parallel.pp_virtual=2"] if v_shaped else []
    results = run_on_ranks(_train_on_rank, 2, tmp_path / "pp", overrides + layout)
    names = set()
    for losses, grad_norm, val_loss, params in results:  # the loss is reported on every rank
        assert losses == pytest.approx(single.losses, rel=1e-5, abs=1e-6)
        assert grad_norm == pytest.approx(single.last_record["grad_norm"], rel=1e-5)  # tied embedding once
        assert val_loss == pytest.approx(single.last_eval["val_loss"], rel=1e-5)
        for name, value in params.items():  # each stage's parameters keep the full model's names
            # the last stage's own copy of a tied embedding (lm_head / mlm decoder) equals the first stage's
            expected = reference[name] if name in reference else reference["tok_embeddings.weight"]
            torch.testing.assert_close(value, expected, rtol=1e-4, atol=1e-6)
        names |= set(params) & set(reference)
    assert names == set(reference)


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line and '"val_loss"' not in line]


@pytest.mark.parametrize("family", ["gpt", "bert", "encdec", "xlnet"])
def test_3d_parallel_run_through_the_cli_matches_one_process(tmp_path, family):
    overrides = tiny_overrides(family, *EXTRA, "trainer.global_batch=8", "trainer.eval_every=0")
    single = run_cli(tmp_path / "single", overrides)
    assert single.returncode == 0, single.stderr[-2000:]
    layout = ["launcher.nproc_per_node=8", "parallel.pp=2", "parallel.tp=2", "parallel.dp_shard=2", "parallel.zero=3"]
    three_d = run_cli(tmp_path / "3d", overrides + layout, timeout=600)
    assert three_d.returncode == 0, three_d.stderr[-3000:]
    assert len(_losses(tmp_path / "single")) == 3
    assert _losses(tmp_path / "3d") == pytest.approx(_losses(tmp_path / "single"), rel=1e-5, abs=1e-6)
