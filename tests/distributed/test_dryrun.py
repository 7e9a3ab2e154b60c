"""The dry run: one rank's shard of a table model under a fake process group, its per-rank memory
measured from the DTensor shards against the ZeRO paper's formulas (within 2%)."""

import subprocess
import sys

import pytest

from scaletrain.configs.schema import DryRunConfig, OptimConfig, ParallelConfig, TrainConfig
from scaletrain.models.registry import load_model_config
from scaletrain.parallel.dryrun import dry_run_report, zero_formula


def dry_run(model: str, tp: int, dp: int, zero: int, precision: str = "bf16", rank: int = 5):
    cfg = TrainConfig(model=load_model_config(model), parallel=ParallelConfig(tp=tp, dp_shard=dp, zero=zero),
                      optim=OptimConfig(name="adamw"), precision=precision,
                      dry_run=DryRunConfig(world_size=tp * dp, rank=rank))
    return dry_run_report(cfg)


def assert_within_2_percent(measured, formula):
    for part in ("params", "grads", "optimizer", "total"):
        m, f = getattr(measured, part), getattr(formula, part)
        assert abs(m / f - 1) < 0.02, f"{part}: measured {m:.4g} vs formula {f:.4g}"


@pytest.mark.parametrize("model, tp, dp, zeros", [
    ("gpt3_175b", 8, 128, (1, 3)),
    ("megatron_8_3b", 8, 64, (0, 1, 2, 3)),
    ("bert_large", 1, 16, (0, 1, 2, 3)),
])
def test_dry_run_matches_zero_formulas(model, tp, dp, zeros):
    for zero in zeros:
        measured, formula, text = dry_run(model, tp, dp, zero)
        assert_within_2_percent(measured, formula)
        assert f"zero={zero}" in text and "ratio" in text


def test_stage_3_is_16_psi_over_nd_for_mixed_precision_adam():
    measured, formula, _ = dry_run("gpt3_175b", 8, 128, 3)
    psi = 174.6e9
    assert formula.total == pytest.approx(16 * psi / (8 * 128), rel=1e-3)
    assert measured.total / 2**30 == pytest.approx(2.54, abs=0.01)  # GiB per rank


def test_formulas_follow_the_paper():
    # ZeRO paper, Fig. 1: Psi = 7.5B, N_d = 64, K = 12 -> 120 GB, 31.4 GB, 16.6 GB, 1.9 GB
    totals = [zero_formula(7.5e9, zero, 64, 1, (2, 2, 12)).total / 1e9 for zero in range(4)]
    assert totals == pytest.approx([120, 31.4, 16.6, 1.875], abs=0.05)


def test_cli_dry_run_of_gpt3_at_1024_ranks(tmp_path):
    command = [sys.executable, "-m", "scaletrain.cli", "train", "model=gpt3_175b", "parallel.tp=8",
               "parallel.dp_shard=128", "parallel.zero=3", "precision=bf16", "dry_run.world_size=1024",
               "dry_run.rank=5", f"hydra.run.dir={tmp_path}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "rank 5 of 1024" in done.stdout and "{'dp_shard': 0, 'tp': 5}" in done.stdout
    total = next(line for line in done.stdout.splitlines() if line.strip().startswith("model states"))
    assert float(total.split()[-1]) == pytest.approx(1.0, abs=0.02)
