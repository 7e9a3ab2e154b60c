"""Hydra multirun: one folder per job and a summary.csv of final metrics, with the basic launcher and
with submitit's (the summary reads every job's files from its folder, not in-process return values)."""

import csv
import json
import subprocess
import sys

import pytest

from scaletrain.cli import main
from scaletrain.scaling.score_fit import ScorePoint, fit_score_law
from train_utils import cli_env, tiny_overrides


def _sweep(tmp_path, *extra, swept=("optim.lr=1e-3,3e-3", "trainer.max_steps=2")):
    keys = tuple(s.partition("=")[0] for s in swept)
    overrides = [o for o in tiny_overrides("gpt") if not o.startswith(keys)]
    command = [sys.executable, "-m", "scaletrain.cli", "train", "-m", *overrides, *swept,
               f"hydra.sweep.dir={tmp_path}", *extra]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=cli_env())
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "summary.csv") as handle:
        return list(csv.DictReader(handle))


def _check(rows, seeds):
    assert len(rows) == 2 * len(seeds) and all(row["status"] == "ok" for row in rows)
    assert sorted((row["optim.lr"], row.get("seed", "")) for row in rows) == sorted(
        (lr, seed) for lr in ("0.001", "0.003") for seed in seeds)
    assert all(row["step"] == "2" and float(row["loss"]) > 0 and float(row["tokens"]) == 256 for row in rows)
    assert len({row["loss"] for row in rows}) == len(rows)  # different runs
    # gpt_tiny at vocab 512, per layer: 2 norms (2 x 64) + q,k,v,out (4 x (32^2 + 32)) + fc_in (32 x 128 + 128)
    # + fc_out (128 x 32 + 32); two layers and the final norm (64)
    per_layer = 2 * 64 + 4 * (32 * 32 + 32) + (32 * 128 + 128) + (128 * 32 + 32)
    assert all(int(row["non_embedding_params"]) == 2 * per_layer + 64 for row in rows)
    assert all(int(row["params"]) == 2 * per_layer + 64 + 512 * 32 + 64 * 32 for row in rows)  # + tokens, positions
    assert all((row["job"] + "/.hydra").count("/") >= 1 for row in rows)


def test_multirun_writes_a_summary(tmp_path):
    _check(_sweep(tmp_path, "seed=1,2"), ["1", "2"])


def test_multirun_summary_with_the_submitit_launcher(tmp_path):
    _check(_sweep(tmp_path, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                  "hydra.launcher.cpus_per_task=1"), [""])


def test_task_scores_reach_the_summary_and_scaling_fit_fits_them_against_compute(tmp_path):
    task = tmp_path / "colors.jsonl"
    task.write_text("".join(json.dumps({"context": f"the {w} is", "choices": ["red", "a dog", "on the mat"],
                                        "answer": i % 3}) + "\n" for i, w in enumerate(["cat", "sky", "sea", "sun"])))
    rows = _sweep(tmp_path / "sweep", f"trainer.eval_tasks=[{task}]", "trainer.eval_every=2", "optim.warmup_steps=0",
                  swept=("trainer.max_steps=1,2,4",))
    assert len(rows) == 3 and all(row["status"] == "ok" for row in rows)
    points = []
    for row in rows:
        final = json.loads((tmp_path / "sweep" / row["job"] / "final_metrics.json").read_text())
        for metric in ("acc", "acc_norm"):
            assert float(row[f"task/colors/{metric}"]) == final[f"task/colors/{metric}"]
        points.append(ScorePoint(row["job"], 6 * final["params"] * final["tokens"], final["task/colors/acc_norm"]))
    assert sorted(p.compute for p in points) == [6 * int(rows[0]["params"]) * 128 * k for k in (1, 2, 4)]
    assert main(["scaling", "fit", str(tmp_path / "sweep"), "--metric", "task/colors/acc_norm", "--floor",
                 str(1 / 3)]) == 0
    fit = json.loads((tmp_path / "sweep" / "score_fit.task.colors.acc_norm.json").read_text())
    expected = fit_score_law(points, 1 / 3)
    assert fit["law"] == pytest.approx(expected.to_dict())
    assert sorted(r["score"] for r in fit["runs"]) == sorted(p.score for p in points)
