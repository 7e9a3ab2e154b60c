"""scaletrain eval against lm-evaluation-harness on the same local multiple-choice task and the same model.

A model (the quick start's gpt_cpu_small, pretrained here briefly unless --model names a run) is exported with
`scaletrain export`; lm-eval 0.4.x scores the export (`--model hf`) with the task YAML of docs/evaluation.md
(read from that file, only its data paths filled in), and `scaletrain eval --tasks` scores the run. Printed
side by side, per shot count: acc and acc_norm of both, and at 0 shots (where both build the same prompts)
the largest difference of any choice's log-likelihood. With K > 0 shots the two draw their demonstrations
with different samplers, so their prompts differ and only the accuracies are comparable.

lm-eval is not a dependency of scaletrain; install it into a venv of its own, beside the shared packages:

    python -m venv --system-site-packages /tmp/lmeval-venv
    /tmp/lmeval-venv/bin/pip install -c constraints.txt lm_eval
    python benchmarks/eval_vs_lm_eval.py                          # pretrains 100 steps first (a few minutes)
    python benchmarks/eval_vs_lm_eval.py --model runs/<date>/<time> --shots 0 2 --lm-eval /tmp/lmeval-venv/bin/lm_eval

--model may also be a T5 or BART run: lm-eval's hf model then takes its seq2seq backend, and scaletrain eval
scores the choices as decoder targets the same way (docs/evaluation.md).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
TASK = "stdlib_mc"
# (context, choices, answer): which standard-library module does what, in the words of its docs
QUESTIONS = [
    ("The json module can", ["encode and decode JSON", "send email", "draw turtles"], 0),
    ("The re module provides", ["a web server", "regular expression matching operations", "sound output"], 1),
    ("The os module provides a portable way of using", ["the internet", "spreadsheets",
                                                       "operating system dependent functionality"], 2),
    ("The datetime module supplies classes for", ["manipulating dates and times", "compressing files",
                                                  "parsing XML"], 0),
    ("The random module implements", ["a database", "pseudo-random number generators", "a GUI toolkit"], 1),
    ("The math module provides access to", ["network sockets", "email messages", "mathematical functions"], 2),
    ("The csv module implements classes to read and write", ["tabular data in CSV format", "images",
                                                              "audio files"], 0),
    ("The sqlite3 module provides an interface to", ["the web", "SQLite databases", "the terminal"], 1),
    ("The asyncio module is a library to write", ["C extensions", "HTML pages", "concurrent code"], 2),
    ("The logging module defines functions and classes which implement", ["a flexible event logging system",
                                                                          "a spell checker", "a compiler"], 0),
    ("The pathlib module offers classes representing", ["colors", "filesystem paths", "threads"], 1),
    ("The argparse module makes it easy to write", ["games", "device drivers",
                                                    "user-friendly command-line interfaces"], 2),
    ("The hashlib module implements", ["secure hash and message digest algorithms", "a web browser",
                                       "a text editor"], 0),
    ("The unittest module is a", ["sound library", "unit testing framework", "image format"], 1),
    ("The threading module constructs higher-level", ["buildings", "spreadsheets", "threading interfaces"], 2),
    ("The zipfile module provides tools to create, read and write", ["ZIP archives", "emails", "videos"], 0),
]
DEMONSTRATIONS = [
    ("The gzip module provides a simple interface to", ["compress and decompress files", "play music"], 0),
    ("The socket module provides access to", ["the printer", "the BSD socket interface"], 1),
    ("The shutil module offers high-level operations on", ["files and collections of files", "images"], 0),
    ("The time module provides various", ["sorting algorithms", "time-related functions"], 1),
]


def run(command: list[str], env: dict | None = None) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, command))} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps({"context": c, "choices": ch, "answer": a}) + "\n" for c, ch, a in rows))
    return path


def task_yaml(folder: Path, test: Path, train: Path) -> None:
    """docs/evaluation.md's task YAML, with its data files pointed at this run's."""
    docs = (ROOT / "docs" / "evaluation.md").read_text()
    block = re.search(r"## The equivalent lm-eval task.*?```yaml\n(.*?)```", docs, re.S).group(1)
    config = yaml.safe_load(block)
    config["dataset_kwargs"]["data_files"] = {"test": str(test), "train": str(train)}
    (folder / f"{TASK}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def lm_eval(executable: str, hf: Path, folder: Path, shots: int, out: Path) -> tuple[dict, list[list[float]]]:
    """-> (lm-eval's metrics, each document's per-choice log-likelihoods in document order)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    seconds = run([executable, "--model", "hf", "--model_args", f"pretrained={hf},dtype=float32", "--tasks", TASK,
                   "--include_path", str(folder), "--num_fewshot", str(shots), "--batch_size", "4", "--device",
                   "cpu", "--output_path", str(out), "--log_samples", "--seed", "1234"], env)
    results = json.loads(max(out.rglob("results_*.json"), key=os.path.getmtime).read_text())["results"][TASK]
    samples = [json.loads(line) for line in max(out.rglob(f"samples_{TASK}_*.jsonl"), key=os.path.getmtime)
               .read_text().splitlines()]
    samples.sort(key=lambda s: s["doc_id"])
    logliks = [[float(resp[0][0]) for resp in s["resps"]] for s in samples]
    return {"acc": results["acc,none"], "acc_norm": results["acc_norm,none"], "seconds": seconds}, logliks


