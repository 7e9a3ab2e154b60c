"""kill -9 at random moments (mostly while a checkpoint is being written), at least 10 times, then let the
run finish: every restart resumes from the last complete checkpoint, every step-* folder on disk is always
complete, and the final parameters and losses equal those of an uninterrupted run."""

import json
import random
import re
import subprocess
import time

import torch

from scaletrain.checkpoint.manager import steps_on_disk, verify
from train_utils import checkpoint_params, cli_command, cli_env, make_trainer, model_params, tiny_overrides

STEPS, KILLS = 40, 10


def _latest_complete(checkpoints):
    complete = [s for s in steps_on_disk(checkpoints) if verify(checkpoints / f"step-{s:06d}") is None]
    return max(complete, default=0)


def _wait_for_checkpoint_activity(process, checkpoints, before, timeout=240):
    """Until this attempt starts writing its first checkpoint (or exits)."""
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if checkpoints.is_dir() and {p.name for p in checkpoints.iterdir()} - before:
            return
        time.sleep(0.005)


def test_kill_9_anywhere_then_resume_equals_an_uninterrupted_run(tmp_path):
    overrides = tiny_overrides("gpt", f"trainer.max_steps={STEPS}", "checkpoint.every=1", "checkpoint.keep=2")
    run_dir, rng, kills, mid_write_kills = tmp_path / "crashy", random.Random(1234), 0, 0
    checkpoints = run_dir / "checkpoints"
    while True:
        resume_step = _latest_complete(checkpoints) if checkpoints.is_dir() else 0
        before = {p.name for p in checkpoints.iterdir()} if checkpoints.is_dir() else set()
        log = tmp_path / f"attempt-{kills}.log"
        with open(log, "w") as out:
            process = subprocess.Popen(cli_command(run_dir, overrides), stdout=out, stderr=subprocess.STDOUT,
                                       env=cli_env())
            if kills < KILLS:
                _wait_for_checkpoint_activity(process, checkpoints, before)
                time.sleep(rng.uniform(0.0, 0.3))
                process.kill()
            returncode = process.wait(timeout=300)
        text = log.read_text()
        if resume_step:
            assert re.search(rf"resumed from \S*step-{resume_step:06d} at step {resume_step}\b", text), text[-2000:]
        for step in steps_on_disk(checkpoints):  # never a step-* folder that is not complete
            assert verify(checkpoints / f"step-{step:06d}") is None
        if kills >= KILLS:
            assert returncode == 0, text[-3000:]
            break
        assert returncode == -9, f"attempt {kills} ended by itself: {text[-2000:]}"
        mid_write_kills += any(p.name.startswith(".tmp-step-") for p in checkpoints.iterdir())
        kills += 1
    assert mid_write_kills >= 1  # some kills did land inside a checkpoint write

    reference = make_trainer(tmp_path / "straight", overrides[:-2] + ["checkpoint.every=0"])
    assert reference.train() == 0
    final = checkpoint_params(checkpoints / f"step-{STEPS:06d}")
    for name, value in model_params(reference).items():
        assert torch.equal(final[f"model.{name}"], value), name
    losses = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            losses[record["step"]] = record["loss"]  # a step redone after a kill overwrites its record
    assert [losses[s] for s in range(1, STEPS + 1)] == reference.losses
