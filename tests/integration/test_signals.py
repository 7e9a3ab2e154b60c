"""Stop signals from process start and Ctrl-C, through the real CLI and on the real trainer in this process."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from scaletrain.checkpoint.manager import steps_on_disk, verify
from scaletrain.errors import INTERRUPTED_EXIT_CODE, REQUEUE_EXIT_CODE
from scaletrain.train import signals
from train_utils import cli_command, cli_env, make_trainer, tiny_overrides


def _catches(pid: int, signum: int) -> bool:
    """Whether the process has a handler for `signum` (SigCgt in /proc): ours are installed at start."""
    try:
        status = open(f"/proc/{pid}/status").read()
    except OSError:
        return False
    caught = int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16)
    return bool(caught >> (signum - 1) & 1)


def _wait_for(condition, process, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None and not condition():
        time.sleep(0.01)
    assert process.poll() is None, "the run ended before the signal could be sent"


def _message(err: str) -> str:
    """The one line the run ended with (data preparation may have drawn progress bars on stderr before)."""
    lines = [line for line in err.strip().splitlines() if line.strip() and "doc/s" not in line]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def _start(tmp_path, *extra):
    overrides = tiny_overrides("gpt", "trainer.max_steps=100000", *extra)
    return subprocess.Popen(cli_command(tmp_path / "run", overrides), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli_env())


@pytest.mark.parametrize("phase", ["start-up", "data preparation"])
def test_a_stop_signal_before_training_exits_3_with_one_line(tmp_path, phase):
    process = _start(tmp_path, f"data.cache_dir={tmp_path / 'cache'}")  # a fresh cache: the data is prepared
    if phase == "start-up":  # as soon as the handler exists: imports and config composition still run
        _wait_for(lambda: _catches(process.pid, signal.SIGTERM), process)
    else:  # the tokenizer is being trained on the corpus, before the shards are written
        _wait_for(lambda: (tmp_path / "cache" / "tokenizers").is_dir(), process)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == REQUEUE_EXIT_CODE, err[-3000:]
    assert _message(err).startswith("stopped: stopped by SIGTERM before the first training step")
    assert "Traceback" not in out + err
    run = tmp_path / "run"
    assert not (run / "config.yaml").exists() and not steps_on_disk(run / "checkpoints")


def test_ctrl_c_mid_run_keeps_the_last_checkpoint_and_says_how_to_continue(tmp_path):
    process = _start(tmp_path, "checkpoint.every=2", "checkpoint.keep=2")
    checkpoints = tmp_path / "run" / "checkpoints"
    _wait_for(lambda: len(steps_on_disk(checkpoints)) >= 2, process)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == INTERRUPTED_EXIT_CODE, err[-3000:]
    message = _message(err)
    assert "Traceback" not in out + err, err[-3000:]
    newest = max(steps_on_disk(checkpoints))
    assert message.startswith("interrupted: stopped by Ctrl-C at step ")
    assert f"the last complete checkpoint {checkpoints.resolve() / f'step-{newest:06d}'} is intact" in message
    assert "resume=auto" in message
    assert all(verify(checkpoints / f"step-{s:06d}") is None for s in steps_on_disk(checkpoints))


SLOW_CLEANUP = """
import time
from scaletrain.train import signals
signals.install()
try:
    print("ready", flush=True)
    time.sleep(60)
except KeyboardInterrupt:
    print("cleaning up", flush=True)  # like waiting for an async checkpoint write to finish
    time.sleep(60)
"""


def test_a_second_ctrl_c_exits_at_once():
    process = subprocess.Popen([sys.executable, "-c", SLOW_CLEANUP], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=cli_env())
    assert process.stdout.readline() == "ready\n"
    process.send_signal(signal.SIGINT)
    assert process.stdout.readline() == "cleaning up\n"
    started = time.time()
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=30)
    assert process.returncode == INTERRUPTED_EXIT_CODE and time.time() - started < 10
    assert "interrupted twice: exiting now" in err and "Traceback" not in err


def _signal_self_during_step(trainer, signum, step):
    original = trainer.train_step

    def train_step(micro_batches):
        if trainer.state.step + 1 == step:  # mid-step: before forward/backward of step `step`
            os.kill(os.getpid(), signum)
        return original(micro_batches)

    trainer.train_step = train_step


def test_a_signal_in_the_first_step_stops_at_once_later_ones_save_first(tmp_path):
    """The first step (where torch.compile compiles) has nothing to save: the signal stops it at once. In
    step 3 it is deferred: the step finishes and is saved."""
    first = make_trainer(tmp_path / "first", tiny_overrides("gpt", "trainer.max_steps=10"))
    _signal_self_during_step(first, signal.SIGUSR1, 1)
    with pytest.raises(signals.StopRequested, match="SIGUSR1 before the first training step"):
        first.train()
    assert first.state.step == 0 and not steps_on_disk(tmp_path / "first" / "checkpoints")

    later = make_trainer(tmp_path / "later", tiny_overrides("gpt", "trainer.max_steps=10"))
    _signal_self_during_step(later, signal.SIGTERM, 3)
    assert later.train() == REQUEUE_EXIT_CODE and later.state.step == 3
    assert steps_on_disk(tmp_path / "later" / "checkpoints") == [3]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # in-process: the old handlers are back


def test_submitits_usr2_saves_then_hands_over_to_the_requeue_handler(tmp_path):
    """Under submitit, SIGUSR2 means preemption: its handler requeues the job and exits. The trainer saves
    first, then calls it (here a stand-in that records what was on disk when it ran)."""
    seen = []

    def submitit_requeue(signum, frame):
        seen.append((signum, steps_on_disk(tmp_path / "checkpoints")))

    previous = signal.signal(signal.SIGUSR2, submitit_requeue)
    try:
        trainer = make_trainer(tmp_path, tiny_overrides("gpt", "trainer.max_steps=10"))
        _signal_self_during_step(trainer, signal.SIGUSR2, 2)
        assert trainer.train() == REQUEUE_EXIT_CODE
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert seen == [(signal.SIGUSR2, [2])]
    manifest = json.loads((tmp_path / "checkpoints" / "step-000002" / "scaletrain.json").read_text())
    assert manifest["complete"] and manifest["step"] == 2
