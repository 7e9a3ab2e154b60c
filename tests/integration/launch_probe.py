"""A stand-in for the trainer in the launch mechanics tests: a small gloo program that keeps the trainer's
launch contract. It goes through `maybe_launch` (so the Slurm -> RANK/WORLD_SIZE/... mapping is ours), runs
`steps` all-reduce steps, saves its state after every step, on USR1 saves and exits with
REQUEUE_EXIT_CODE, and resumes from the saved state when started again.

The all-reduced quantity per step is sum over ranks of (rank + 1) * (step + 1), so the final total has a
closed form the test checks: world (world + 1) / 2 * steps (steps + 1) / 2.

usage: python launch_probe.py STATE_DIR STEPS SECONDS_PER_STEP             (one worker; srun runs this)
       python launch_probe.py elastic NPROC MAX_RESTARTS STATE_DIR STEPS SECONDS   (the local launcher)"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from scaletrain.configs.schema import LaunchConfig, TrainConfig
from scaletrain.errors import REQUEUE_EXIT_CODE
from scaletrain.launch import maybe_launch
from scaletrain.launch.env import STANDARD_VARIABLES
from scaletrain.launch.local import run_elastic


def load_state(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"step": 0, "total": 0.0}


def save_state(path: Path, state: dict) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(state))
    os.replace(temporary, path)  # atomic: a kill mid-save leaves the previous state


def main(state_dir: Path, steps: int, seconds_per_step: float) -> int:
    assert maybe_launch(TrainConfig(launcher=LaunchConfig(name="slurm")), []) is None
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    attempt = os.environ.get("SLURM_RESTART_COUNT") or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    seen = {name: os.environ[name] for name in STANDARD_VARIABLES}
    (state_dir / f"env-{attempt}-{rank}.json").write_text(json.dumps(seen))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # env://: MASTER_ADDR/MASTER_PORT from the mapping
    signalled = []
    signal.signal(signal.SIGUSR1, lambda *_: signalled.append(True))
    state_path = state_dir / "state.json"
    state = load_state(state_path)
    if rank == 0:
        print(f"[probe] attempt {attempt} resumes at step {state['step']}", flush=True)
    for step in range(state["step"], steps):
        contribution = torch.tensor([float((rank + 1) * (step + 1))], dtype=torch.float64)
        dist.all_reduce(contribution)
        state = {"step": step + 1, "total": state["total"] + contribution.item()}
        dist.barrier()
        if rank == 0:
            save_state(state_path, state)
        # every rank must stop at the same step, whichever of them the signal reached first
        stop = torch.tensor([float(bool(signalled))])
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        if stop.item() and step + 1 < steps:
            if rank == 0:
                print(f"[probe] USR1: saved at step {step + 1}, asking for a requeue", flush=True)
            dist.destroy_process_group()
            return REQUEUE_EXIT_CODE
        time.sleep(seconds_per_step)
    if rank == 0:
        (state_dir / "result.json").write_text(json.dumps({**state, "world": world, "attempt": attempt}))
        print(f"[probe] done: total {state['total']}", flush=True)
    dist.destroy_process_group()
    return 0


def elastic(nproc: int, max_restarts: int, worker_args: list[str]) -> int:
    launcher = LaunchConfig(nproc_per_node=nproc, max_restarts=max_restarts)
    return run_elastic(launcher, [sys.executable, __file__, *worker_args], worker_args[0])


if __name__ == "__main__":
    if sys.argv[1] == "elastic":
        sys.exit(elastic(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]))
    sys.exit(main(Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])))
