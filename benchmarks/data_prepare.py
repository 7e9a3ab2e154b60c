"""Preparing the built-in corpus: `scaletrain data prepare` against Hugging Face `datasets`
`.map(batched=True, num_proc=2)` with the same tokenizer, each in its own process so peak memory is its own.

    python benchmarks/data_prepare.py [--workers 2] [--vocab 8192] [--repeat 3]
    python benchmarks/data_prepare.py --large-mb 200     # generated JSONL of 200 MB and 400 MB, streamed

Both sides start from the same documents in memory (parsing the stdlib is not timed) and end with every
train and validation token on disk. Needs `pip install datasets` (see constraints.txt)."""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path



def _hf_tokenize(backend_json: str, eod: int):
    """The datasets.map function: one tokenizers backend per worker process, EOD after each document."""
    from tokenizers import Tokenizer as Backend

    def tokenize(batch, _cache={}):
        backend = _cache.setdefault("backend", Backend.from_str(backend_json))
        ids = [encoding.ids + [eod] for encoding in backend.encode_batch(batch["text"], add_special_tokens=False)]
        return {"input_ids": ids}
    return tokenize

def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _peak_rss_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + children) / 1024  # Linux reports KiB; parent + the largest worker, an upper bound of one


def _tokenizer(vocab: int):
    from scaletrain.configs.schema import DataConfig
    from scaletrain.data.corpus import load_corpus
    from scaletrain.data.prepare import tokenizer_from_config

    corpus = load_corpus("builtin")
    cache = Path(tempfile.gettempdir()) / "scaletrain-bench-cache"
    return corpus, tokenizer_from_config(DataConfig(tokenizer_vocab=vocab, cache_dir=str(cache)), corpus)


def run_scaletrain(vocab: int, workers: int) -> dict:
    from scaletrain.data.prepare import prepare

    corpus, tokenizer = _tokenizer(vocab)
    list(corpus.documents())  # parse the stdlib before the clock starts
    with tempfile.TemporaryDirectory() as out:
        started, cpu = time.perf_counter(), _cpu_seconds()
        metadata = prepare(corpus, tokenizer, Path(out) / "prepared", num_workers=workers, progress=False)
        seconds, cpu = time.perf_counter() - started, _cpu_seconds() - cpu
    tokens = sum(split["tokens"] for split in metadata["splits"].values())
    return {"tokens": tokens, "seconds": seconds, "cpu_seconds": cpu, "peak_mb": _peak_rss_mb()}


def run_hf_datasets(vocab: int, workers: int) -> dict:
    import datasets

    from scaletrain.data.corpus import split_documents

    corpus, tokenizer = _tokenizer(vocab)
    list(corpus.documents())
    backend_json, eod = tokenizer.json, tokenizer.eod_id
    datasets.disable_progress_bars()

    tokenize = _hf_tokenize(backend_json, eod)

    with tempfile.TemporaryDirectory() as out:
        started, cpu = time.perf_counter(), _cpu_seconds()
        train, validation = split_documents(corpus, 0.02)
        tokens = 0
        for name, documents in (("train", train), ("validation", validation)):
            dataset = datasets.Dataset.from_dict({"text": documents})
            dataset = dataset.map(tokenize, batched=True, num_proc=workers, remove_columns=["text"])
            dataset.save_to_disk(str(Path(out) / name))
            tokens += sum(len(ids) for ids in dataset["input_ids"])
        seconds, cpu = time.perf_counter() - started, _cpu_seconds() - cpu
    return {"tokens": tokens, "seconds": seconds, "cpu_seconds": cpu, "peak_mb": _peak_rss_mb()}


_WORDS = ("the model reads tokens and writes shards while workers tokenize documents in parallel so that "
          "training never waits for data every epoch sees a new order of samples from the mixture").split()


def _generate(path: Path, megabytes: float) -> None:
    """JSONL of random sentences, written in blocks (never all in memory)."""
    import numpy as np

    rng, written = np.random.default_rng(0), 0
    with open(path, "w") as handle:
        while written < megabytes * 2**20:
            lines = "".join(json.dumps({"text": " ".join(rng.choice(_WORDS, size=rng.integers(50, 400)))}) + "\n"
                            for _ in range(2000))
            handle.write(lines)
            written += len(lines)


