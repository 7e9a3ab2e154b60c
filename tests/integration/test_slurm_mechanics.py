"""scaletrain's Slurm submission on a real single-node Slurm, with a small gloo program standing in for the
trainer (launch_probe.py): rendering + submission, the Slurm -> RANK/WORLD_SIZE/... mapping inside srun
tasks, USR1 -> save -> requeue -> resume, dependency chains, and bad input that submits nothing."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_cluster import slurm  # noqa: F401  (module-scoped fixture: starts and stops the daemons)

from scaletrain.configs.schema import CheckpointConfig, LaunchConfig, ParallelConfig, TrainConfig
from scaletrain.errors import ConfigError
from scaletrain.launch import maybe_launch
from scaletrain.launch.env import master_port_for_job
from scaletrain.launch.slurm import LaunchError, submit

PROBE = Path(__file__).with_name("launch_probe.py")


def slurm_config(**launcher) -> TrainConfig:
    settings = dict(name="slurm", tasks_per_node=2, time="00:10:00", signal_grace_s=30, seconds_per_step=0.5)
    return TrainConfig(launcher=LaunchConfig(**{**settings, **launcher}))


def submit_probe(cfg: TrainConfig, run_dir: Path, steps: int, seconds_per_step: float, capsys) -> list[str]:
    task = [sys.executable, str(PROBE), str(run_dir), str(steps), str(seconds_per_step)]
    assert submit(cfg, [], str(run_dir), task_argv=task) == 0
    printed = capsys.readouterr().out
    job_ids = (run_dir / "slurm" / "job_ids").read_text().split()
    for job_id in job_ids:  # the submission names each job and where its log goes
        assert f"submitted Slurm job {job_id}" in printed and f"{run_dir}/slurm/{job_id}.out" in printed
    return job_ids


def expected_total(world: int, steps: int) -> float:
    return world * (world + 1) / 2 * steps * (steps + 1) / 2


@pytest.mark.slow
def test_two_task_job_maps_slurm_variables_and_completes(slurm, tmp_path, capsys):
    (job_id,) = submit_probe(slurm_config(), tmp_path, steps=5, seconds_per_step=0.0, capsys=capsys)
    info = slurm.wait(job_id)
    log = (tmp_path / "slurm" / f"{job_id}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    assert json.loads((tmp_path / "result.json").read_text())["total"] == expected_total(2, 5)
    script = (tmp_path / "slurm" / "train.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=2" in script and "#SBATCH --signal=USR1@30" in script
    assert "#SBATCH --requeue" in script and "scontrol requeue" in script
    for rank in range(2):
        seen = json.loads((tmp_path / f"env-0-{rank}.json").read_text())
        assert seen == {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "localhost",
                        "MASTER_PORT": str(master_port_for_job(job_id))}


@pytest.mark.slow
def test_usr1_to_every_task_saves_requeues_and_resumes(slurm, tmp_path, capsys):
    # --full signals the batch shell and every task at once (as the time-limit signal reaches the tasks);
    # test_launch_train.py covers --batch, where the shell passes the signal on. Save, exit 3, requeue,
    # resume, complete.
    (job_id,) = submit_probe(slurm_config(), tmp_path, steps=40, seconds_per_step=0.25, capsys=capsys)
    state = tmp_path / "state.json"
    deadline = time.monotonic() + 120
    while not (state.exists() and json.loads(state.read_text())["step"] >= 3):
        assert time.monotonic() < deadline, "the probe never got going"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--full", job_id], check=True)
    info = slurm.wait(job_id, timeout=240)
    log = (tmp_path / "slurm" / f"{job_id}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    assert "asking for a requeue" in log and "requeueing job" in log
    resumed_at = int(log.split("attempt 1 resumes at step ")[1].split()[0])
    assert 3 <= resumed_at < 40, log
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["attempt"] == "1" and result["total"] == expected_total(2, 40)


@pytest.mark.slow
def test_dependency_chain_runs_jobs_one_after_another(slurm, tmp_path, capsys):
    cfg = slurm_config(dependency_chain=2)
    first, second = submit_probe(cfg, tmp_path, steps=4, seconds_per_step=0.0, capsys=capsys)
    assert slurm.job(second)["Dependency"] in (f"afterany:{first}(unfulfilled)", f"afterany:{first}")
    assert slurm.wait(first)["JobState"] == "COMPLETED"
    assert slurm.wait(second)["JobState"] == "COMPLETED"
    # the second link found the run finished and resumed at its end
    assert "attempt 0 resumes at step 4" in (tmp_path / "slurm" / f"{second}.out").read_text()


def _assert_nothing_submitted(slurm, run_dir: Path) -> None:
    assert slurm.queued_jobs() == [] and not (run_dir / "slurm" / "job_ids").exists()


@pytest.mark.parametrize("launcher, parallel, message", [
    (dict(tasks_per_node=3), dict(tp=2), "launcher.nodes x tasks per node = 1 x 3 = 3 processes"),
    (dict(nodes=2, gpus_per_node=8, tasks_per_node=0), dict(dp_shard=4),
     "launcher.nodes x tasks per node = 2 x 8 = 16 processes, but the parallel degrees"),
    (dict(time="00:02:00", signal_grace_s=100), dict(), "launcher.time=00:02:00 (120 s) is shorter than"),
    (dict(time="soon"), dict(), "launcher.time='soon' is not a Slurm time limit"),
])
def test_bad_config_is_one_line_and_submits_nothing(slurm, tmp_path, launcher, parallel, message):
    cfg = slurm_config(**launcher)
    cfg.parallel = ParallelConfig(**parallel)
    cfg.checkpoint = CheckpointConfig(every=100)
    with pytest.raises(ConfigError, match="^" + re.escape(message)) as error:
        submit(cfg, [], str(tmp_path))
    assert "\n" not in str(error.value)
    _assert_nothing_submitted(slurm, tmp_path)


def test_unknown_partition_names_the_known_ones(slurm, tmp_path):
    with pytest.raises(LaunchError, match=r"launcher.partition='gpu' is not a partition .* choose one of: debug$"):
        submit(slurm_config(partition="gpu"), [], str(tmp_path))
    _assert_nothing_submitted(slurm, tmp_path)


def test_request_the_cluster_cannot_hold_is_refused_before_queueing(slurm, tmp_path):
    # the single test node cannot give two nodes: sbatch --test-only says so and nothing is queued
    with pytest.raises(LaunchError, match="^sbatch refused the job: .*node"):
        submit(slurm_config(nodes=2, tasks_per_node=1), [], str(tmp_path))
    _assert_nothing_submitted(slurm, tmp_path)


def test_no_sbatch_on_path_is_one_line(slurm, tmp_path, monkeypatch):
    cfg = slurm_config()
    cfg.run_dir = str(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))  # no Slurm tools here
    with pytest.raises(LaunchError, match="^sbatch is not on the PATH, so no Slurm job can be submitted; "):
        maybe_launch(cfg, [])
    monkeypatch.undo()
    _assert_nothing_submitted(slurm, tmp_path)
