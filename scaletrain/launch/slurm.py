"""Slurm: check the request, render an sbatch script into the run folder, submit it (optionally as a chain).

Inside the job, srun starts one task per GPU (or per CPU slot); each task is `scaletrain train` again and
maps Slurm's variables onto the standard ones (env.py). Preemption and time limits: Slurm sends USR1
`signal_grace_s` before the end (and `scancel --signal=USR1 --batch` reaches the batch shell, which passes it
on); the trainer saves and exits with REQUEUE_EXIT_CODE; the script then requeues its own job, and the next
allocation auto-resumes from the latest checkpoint in the same run folder."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Sequence

from scaletrain.configs.schema import LaunchConfig, TrainConfig, data_parallel_degree, validate_cross_fields
from scaletrain.errors import REQUEUE_EXIT_CODE, ConfigError, UserError, one_line
from scaletrain.launch.command import shell_join, train_argv


class LaunchError(UserError):
    """The cluster cannot take the job: no Slurm tools, unknown partition, a refused request."""


_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def parse_time_limit(text: str) -> int:
    """Slurm's --time formats -> seconds: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS."""
    match = _TIME.match(str(text).strip())
    if not match:
        raise ConfigError(f"launcher.time={text!r} is not a Slurm time limit; use HH:MM:SS or D-HH:MM:SS")
    days, first, second, third = (int(g) if g is not None else None for g in match.groups())
    if days is None:  # MM | MM:SS | HH:MM:SS
        parts = [p for p in (first, second, third) if p is not None]
        hours, minutes, seconds = parts if len(parts) == 3 else (0, parts[0], parts[1] if len(parts) == 2 else 0)
    else:  # D-HH | D-HH:MM | D-HH:MM:SS
        hours, minutes, seconds = first, second or 0, third or 0
    return (days or 0) * 86400 + hours * 3600 + minutes * 60 + seconds


def world_size(cfg: TrainConfig) -> int:
    launcher = cfg.launcher
    return launcher.nodes * launcher.slurm_tasks_per_node


def check_request(cfg: TrainConfig) -> None:
    """Everything that can be checked from the config alone, before any Slurm command runs."""
    launcher, parallel = cfg.launcher, cfg.parallel
    tasks, world = launcher.slurm_tasks_per_node, world_size(cfg)
    needed = data_parallel_degree(parallel, world) * parallel.tp * parallel.pp * parallel.cp
    if needed != world:
        raise ConfigError(
            f"launcher.nodes x tasks per node = {launcher.nodes} x {tasks} = {world} processes, but the parallel "
            f"degrees (dp_replicate x dp_shard x tp x pp x cp) make {needed}; change launcher.nodes/"
            f"gpus_per_node or the parallel degrees")
    validate_cross_fields(cfg, world)
    limit = parse_time_limit(launcher.time)
    # Rule: a job must live long enough to write one checkpoint before its USR1 arrives, or every requeue
    # would start from the same place and the run would never progress.
    interval = cfg.checkpoint.every or cfg.trainer.max_steps
    needed_s = interval * launcher.seconds_per_step + launcher.signal_grace_s
    if limit < needed_s:
        raise ConfigError(
            f"launcher.time={launcher.time} ({limit} s) is shorter than one checkpoint interval plus the signal "
            f"grace ({interval} steps x launcher.seconds_per_step={launcher.seconds_per_step:g} s + "
            f"launcher.signal_grace_s={launcher.signal_grace_s} = {needed_s:g} s); raise launcher.time or lower "
            f"checkpoint.every")


def _slurm_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise LaunchError(f"{name} is not on the PATH, so no Slurm job can be submitted; run on a Slurm login "
                          f"node or use launcher=local")
    return path


def _run(argv: list[str]) -> str:
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        message = one_line(result.stderr or result.stdout) or f"exit code {result.returncode}"
        raise LaunchError(f"{Path(argv[0]).name} refused the job: {message}; check the launcher.* settings")
    return result.stdout


def check_partition(partition: str) -> None:
    if not partition:
        return  # Slurm's default partition
    known = sorted(set(_run([_slurm_tool("sinfo"), "--noheader", "--format=%R"]).split()))
    if partition not in known:
        raise LaunchError(f"launcher.partition={partition!r} is not a partition of this cluster; "
                          f"choose one of: {', '.join(known)}")


