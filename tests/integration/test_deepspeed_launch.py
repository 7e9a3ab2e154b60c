"""parallel.engine=deepspeed through everything around the step that stays ours, as real processes:
- `scaletrain train ... parallel.engine=deepspeed parallel.zero=2 launcher.nproc_per_node=2` (the local elastic
  launcher) trains with the losses and final weights of the native engine at ZeRO 2 through the same CLI,
  and writes metrics.jsonl / final_metrics.json with MFU;
- SIGUSR1 mid-run: the step finishes, a verified checkpoint is saved, exit 3; the same command again
  resumes and the losses continue exactly as the unstopped DeepSpeed run's;
- a Hydra multirun of two single-process DeepSpeed jobs (and two native ones) writes summary.csv;
- a 2-task Slurm job (the real single-node cluster) under DeepSpeed, sent USR1: it saves, requeues
  itself, resumes and ends with the losses of the local run."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launch_helpers import background_launch, losses, scaletrain_train, submitted_job_id, wait_for_step, wait_until
from slurm_cluster import slurm  # noqa: F401  (module-scoped fixture: starts and stops the daemons)
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from scaletrain.checkpoint.manager import verify

STEPS = 80  # long enough that a signal sent after step 6 lands mid-run
TINY = ["model=gpt_tiny", "model.vocab_size=512", "data.tokenizer_vocab=512", "data.num_workers=0",
        "trainer.seq_len=32", "trainer.global_batch=4", "trainer.micro_batch=1", f"trainer.max_steps={STEPS}",
        "trainer.log_every=1", "trainer.eval_batches=2", "trainer.progress_bar=false", "optim.name=sgd",
        "optim.lr=0.1", "checkpoint.every=40", "parallel.dp_shard=-1", "parallel.zero=2", "seed=7"]
DEEPSPEED = [*TINY, "parallel.engine=deepspeed"]
LOCAL = ["launcher.nproc_per_node=2"]
SLURM = ["launcher=slurm", "launcher.tasks_per_node=2", "launcher.time=00:10:00"]


def trained(args: list[str], run_dir: Path) -> Path:
    result = scaletrain_train([*args, f"hydra.run.dir={run_dir}"])
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    return run_dir


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_parameters(run_dir: Path) -> dict[str, torch.Tensor]:
    """The last checkpoint's model as one plain state dict, whatever engine and layout wrote it."""
    latest = max((run_dir / "checkpoints").glob("step-*"))
    assert latest.name == f"step-{STEPS:06d}", latest
    converted = run_dir.parent / f"{run_dir.name}-final.pt"
    dcp_to_torch_save(latest, converted)
    return torch.load(converted, weights_only=False)["model"]


@pytest.fixture(scope="module")
def native_run(tmp_path_factory) -> Path:
    return trained([*TINY, *LOCAL], tmp_path_factory.mktemp("native") / "run")


@pytest.fixture(scope="module")
def deepspeed_run(tmp_path_factory) -> Path:
    return trained([*DEEPSPEED, *LOCAL], tmp_path_factory.mktemp("deepspeed") / "run")


@pytest.mark.slow
def test_local_launch_trains_like_the_native_engine_and_reports_mfu(native_run, deepspeed_run):
    got, expected = losses(deepspeed_run), losses(native_run)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)
    weights, native_weights = final_parameters(deepspeed_run), final_parameters(native_run)
    assert weights.keys() == native_weights.keys()
    for name, value in native_weights.items():
        torch.testing.assert_close(weights[name], value, rtol=1e-4, atol=1e-5, msg=name)
    manifest = json.loads((deepspeed_run / "checkpoints" / f"step-{STEPS:06d}" / "scaletrain.json").read_text())
    assert manifest["world_size"] == 2
    steps = [r for r in records(deepspeed_run) if "loss" in r]
    assert all(0 < r["mfu"] < 1 and r["tflops"] > 0 and r["tokens_per_s"] > 0 for r in steps)
    final = json.loads((deepspeed_run / "final_metrics.json").read_text())
    assert final["step"] == STEPS and final["loss"] == got[STEPS] and final["mfu"] > 0
    assert final["tokens"] == STEPS * 4 * 32


