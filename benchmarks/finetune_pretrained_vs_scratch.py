"""Pretrain once, finetune many times: the lecture's claim measured on this machine. The same small model
(gpt_cpu_small, the quick start's) is finetuned on the built-in classification task
(`experiment=finetune_classification`: which part of the standard library a docstring passage documents, 5
classes) for the same steps, once from the quick start's pretraining checkpoint and once from random init,
for each seed; the validation accuracy, macro F1 and MCC of the best evaluation of each run are printed side
by side. Everything goes through `scaletrain train`, as a user would run it.

    python benchmarks/finetune_pretrained_vs_scratch.py          # pretrains first: ~10 min on 2 cores in all
    python benchmarks/finetune_pretrained_vs_scratch.py --pretrained runs/<date>/<time> --seeds 0 1 2
    python benchmarks/finetune_pretrained_vs_scratch.py --finetune-steps 300 --out bench-runs/
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METRICS = ("val_accuracy", "val_f1", "val_mcc")


def train(run_dir: Path, overrides: list[str]) -> tuple[list[dict], float]:
    """One `scaletrain train` in its own process and folder -> (its evaluations, seconds)."""
    command = [sys.executable, "-m", "scaletrain.cli", "train", f"hydra.run.dir={run_dir}", *overrides]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return evaluations(run_dir), seconds


def evaluations(run_dir: Path) -> list[dict]:
    """The validation records of metrics.jsonl, in step order."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    found = [r for r in records if "val_accuracy" in r]
    if not found:
        raise SystemExit(f"{run_dir}/metrics.jsonl holds no val_accuracy: did the run evaluate?")
    return found


def print_curves(runs: dict) -> None:
    """Validation accuracy and loss at every evaluation, mean over seeds, both starts side by side."""
    steps = [r["step"] for r in runs["pretrained"][0]]
    print(f"\n{'step':>6}{'accuracy: pretrained':>24}{'scratch':>10}{'loss: pretrained':>20}{'scratch':>10}")
    for i, step in enumerate(steps):
        mean = {(start, key): statistics.fmean(run[i][key] for run in runs[start])
                for start in runs for key in ("val_accuracy", "val_loss")}
        print(f"{step:>6}{mean['pretrained', 'val_accuracy']:>24.3f}{mean['scratch', 'val_accuracy']:>10.3f}"
              f"{mean['pretrained', 'val_loss']:>20.3f}{mean['scratch', 'val_loss']:>10.3f}")


def pretrain(out: Path, steps: int) -> Path:
    run_dir = out / "pretrain"
    evaluation = None
    if not (run_dir / "checkpoints").is_dir():
        print(f"pretraining gpt_cpu_small for {steps} steps (the quick start's run) into {run_dir} ...", flush=True)
        command = [sys.executable, "-m", "scaletrain.cli", "train", f"hydra.run.dir={run_dir}",
                   f"trainer.max_steps={steps}"]
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        final = json.loads((run_dir / "final_metrics.json").read_text())
        evaluation = f"val_ppl {final.get('val_ppl', float('nan')):.1f}, {time.perf_counter() - started:.0f} s"
    print(f"pretrained: {run_dir} ({evaluation or 'reused'})")
    return run_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", type=Path, help="a run folder of `scaletrain train` (else pretrain one)")
    parser.add_argument("--pretrain-steps", type=int, default=300, help="the quick start's 300 by default")
    parser.add_argument("--finetune-steps", type=int, default=150)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, help="where the runs go (a temporary folder by default)")
    args = parser.parse_args(argv)

    out = args.out or Path(tempfile.mkdtemp(prefix="finetune-bench-"))
    pretrained = args.pretrained.resolve() if args.pretrained else pretrain(out, args.pretrain_steps)
    common = ["experiment=finetune_classification", f"trainer.max_steps={args.finetune_steps}",
              f"trainer.eval_every={args.eval_every}", f"checkpoint.every={args.eval_every}"]
    runs, rows = {"pretrained": [], "scratch": []}, {"pretrained": [], "scratch": []}
    for seed in args.seeds:
        for start, extra in (("pretrained", [f"model.init_from={pretrained}"]), ("scratch", [])):
            found, seconds = train(out / f"{start}-seed{seed}", [*common, f"seed={seed}", *extra])
            best = max(found, key=lambda r: r["val_accuracy"])  # the evaluation keep_best kept
            runs[start].append(found)
            rows[start].append(best)
            print(f"seed {seed} {start:>10}: " + "  ".join(f"{m} {best[m]:.3f}" for m in METRICS)
                  + f"  (best at step {best['step']}, {seconds:.0f} s)", flush=True)

    print_curves(runs)
    print(f"\ngpt_cpu_small, {args.finetune_steps} finetuning steps, seeds {args.seeds}: best validation scores")
    print(f"{'metric':<14}{'pretrained':>12}{'scratch':>12}{'pretrained - scratch':>24}")
    for metric in METRICS:
        mean = {start: statistics.fmean(r[metric] for r in rows[start]) for start in rows}
        print(f"{metric:<14}{mean['pretrained']:>12.3f}{mean['scratch']:>12.3f}"
              f"{mean['pretrained'] - mean['scratch']:>+24.3f}")
    wins = sum(p["val_accuracy"] > s["val_accuracy"] for p, s in zip(rows["pretrained"], rows["scratch"]))
    print(f"pretrained beats scratch in val_accuracy for {wins} of {len(args.seeds)} seeds; runs in {out}")


if __name__ == "__main__":
    main()
