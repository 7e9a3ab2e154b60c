"""The standard distributed variables, and how a Slurm task gets them.

Training code reads only RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. torch's elastic agent
sets them for local workers; inside a Slurm job step (srun, or submitit's srun) we derive them here from
Slurm's own variables, so the same trainer runs under either."""

from __future__ import annotations

import subprocess
from typing import Callable, Mapping

STANDARD_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# MASTER_PORT = base + job id mod span: unique among the jobs that can share a node, stable across a
# requeue, and below Linux's ephemeral range (32768+) so an outgoing connection never holds it.
PORT_BASE, PORT_SPAN = 15000, 15000


def is_worker(environ: Mapping[str, str]) -> bool:
    """A launcher (elastic agent, torchrun or our Slurm mapping) already made this process one rank."""
    return "RANK" in environ and "WORLD_SIZE" in environ


def in_slurm_step(environ: Mapping[str, str]) -> bool:
    """True in a task started by srun; False in the batch script itself, which has no step id."""
    return all(name in environ for name in ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_PROCID", "SLURM_NTASKS"))


def master_port_for_job(job_id: str) -> int:
    return PORT_BASE + int(job_id) % PORT_SPAN


def first_hostname(nodelist: str) -> str:
    """`scontrol show hostnames` expands Slurm's compressed node list (node[01-04,07]); rank 0 runs on the first."""
    result = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                            check=True)
    return result.stdout.split()[0]


def torch_env_from_slurm(environ: Mapping[str, str],
                         resolve_first_host: Callable[[str], str] | None = None) -> dict[str, str]:
    """Slurm task variables -> the standard ones. One task is one rank; SLURM_LOCALID is its index on its node."""
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ["SLURM_JOB_NODELIST"]
    resolve_first_host = resolve_first_host or first_hostname
    return {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": environ["SLURM_NTASKS"],
        "LOCAL_RANK": environ["SLURM_LOCALID"],
        "MASTER_ADDR": resolve_first_host(nodelist),
        "MASTER_PORT": str(master_port_for_job(environ["SLURM_JOB_ID"])),
    }
