"""Starting a launcher in the background and finding the workers it started, to kill -9 exactly one of
them (never by name)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def worker_with_rank(launcher_pid: int, rank: int, program: bytes, timeout: float = 120) -> int:
    """The pid of the worker with RANK=rank running `program`, among launcher_pid's descendants."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in descendants(launcher_pid):
            try:  # a process may be gone by now
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                command = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ and program in command:
                return pid
        time.sleep(0.2)
    raise AssertionError(f"no worker with RANK={rank} under pid {launcher_pid}")


def kill_tree(root: int) -> None:
    """SIGKILL a launcher that overran and every worker it started (by pid), so no orphan keeps training."""
    for pid in [*descendants(root), root]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@contextlib.contextmanager
def background_launch(command: list[str], log_path: Path) -> Iterator[subprocess.Popen]:
    """Popen with its output in `log_path` (a file, not a pipe nobody reads while the test waits). On the
    way out, a launcher still running (the test failed or timed out) is killed with all its workers."""
    with open(log_path, "w") as log:
        launcher = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            yield launcher
        finally:
            if launcher.poll() is None:
                kill_tree(launcher.pid)
                launcher.wait()


def wait_until(condition: Callable[[], bool], launcher: subprocess.Popen, timeout: float, what: str) -> None:
    """Poll `condition` while the launcher runs; fail naming `what` when it exits or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline and launcher.poll() is None, what
        time.sleep(0.1)


def scaletrain_train(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scaletrain.cli", "train", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss; a step redone after a restart keeps its last value."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def submitted_job_id(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.split("submitted Slurm job ")[1].split()[0]


def wait_for_step(run_dir: Path, step: int, timeout: float = 300) -> None:
    """Until a run with no local launcher to watch (a Slurm job) has logged `step`."""
    deadline = time.monotonic() + timeout
    while not ((run_dir / "metrics.jsonl").exists() and max(losses(run_dir), default=0) >= step):
        assert time.monotonic() < deadline, "training never got going"
        time.sleep(0.1)
