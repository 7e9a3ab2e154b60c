"""A real single-node Slurm (munged + slurmctld + slurmd, Debian packages) for the Slurm tests.

tests/slurm/start.sh installs the packages when missing and starts the daemons as root, recording their
process ids; stop.sh stops exactly those ids. Test modules import the `slurm` fixture from here, so each
module starts one cluster and leaves no daemon behind."""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "slurm"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE"}


@dataclass
class SlurmCluster:
    pid_dir: Path

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, Dependency, ...)."""
        text = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                              check=True).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait(self, job_id: str, timeout: float = 300.0, states=FINAL_STATES) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info["JobState"] in states:
                return info
            time.sleep(0.5)
        subprocess.run(["scancel", job_id])
        raise AssertionError(f"job {job_id} did not reach {sorted(states)} in {timeout:.0f}s: {self.job(job_id)}")

    def queued_jobs(self) -> list[str]:
        return subprocess.run(["squeue", "--noheader", "--format=%i"], capture_output=True, text=True,
                              check=True).stdout.split()


def start_cluster(pid_dir: Path) -> SlurmCluster:
    assert os.geteuid() == 0, "the Slurm tests start slurmctld/slurmd/munged and must run as root (as CI does)"
    result = subprocess.run(["bash", str(SCRIPTS / "start.sh"), str(pid_dir)], capture_output=True, text=True,
                            timeout=600)
    cluster = SlurmCluster(pid_dir)
    if result.returncode != 0 or "idle" not in result.stdout:
        stop_cluster(cluster)
        raise AssertionError(f"Slurm did not start:\n{result.stdout}\n{result.stderr}")
    return cluster


def stop_cluster(cluster: SlurmCluster) -> None:
    subprocess.run(["bash", str(SCRIPTS / "stop.sh"), str(cluster.pid_dir)], timeout=60)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = start_cluster(tmp_path_factory.mktemp("slurm-daemons"))
    try:
        yield cluster
    finally:
        for job_id in cluster.queued_jobs():
            subprocess.run(["scancel", job_id])
        for _ in range(100):  # let cancelled steps end before their slurmd goes
            if not cluster.queued_jobs():
                break
            time.sleep(0.2)
        stop_cluster(cluster)
