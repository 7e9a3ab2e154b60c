"""Launching: decide whether this process trains, or starts (or prints, or submits) the processes that do.

`launch/` knows nothing of models. Training code reads only RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; whoever starts the workers (torch's elastic agent, torchrun, or a Slurm step mapped by
env.py) sets them."""

from __future__ import annotations

import os
from typing import Sequence

from scaletrain.configs.schema import TrainConfig, validate_cross_fields
from scaletrain.launch import env


def _is_slurm_rank(cfg: TrainConfig) -> bool:
    """One task of an srun step (our sbatch script, or submitit's for a Hydra multirun) is one rank. A
    single-task step trains alone unless it came from launcher=slurm, so `srun -n1 scaletrain train
    launcher.nproc_per_node=8` still starts its 8 local workers."""
    if not env.in_slurm_step(os.environ):
        return False
    return int(os.environ["SLURM_NTASKS"]) > 1 or cfg.launcher.name == "slurm"


def planned_world_size(cfg: TrainConfig) -> int:
    """How many ranks will train this config, known before maybe_launch starts or maps anything."""
    launcher = cfg.launcher
    if env.is_worker(os.environ):
        return int(os.environ["WORLD_SIZE"])
    if _is_slurm_rank(cfg):
        return int(os.environ["SLURM_NTASKS"])
    if launcher.name == "slurm":
        return launcher.nodes * launcher.slurm_tasks_per_node
    return launcher.nodes * launcher.nproc_per_node


def maybe_launch(cfg: TrainConfig, overrides: Sequence[str]) -> int | None:
    """Returns None when this process should train, else the exit code of the launch it did.

    overrides: this run's command-line overrides (HydraConfig.get().overrides.task); workers get the same
    ones plus the run folder, so they compose the same config and share the checkpoints. The run folder is
    cfg.run_dir, relative to the working directory Hydra moved us into."""
    launcher = cfg.launcher
    if env.is_worker(os.environ):
        return None
    if _is_slurm_rank(cfg):
        os.environ.update(env.torch_env_from_slurm(os.environ))
        return None
    run_dir = os.path.abspath(cfg.run_dir)
    if launcher.name == "torchrun":
        from scaletrain.launch.local import torchrun_command

        print(torchrun_command(launcher, overrides, run_dir), flush=True)
        return 0
    if launcher.name == "slurm":
        from scaletrain.launch.slurm import submit

        return submit(cfg, overrides, run_dir)
    if launcher.nproc_per_node > 1:
        from scaletrain.launch.command import train_argv
        from scaletrain.launch.local import run_elastic

        validate_cross_fields(cfg, launcher.nproc_per_node)  # fail here once, not in every worker
        return run_elastic(launcher, train_argv(overrides, run_dir), run_dir)
    return None
