"""Shared by the trainer's integration tests: tiny configs, in-process runs, subprocess CLI runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from scaletrain.configs.store import compose_config

# Tiny models on small trained vocabularies; seq_len 32, 2 micro-batches of 2 per step (accumulation 2).
FAMILY_OVERRIDES = {
    "gpt": ["model=gpt_tiny", "model.vocab_size=512", "data.tokenizer_vocab=512"],
    "bert": ["model=bert_tiny", "model.vocab_size=512", "data.tokenizer_vocab=512", "data.objective=mlm",
             "data.tokenizer_type=wordpiece", "data.nsp=true"],
    "encdec": ["model=t5_tiny", "model.vocab_size=512", "data.tokenizer_vocab=512", "data.objective=t5_span",
               "data.tokenizer_type=unigram"],
    "xlnet": ["model=xlnet_tiny", "model.vocab_size=512", "data.tokenizer_vocab=512", "data.objective=plm",
              "data.tokenizer_type=wordpiece"],
}
COMMON = ["trainer.seq_len=32", "trainer.global_batch=4", "trainer.micro_batch=2", "trainer.eval_every=0",
          "trainer.log_every=1", "trainer.progress_bar=false", "trainer.sample_tokens=0", "checkpoint.every=0",
          "optim.warmup_steps=2", "optim.lr=3e-3"]


def tiny_overrides(family: str = "gpt", *extra: str) -> list[str]:
    return FAMILY_OVERRIDES[family] + COMMON + list(extra)


def make_trainer(run_dir: Path, overrides: list[str]):
    from scaletrain.train.trainer import Trainer

    torch.set_num_threads(1)
    return Trainer(compose_config(overrides + [f"run_dir={run_dir}"]))


def model_params(trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


def full_params(trainer) -> dict[str, torch.Tensor]:
    """This rank's parameters, DTensor shards gathered to full tensors (a pipeline rank: its stages only)."""
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for name, p in trainer.model.named_parameters()}


def stop_after(trainer, steps: int) -> None:
    """Deliver the stop request the SIGUSR1 handler would, after `steps` steps."""
    original = trainer.train_step

    def train_step(micro_batches):
        metrics = original(micro_batches)
        if trainer.state.step + 1 == steps:
            trainer.stop_signal = signal.SIGUSR1
        return metrics

    trainer.train_step = train_step


def trained_weights(trainer) -> dict[str, torch.Tensor]:
    """Full fp32 parameters on every rank, whichever engine (DeepSpeed ZeRO-3 keeps only partitions)."""
    if trainer.engine is not None:
        state = trainer.engine.layout_free_state()["model"]
        return {name: state[name] for name in trainer.engine.params}
    return full_params(trainer)


def stopped_run(run_dir: Path, overrides: list[str], step: int) -> Path:
    """A run stopped (as by SIGUSR1) after `step` steps -> the checkpoint it saved."""
    from scaletrain.errors import REQUEUE_EXIT_CODE

    trainer = make_trainer(run_dir, overrides)
    stop_after(trainer, step)
    assert trainer.train() == REQUEUE_EXIT_CODE
    return trainer.run_dir / "checkpoints" / f"step-{step:06d}"


def resumed_run(run_dir: Path, overrides: list[str], checkpoint: Path, step: int):
    """That checkpoint resumed (at another layout or engine) to the end -> (losses, full final weights)."""
    trainer = make_trainer(run_dir, overrides + [f"resume={checkpoint}"])
    assert trainer.state.step == step
    assert trainer.train() == 0
    return trainer.losses, trained_weights(trainer)


def checkpoint_params(path: Path) -> dict[str, torch.Tensor]:
    """The model tensors of a DCP checkpoint, read without building a model."""
    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    state = {key: torch.empty(meta.size, dtype=meta.properties.dtype)
             for key, meta in metadata.state_dict_metadata.items() if key.startswith("model.")}
    dcp.load(state, checkpoint_id=str(path), no_dist=True)
    return state


def cli_command(run_dir: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "scaletrain.cli", "train", *overrides, f"hydra.run.dir={run_dir}"]


def cli_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def run_cli(run_dir: Path, overrides: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command(run_dir, overrides), capture_output=True, text=True, timeout=timeout,
                          env=cli_env(**env))


# A labelled task any tiny model learns in a few dozen steps: the class is which topic's words (two of eight)
# are mixed into a line of filler words.
TOPIC_WORDS = {"food": "bread cheese soup recipe bake salt sugar dinner".split(),
               "music": "guitar song band album drum melody concert note".split(),
               "sports": "goal match team score player coach league win".split()}
FILLER = "the a of and to in is it that was for on with as".split()


def write_topic_task(folder: Path, train: int = 240, validation: int = 60, seed: int = 0) -> tuple[Path, Path]:
    """train.jsonl and validation.jsonl of {"text", "label"} records; returns their paths."""
    import json
    import random

    rng = random.Random(seed)
    paths = []
    for name, count in (("train", train), ("validation", validation)):
        lines = []
        for _ in range(count):
            label = rng.choice(sorted(TOPIC_WORDS))
            words = [rng.choice(FILLER) for _ in range(8)]
            for _ in range(2):
                words.insert(rng.randrange(len(words)), rng.choice(TOPIC_WORDS[label]))
            lines.append(json.dumps({"text": " ".join(words), "label": label}))
        folder.mkdir(parents=True, exist_ok=True)
        paths.append(folder / f"{name}.jsonl")
        paths[-1].write_text("\n".join(lines) + "\n")
    return paths[0], paths[1]


def task_overrides(family: str, train: Path, validation: Path, *extra: str) -> list[str]:
    """tiny_overrides for data.task=classification on a topic task: one micro-batch of 8 per step."""
    return tiny_overrides(family, "data.task=classification", f"data.train_files={train}",
                          f"data.validation_files={validation}", "trainer.seq_len=24", "trainer.global_batch=8",
                          "trainer.micro_batch=8", *extra)
