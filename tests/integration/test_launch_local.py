"""The local elastic launcher's failure path, with the gloo stand-in trainer (launch_probe.py): kill -9
one of 4 ranks with max_restarts=0 and the launch fails, naming the rank. (With max_restarts=1 the real
trainer restarts, resumes and matches: test_launch_train.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launch_helpers import kill_tree, worker_with_rank

PROBE = Path(__file__).with_name("launch_probe.py")
STEPS = 30


def start_and_kill_rank_one(tmp_path: Path, max_restarts: int) -> subprocess.CompletedProcess:
    log = open(tmp_path / "launch.log", "w")  # a file, not a pipe nobody reads while we wait
    launcher = subprocess.Popen([sys.executable, str(PROBE), "elastic", "4", str(max_restarts), str(tmp_path),
                                 str(STEPS), "0.2"], stdout=log, stderr=subprocess.STDOUT)
    try:
        state = tmp_path / "state.json"
        deadline = time.monotonic() + 120
        while not (state.exists() and json.loads(state.read_text())["step"] >= 3):
            assert time.monotonic() < deadline and launcher.poll() is None, "the workers never got going"
            time.sleep(0.1)
        os.kill(worker_with_rank(launcher.pid, 1, program=str(PROBE).encode()), signal.SIGKILL)
        launcher.wait(timeout=240)
    finally:
        if launcher.poll() is None:
            kill_tree(launcher.pid)
            launcher.wait()
        log.close()
    return subprocess.CompletedProcess(launcher.args, launcher.returncode, (tmp_path / "launch.log").read_text())


@pytest.mark.slow
def test_without_restarts_left_the_launch_fails_naming_the_rank(tmp_path):
    result = start_and_kill_rank_one(tmp_path, max_restarts=0)
    assert result.returncode != 0
    assert "rank 1 failed with exit code -9 and no restarts were left (launcher.max_restarts=0)" in result.stdout
    assert not (tmp_path / "result.json").exists()
