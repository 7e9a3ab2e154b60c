"""`scaletrain train` end to end through every launcher, against one uninterrupted single-process run of
the same tiny GPT (same data, seed and global batch):
- a 2-task Slurm job (launcher=slurm) has the same losses and final parameters;
- USR1 to a running Slurm job: it saves, requeues itself, resumes and ends with the same parameters;
- a Hydra multirun of 3 jobs through submitit_slurm, each a 2-task distributed job, writes its summary;
- USR2 (submitit's preemption signal) to a submitit sweep's jobs: they save, are requeued by submitit, resume
  and complete, the point with the reference's seed with the same losses and parameters;
- kill -9 of one rank of a local 4-process run with max_restarts=1: restart, resume, same parameters;
- SIGTERM to a local 2-process run: it saves and exits 3; the same command again resumes and matches;
- the command `launcher=torchrun` prints trains the same run;
- bad launch input is one line on stderr, exit code 2, and no job."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launch_helpers import (background_launch, losses, scaletrain_train, submitted_job_id, wait_for_step,
                            wait_until, worker_with_rank)
from slurm_cluster import slurm  # noqa: F401  (module-scoped fixture: starts and stops the daemons)
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

STEPS = 40
TINY = ["model=gpt_tiny", "model.vocab_size=512", "data.tokenizer_vocab=512", "data.num_workers=0",
        "trainer.seq_len=32", "trainer.global_batch=4", "trainer.micro_batch=1", f"trainer.max_steps={STEPS}",
        "trainer.log_every=1", "trainer.eval_batches=2", "trainer.progress_bar=false", "optim.name=sgd",
        "optim.lr=0.1", "checkpoint.every=4", "parallel.dp_shard=-1", "seed=7"]
SLURM = ["launcher=slurm", "launcher.tasks_per_node=2", "launcher.time=00:10:00", "launcher.signal_grace_s=30"]


def final_parameters(run_dir: Path, converted: Path) -> dict[str, torch.Tensor]:
    latest = max((run_dir / "checkpoints").glob("step-*"))
    assert latest.name == f"step-{STEPS:06d}", latest
    dcp_to_torch_save(latest, converted)  # any layout -> one plain state dict
    return torch.load(converted, weights_only=False)["model"]


def assert_same_run(run_dir: Path, reference: Path, scratch: Path) -> None:
    got, expected = losses(run_dir), losses(reference)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)
    params = final_parameters(run_dir, scratch / "final.pt")
    expected_params = final_parameters(reference, scratch / "reference_final.pt")
    assert params.keys() == expected_params.keys()
    for name, value in expected_params.items():
        torch.testing.assert_close(params[name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = scaletrain_train([*TINY, "parallel=single", f"hydra.run.dir={run_dir}"])
    assert result.returncode == 0, result.stdout + result.stderr
    return run_dir


@pytest.mark.slow
def test_two_task_slurm_job_matches_the_local_run(slurm, reference, tmp_path):
    run_dir = tmp_path / "run"
    job_id = submitted_job_id(scaletrain_train([*TINY, *SLURM, f"hydra.run.dir={run_dir}"]))
    info = slurm.wait(job_id, timeout=400)
    log = (run_dir / "slurm" / f"{job_id}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    assert "#SBATCH --ntasks-per-node=2" in (run_dir / "slurm" / "train.sbatch").read_text()
    manifest = json.loads((run_dir / "checkpoints" / f"step-{STEPS:06d}" / "scaletrain.json").read_text())
    assert manifest["world_size"] == 2
    assert_same_run(run_dir, reference, tmp_path)


@pytest.mark.slow
def test_usr1_preempted_slurm_job_requeues_resumes_and_matches(slurm, reference, tmp_path):
    run_dir = tmp_path / "run"
    job_id = submitted_job_id(scaletrain_train([*TINY, *SLURM, f"hydra.run.dir={run_dir}"]))
    wait_for_step(run_dir, 6)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
    info = slurm.wait(job_id, timeout=400)
    log = (run_dir / "slurm" / f"{job_id}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    assert "requeueing job" in log and "restart 1" in log
    stopped_at = int(log.split("stopped by SIGUSR1 at step ")[1].split(";")[0])
    assert 6 <= stopped_at < STEPS and f"resumed from checkpoints/step-{stopped_at:06d}" in log, log
    assert_same_run(run_dir, reference, tmp_path)


@pytest.mark.slow
def test_hydra_multirun_of_three_submitit_jobs_each_on_two_ranks(slurm, tmp_path):
    sweep = tmp_path / "sweep"
    result = scaletrain_train([
        "-m", "hydra/launcher=submitit_slurm", "hydra.launcher.tasks_per_node=2", "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.timeout_min=10", f"hydra.sweep.dir={sweep}", *TINY, "trainer.max_steps=4",
        "optim.lr=0.1,0.05,0.02"], timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    with open(sweep / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(row["optim.lr"] for row in rows) == ["0.02", "0.05", "0.1"]
    assert all(row["status"] == "ok" and int(row["step"]) == 4 for row in rows), rows
    for job in ("0", "1", "2"):  # every sweep job trained on 2 ranks mapped from its Slurm tasks
        manifest = json.loads((sweep / job / "checkpoints" / "step-000004" / "scaletrain.json").read_text())
        assert manifest["world_size"] == 2


@pytest.mark.slow
def test_killed_rank_of_a_local_four_process_run_restarts_resumes_and_matches(reference, tmp_path):
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "scaletrain.cli", "train", *TINY, "launcher.nproc_per_node=4",
               "launcher.max_restarts=1", f"hydra.run.dir={run_dir}"]
    checkpoint = run_dir / "checkpoints" / "step-000008" / "scaletrain.json"
    with background_launch(command, tmp_path / "launch.log") as launcher:
        wait_until(checkpoint.exists, launcher, 400, "no checkpoint at step 8")
        os.kill(worker_with_rank(launcher.pid, 1, program=b"scaletrain.cli"), signal.SIGKILL)
        launcher.wait(timeout=600)
    output = (tmp_path / "launch.log").read_text()
    assert launcher.returncode == 0, output
    assert "resumed from" in (run_dir / "train.log").read_text(), output
    assert_same_run(run_dir, reference, tmp_path)


@pytest.mark.slow
def test_printed_torchrun_command_trains_the_same_run(reference, tmp_path):
    run_dir = tmp_path / "run"
    printed = scaletrain_train([*TINY, "launcher=torchrun", "launcher.nproc_per_node=2", f"hydra.run.dir={run_dir}"])
    assert printed.returncode == 0, printed.stderr
    command = printed.stdout.strip().splitlines()[-1]
    assert command.startswith("torchrun --standalone --nproc-per-node=2 ")
    # torchrun is torch's console script; `python -m torch.distributed.run` is the same program
    command = command.replace("torchrun ", f"{sys.executable} -m torch.distributed.run ", 1)
    result = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert_same_run(run_dir, reference, tmp_path)


@pytest.mark.parametrize("overrides, message", [
    (["launcher.partition=gpu"], "launcher.partition='gpu' is not a partition of this cluster; choose one of: debug"),
    (["launcher.time=00:00:30"], "launcher.time=00:00:30 (30 s) is shorter than one checkpoint interval"),
    (["launcher.tasks_per_node=3", "parallel.dp_shard=2"], "parallel degrees"),
    (["no-sbatch"], "sbatch is not on the PATH, so no Slurm job can be submitted"),
], ids=["unknown-partition", "time-limit", "world-size", "no-sbatch"])
def test_bad_slurm_request_is_one_line_exit_2_and_no_job(slurm, tmp_path, overrides, message):
    environ = {**os.environ, "PATH": str(tmp_path)} if overrides == ["no-sbatch"] else dict(os.environ)
    overrides = [] if overrides == ["no-sbatch"] else overrides
    result = subprocess.run([sys.executable, "-m", "scaletrain.cli", "train", *TINY, *SLURM, *overrides,
                             f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=300,
                            env=environ)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("error: ") and message in result.stderr and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stdout + result.stderr
    assert slurm.queued_jobs() == [] and not (tmp_path / "run" / "slurm" / "job_ids").exists()


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR2])  # USR2: submitit's preemption signal
def test_stop_signal_to_a_local_run_saves_exits_3_and_the_rerun_resumes_and_matches(reference, tmp_path, signum):
    run_dir = tmp_path / "run"
    args = [*TINY, "launcher.nproc_per_node=2", f"hydra.run.dir={run_dir}"]
    command = [sys.executable, "-m", "scaletrain.cli", "train", *args]
    with background_launch(command, tmp_path / "launch.log") as launcher:
        wait_until(lambda: (run_dir / "metrics.jsonl").exists() and max(losses(run_dir), default=0) >= 6,
                   launcher, 300, "training never got going")
        launcher.send_signal(signum)  # the elastic agent passes it to both workers
        assert launcher.wait(timeout=120) == 3  # saved, asks for a requeue
    output = (tmp_path / "launch.log").read_text()
    stopped_at = int(output.split(f"stopped by {signum.name} at step ")[1].split(";")[0])
    assert 6 <= stopped_at < STEPS and (run_dir / "checkpoints" / f"step-{stopped_at:06d}").is_dir(), output
    rerun = scaletrain_train(args)  # the same command again: auto-resume from that checkpoint
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"resumed from checkpoints/step-{stopped_at:06d}" in (run_dir / "train.log").read_text()
    assert_same_run(run_dir, reference, tmp_path)


@pytest.mark.slow
def test_usr2_preempted_point_of_a_submitit_sweep_saves_requeues_resumes_and_matches(slurm, reference, tmp_path):
    """submitit's preemption signal to a sweep's jobs: each point finishes its step, saves, hands over to
    submitit's handler, which requeues it; the requeued job resumes from that checkpoint, the sweep
    completes, and the point with the reference's seed ends exactly as the uninterrupted run."""
    sweep = tmp_path / "sweep"
    command = [sys.executable, "-m", "scaletrain.cli", "train", "-m", "hydra/launcher=submitit_slurm",
               "hydra.launcher.tasks_per_node=1", "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=10",
               # without accounting submitit cannot tell preemption from a timeout; allow it to requeue either
               "hydra.launcher.max_num_timeout=3",
               f"hydra.sweep.dir={sweep}", *[o for o in TINY if not o.startswith("seed=")], "seed=7,8"]
    point = sweep / "0"  # seed=7, the reference's
    with background_launch(command, tmp_path / "sweep.log") as launcher:
        wait_until(lambda: (point / "metrics.jsonl").exists() and max(losses(point), default=0) >= 6,
                   launcher, 400, "the sweep never got going")
        jobs = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True).stdout.split()
        assert jobs
        for job_id in jobs:  # every running point
            subprocess.run(["scancel", "--signal=USR2", job_id], check=False)
        assert launcher.wait(timeout=600) == 0, (tmp_path / "sweep.log").read_text()[-3000:]
    with open(sweep / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(row["seed"] for row in rows) == ["7", "8"]
    assert all(row["status"] == "ok" and int(row["step"]) == STEPS for row in rows), rows
    job_output = "".join(path.read_text() for path in sorted((sweep / ".submitit").rglob("*_log.out")))
    stops = [int(text.split(";")[0]) for text in job_output.split("stopped by SIGUSR2 at step ")[1:]]
    # the signal goes to every point once the reference's has passed step 6; the other may be a step behind
    assert stops and all(1 <= step < STEPS for step in stops), job_output[-3000:]
    log = (point / "train.log").read_text()
    assert any(f"resumed from checkpoints/step-{step:06d}" in log for step in stops), log
    assert_same_run(point, reference, tmp_path)