def run_large(which: str, path: str, vocab: int, workers: int) -> dict:
    corpus, tokenizer = _tokenizer(vocab)
    with tempfile.TemporaryDirectory() as out:
        started, cpu = time.perf_counter(), _cpu_seconds()
        if which == "scaletrain":
            from scaletrain.data.corpus import load_corpus
            from scaletrain.data.prepare import prepare

            metadata = prepare(load_corpus(path), tokenizer, Path(out) / "prepared", num_workers=workers,
                               progress=False)
            tokens = sum(split["tokens"] for split in metadata["splits"].values())
        else:
            import datasets

            datasets.disable_progress_bars()
            backend_json, eod = tokenizer.json, tokenizer.eod_id

            tokenize = _hf_tokenize(backend_json, eod)

            dataset = datasets.load_dataset("json", data_files=path, split="train", cache_dir=str(Path(out) / "cache"))
            dataset = dataset.map(tokenize, batched=True, num_proc=workers, remove_columns=["text"])
            dataset.save_to_disk(str(Path(out) / "saved"))
            import pyarrow.compute as pc  # counted in Arrow: no Python object per token in the timed window

            tokens = pc.sum(pc.list_value_length(dataset.data.column("input_ids"))).as_py()
        seconds, cpu = time.perf_counter() - started, _cpu_seconds() - cpu
    return {"tokens": tokens, "seconds": seconds, "cpu_seconds": cpu, "peak_mb": _peak_rss_mb()}


def large_case(args) -> None:
    """The corpus at --large-mb and twice that: tokens/s and peak RSS, ours against datasets.map."""
    _tokenizer(args.vocab)
    with tempfile.TemporaryDirectory() as folder:
        for megabytes in (args.large_mb, 2 * args.large_mb):
            path = Path(folder) / f"corpus-{megabytes}.jsonl"
            _generate(path, megabytes)
            results = {}
            for which in ("scaletrain", "hf"):
                results[which] = _in_subprocess(which, args, "--run-large", "--input", str(path))
            size = path.stat().st_size / 2**20
            for name, which in (("scaletrain data prepare", "scaletrain"), ("HF load_dataset + .map", "hf")):
                r = results[which]
                print(f"{size:7.0f} MB  {name:24s} {r['tokens'] / r['seconds']:>12,.0f} tokens/s  "
                      f"{r['seconds']:7.1f} s  peak RSS {r['peak_mb']:7.0f} MB")
            ours, theirs = results["scaletrain"], results["hf"]
            print(f"{size:7.0f} MB  speed ratio {theirs['seconds'] / ours['seconds']:.2f}x, memory ratio "
                  f"{ours['peak_mb'] / theirs['peak_mb']:.2f}x ({ours['tokens']:,} tokens; datasets {theirs['tokens']:,})")
            path.unlink()


def _in_subprocess(which: str, args, flag: str = "--run", *extra: str) -> dict:
    command = [sys.executable, __file__, flag, which, *extra, "--vocab", str(args.vocab), "--workers", str(args.workers)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--large-mb", type=float, default=0,
                        help="also/instead: a generated JSONL corpus of this many MB and twice that")
    parser.add_argument("--run", choices=["scaletrain", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--run-large", choices=["scaletrain", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_large:
        print(json.dumps(run_large(args.run_large, args.input, args.vocab, args.workers)))
        return
    if args.large_mb:
        large_case(args)
        return
    if args.run:
        result = (run_scaletrain if args.run == "scaletrain" else run_hf_datasets)(args.vocab, args.workers)
        print(json.dumps(result))
        return
    _tokenizer(args.vocab)  # train and cache the tokenizer once, outside both measurements
    best = {}
    for _ in range(args.repeat):  # interleaved, best of N: the machine is shared
        for which in ("scaletrain", "hf"):
            result = _in_subprocess(which, args)
            if which not in best or result["seconds"] < best[which]["seconds"]:
                best[which] = result
    ours, theirs = best["scaletrain"], best["hf"]
    assert ours["tokens"] == theirs["tokens"], (ours["tokens"], theirs["tokens"])
    for name, result in (("scaletrain data prepare", ours), ("HF datasets .map(num_proc)", theirs)):
        print(f"{name:28s} {result['tokens'] / result['seconds']:>12,.0f} tokens/s  {result['seconds']:6.2f} s wall "
              f"{result['cpu_seconds']:6.2f} s CPU  peak RSS {result['peak_mb']:7.0f} MB")
    print(f"speed ratio (scaletrain / datasets): {theirs['seconds'] / ours['seconds']:.2f}x "
          f"(target >= 1.5x); CPU-time ratio {theirs['cpu_seconds'] / ours['cpu_seconds']:.2f}x; memory ratio: {ours['peak_mb'] / theirs['peak_mb']:.2f}x "
          f"({ours['tokens']:,} tokens, {args.workers} workers)")


if __name__ == "__main__":
    main()