def render_sbatch(launcher: LaunchConfig, task_argv: Sequence[str], run_dir: str) -> str:
    """The job script; task_argv is what each srun task runs (`scaletrain train ...` for training)."""
    log_dir = Path(run_dir) / "slurm"
    directives = [f"--job-name={launcher.job_name}", f"--nodes={launcher.nodes}",
                  f"--ntasks-per-node={launcher.slurm_tasks_per_node}", f"--cpus-per-task={launcher.cpus_per_task}",
                  f"--time={launcher.time}"]
    if launcher.gpus_per_node:
        directives.append(f"--gpus-per-node={launcher.gpus_per_node}")
    if launcher.partition:
        directives.append(f"--partition={launcher.partition}")
    if launcher.account:
        directives.append(f"--account={launcher.account}")
    directives += [f"--output={log_dir}/%j.out", "--open-mode=append",  # a requeued job appends to its log
                   f"--signal=USR1@{launcher.signal_grace_s}", "--requeue" if launcher.requeue else "--no-requeue",
                   *launcher.extra_sbatch]
    task = shell_join(task_argv)
    requeue = (f'if [ "$status" -eq {REQUEUE_EXIT_CODE} ]; then\n'
               f'  echo "[scaletrain] the trainer saved and asked for a requeue: requeueing job $SLURM_JOB_ID"\n'
               f'  scontrol requeue "$SLURM_JOB_ID"\n'
               f'fi\n') if launcher.requeue else ""
    return (
        "#!/bin/bash\n"
        f"# Rendered by scaletrain from this run's config ({run_dir}/.hydra).\n"
        f"# Resubmit (it resumes from the latest checkpoint): sbatch {log_dir}/train.sbatch\n"
        + "".join(f"#SBATCH {line}\n" for line in directives)
        + f"\ncd {shlex.quote(run_dir)}\n"
        f"export OMP_NUM_THREADS={launcher.cpus_per_task}\n"
        'echo "[scaletrain] job $SLURM_JOB_ID on $SLURM_JOB_NODELIST, restart ${SLURM_RESTART_COUNT:-0}"\n'
        "# One task per GPU or CPU slot; each maps SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID onto\n"
        "# RANK/WORLD_SIZE/LOCAL_RANK (scaletrain.launch.env). No --kill-on-bad-exit: ranks that exit 3 after a\n"
        "# save must not have their peers killed mid-exit; a crashed rank fails its peers' next collective.\n"
        f"srun {task} &\n"
        "srun_pid=$!\n"
        "# Time-limit USR1 goes to the tasks; `scancel --signal=USR1 --batch` reaches only this shell: pass it on.\n"
        "trap 'kill -USR1 $srun_pid 2>/dev/null' USR1\n"
        "trap 'kill -TERM $srun_pid 2>/dev/null' TERM\n"
        "# a trapped signal ends `wait` early: wait until srun is really gone, then collect its status\n"
        "while kill -0 $srun_pid 2>/dev/null; do wait $srun_pid; done\n"
        "wait $srun_pid\n"
        "status=$?\n"
        + requeue
        + "exit $status\n")


def submit(cfg: TrainConfig, overrides: Sequence[str], run_dir: str,
           task_argv: Sequence[str] | None = None) -> int:
    """Checks, renders, submits `launcher.dependency_chain` jobs; prints each job id and its log.
    task_argv defaults to `scaletrain train` with this run's overrides and run folder."""
    check_request(cfg)
    sbatch = _slurm_tool("sbatch")
    check_partition(cfg.launcher.partition)
    script = Path(run_dir) / "slurm" / "train.sbatch"
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(render_sbatch(cfg.launcher, task_argv or train_argv(overrides, run_dir), run_dir))
    _run([sbatch, "--test-only", str(script)])  # the controller validates the request; nothing is queued
    job_ids: list[str] = []
    for link in range(cfg.launcher.dependency_chain):
        # afterany: the next link starts whatever way the previous one ended (time limit included)
        dependency = [f"--dependency=afterany:{job_ids[-1]}"] if job_ids else []
        job_id = _run([sbatch, "--parsable", *dependency, str(script)]).strip().split(";")[0]
        job_ids.append(job_id)
        print(f"[launch] submitted Slurm job {job_id} ({link + 1} of {cfg.launcher.dependency_chain}); "
              f"log {script.parent / (job_id + '.out')}", flush=True)
    (script.parent / "job_ids").write_text("\n".join(job_ids) + "\n")
    print(f"[launch] script {script}; run folder {run_dir}", flush=True)
    return 0

