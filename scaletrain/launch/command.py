"""The command each worker runs: `scaletrain train` again, with this run's overrides and its run folder.

Workers find RANK/WORLD_SIZE (or a Slurm step) in their environment, so their own `maybe_launch` returns
None and they train. They all share the run folder the launching process got from Hydra, which is where
checkpoints live, so every restart or requeue resumes from the same place."""

from __future__ import annotations

import shlex
import sys
from typing import Sequence

# Set per worker below; anything the user passed for them would point workers elsewhere.
_WORKER_OWNED = ("hydra.run.dir=", "hydra.output_subdir=")


def worker_overrides(overrides: Sequence[str], run_dir: str) -> list[str]:
    kept = [o for o in overrides if o not in ("-m", "--multirun") and not o.lstrip("+~").startswith(_WORKER_OWNED)]
    # The launching process already wrote .hydra/ into the run folder; N workers rewriting it would race.
    return kept + [f"hydra.run.dir={run_dir}", "hydra.output_subdir=null"]


def train_argv(overrides: Sequence[str], run_dir: str) -> list[str]:
    return [sys.executable, "-m", "scaletrain.cli", "train", *worker_overrides(overrides, run_dir)]


def shell_join(argv: Sequence[str]) -> str:
    return " ".join(shlex.quote(str(arg)) for arg in argv)