@pytest.mark.slow
def test_stop_signal_saves_exits_3_and_the_rerun_continues_exactly(deepspeed_run, tmp_path):
    signum = signal.SIGUSR1  # SIGTERM takes the same handler (tests/integration/test_signals.py has both)
    run_dir = tmp_path / "run"
    args = [*DEEPSPEED, *LOCAL, f"hydra.run.dir={run_dir}"]
    with background_launch([sys.executable, "-m", "scaletrain.cli", "train", *args], tmp_path / "launch.log") as launcher:
        wait_until(lambda: (run_dir / "metrics.jsonl").exists() and max(losses(run_dir), default=0) >= 6,
                   launcher, 300, "training never got going")
        launcher.send_signal(signum)  # the elastic agent passes it to both workers
        assert launcher.wait(timeout=120) == 3, (tmp_path / "launch.log").read_text()[-3000:]
    output = (tmp_path / "launch.log").read_text()
    stopped_at = int(output.split(f"stopped by {signum.name} at step ")[1].split(";")[0])
    checkpoint = run_dir / "checkpoints" / f"step-{stopped_at:06d}"
    assert 6 <= stopped_at < STEPS and verify(checkpoint) is None, output[-3000:]
    assert max(losses(run_dir)) == stopped_at  # the step in flight finished, and no other began
    rerun = scaletrain_train(args)  # the same command again: auto-resume from that checkpoint
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr[-3000:]
    assert f"resumed from checkpoints/step-{stopped_at:06d}" in (run_dir / "train.log").read_text()
    assert losses(run_dir) == losses(deepspeed_run)  # exactly
    expected = final_parameters(deepspeed_run)
    for name, value in final_parameters(run_dir).items():
        assert torch.equal(value, expected[name]), name


@pytest.mark.slow
def test_multirun_of_two_deepspeed_jobs_writes_a_summary_and_matches_native_jobs(tmp_path):
    """Four single-process jobs one after the other in one process (Hydra's basic launcher): each learning
    rate under DeepSpeed, then under the native engine (after DeepSpeed's, in the same process)."""
    sweep = tmp_path / "sweep"
    overrides = [o for o in TINY if not o.startswith(("trainer.max_steps=", "optim.lr=", "checkpoint.every="))]
    result = scaletrain_train(["-m", *overrides, "trainer.max_steps=3", "checkpoint.every=0", "optim.lr=0.1,0.05",
                               "parallel.engine=deepspeed,native", f"hydra.sweep.dir={sweep}"])
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    with open(sweep / "summary.csv") as handle:
        rows = {(row["parallel.engine"], row["optim.lr"]): row for row in csv.DictReader(handle)}
    assert sorted(rows) == [(engine, lr) for engine in ("deepspeed", "native") for lr in ("0.05", "0.1")]
    assert all(row["status"] == "ok" and row["step"] == "3" for row in rows.values())
    for row in rows.values():  # each job's own final metrics, read from its folder
        final = json.loads((sweep / row["job"] / "final_metrics.json").read_text())
        assert float(row["loss"]) == final["loss"] and float(row["mfu"]) == final["mfu"] > 0
    for lr in ("0.05", "0.1"):
        assert float(rows["deepspeed", lr]["loss"]) == pytest.approx(float(rows["native", lr]["loss"]), rel=1e-5)
    assert rows["deepspeed", "0.1"]["loss"] != rows["deepspeed", "0.05"]["loss"]


@pytest.mark.slow
def test_usr1_to_a_slurm_deepspeed_job_requeues_it_resumes_and_matches(slurm, deepspeed_run, tmp_path):
    run_dir = tmp_path / "run"
    job_id = submitted_job_id(scaletrain_train([*DEEPSPEED, *SLURM, "launcher.signal_grace_s=30",
                                                f"hydra.run.dir={run_dir}"]))
    wait_for_step(run_dir, 6)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
    info = slurm.wait(job_id, timeout=400)
    log = (run_dir / "slurm" / f"{job_id}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-3000:]
    stopped_at = int(log.split("stopped by SIGUSR1 at step ")[1].split(";")[0])
    assert 6 <= stopped_at < STEPS and f"resumed from checkpoints/step-{stopped_at:06d}" in log, log[-3000:]
    manifest = json.loads((run_dir / "checkpoints" / f"step-{STEPS:06d}" / "scaletrain.json").read_text())
    assert manifest["world_size"] == 2  # both Slurm tasks trained
    assert losses(run_dir) == pytest.approx(losses(deepspeed_run), rel=1e-6, abs=1e-7)