def scaletrain_eval(model: Path, test: Path, train: Path, shots: int, out: Path) -> tuple[dict, list[list[float]]]:
    seconds = run([sys.executable, "-m", "scaletrain.cli", "eval", str(model), "--tasks", str(test), "--shots",
                   str(shots), "--train", str(train), "--out", str(out)])
    saved = json.loads((out / f"{TASK}.prompts.json").read_text())
    return ({"acc": saved["scores"]["acc"], "acc_norm": saved["scores"]["acc_norm"], "seconds": seconds},
            [p["loglikelihoods"] for p in saved["prompts"]])


def pretrain(out: Path, steps: int) -> Path:
    run_dir = out / "pretrain"
    if not (run_dir / "checkpoints").is_dir():
        print(f"pretraining gpt_cpu_small for {steps} steps into {run_dir} ...", flush=True)
        seconds = run([sys.executable, "-m", "scaletrain.cli", "train", f"hydra.run.dir={run_dir}",
                       f"trainer.max_steps={steps}", "trainer.progress_bar=false"])
        print(f"  {seconds:.0f} s", flush=True)
    return run_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a GPT run folder of `scaletrain train` (else pretrain one)")
    parser.add_argument("--pretrain-steps", type=int, default=100)
    parser.add_argument("--shots", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--lm-eval", default=os.environ.get("LM_EVAL", "/tmp/lmeval-venv/bin/lm_eval"),
                        help="the lm_eval executable (default $LM_EVAL or /tmp/lmeval-venv/bin/lm_eval)")
    parser.add_argument("--out", type=Path, help="where everything goes (a temporary folder by default)")
    args = parser.parse_args(argv)
    if not Path(args.lm_eval).is_file():
        raise SystemExit(f"{args.lm_eval} not found: install lm_eval into a venv (see this file's docstring)")

    out = args.out or Path(tempfile.mkdtemp(prefix="eval-vs-lm-eval-"))
    out.mkdir(parents=True, exist_ok=True)
    model = args.model.resolve() if args.model else pretrain(out, args.pretrain_steps)
    hf = out / f"hf-{model.name}"
    if not (hf / "config.json").is_file():  # an earlier call with this --out exported it already
        run([sys.executable, "-m", "scaletrain.cli", "export", str(model), "--out", str(hf)])
    test, train = write_jsonl(out / f"{TASK}.jsonl", QUESTIONS), write_jsonl(out / "stdlib_demos.jsonl", DEMONSTRATIONS)
    task_yaml(out, test, train)
    print(f"model {model}, exported to {hf}; task {test} ({len(QUESTIONS)} questions, chance "
          f"{1 / 3:.3f}), demonstrations {train}")
    print(f"{'shots':>5}{'acc: scaletrain':>17}{'lm-eval':>9}{'acc_norm: scaletrain':>22}{'lm-eval':>9}"
          f"{'max |Δ loglik|':>16}{'seconds: ours / lm-eval':>26}")
    for shots in args.shots:
        ours, our_logliks = scaletrain_eval(model, test, train, shots, out / f"scaletrain-{shots}shot")
        theirs, their_logliks = lm_eval(args.lm_eval, hf, out, shots, out / f"lm-eval-{shots}shot")
        gap = max(abs(a - b) for x, y in zip(our_logliks, their_logliks) for a, b in zip(x, y))
        gap_text = f"{gap:.2e}" if shots == 0 else f"({gap:.2f})"  # K > 0: different demonstrations
        print(f"{shots:>5}{ours['acc']:>17.4f}{theirs['acc']:>9.4f}{ours['acc_norm']:>22.4f}{theirs['acc_norm']:>9.4f}"
              f"{gap_text:>16}{ours['seconds']:>14.1f} / {theirs['seconds']:.1f}", flush=True)
    print(f"(at K > 0 the prompts differ: the log-likelihood gap in parentheses is not an agreement figure); {out}")


if __name__ == "__main__":
    main()
