"""The local elastic launcher's failure path, with the gloo stand-in trainer (launch_probe.py): kill -9
one of 4 ranks with max_restarts=0 and the launch fails, naming the rank. (With max_restarts=1 the real
trainer restarts, resumes and matches: test_launch_train.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from launch_helpers import background_launch, wait_until, worker_with_rank

PROBE = Path(__file__).with_name("launch_probe.py")
STEPS = 30


def start_and_kill_rank_one(tmp_path: Path, max_restarts: int) -> subprocess.CompletedProcess:
    command = [sys.executable, str(PROBE), "elastic", "4", str(max_restarts), str(tmp_path), str(STEPS), "0.2"]
    state = tmp_path / "state.json"
    with background_launch(command, tmp_path / "launch.log") as launcher:
        wait_until(lambda: state.exists() and json.loads(state.read_text())["step"] >= 3, launcher, 120,
                   "the workers never got going")
        os.kill(worker_with_rank(launcher.pid, 1, program=str(PROBE).encode()), signal.SIGKILL)
        launcher.wait(timeout=240)
    return subprocess.CompletedProcess(launcher.args, launcher.returncode, (tmp_path / "launch.log").read_text())


@pytest.mark.slow
def test_without_restarts_left_the_launch_fails_naming_the_rank(tmp_path):
    result = start_and_kill_rank_one(tmp_path, max_restarts=0)
    assert result.returncode != 0
    assert "rank 1 failed with exit code -9 and no restarts were left (launcher.max_restarts=0)" in result.stdout
    assert not (tmp_path / "result.json").exists()
