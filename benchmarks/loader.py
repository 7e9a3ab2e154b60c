"""Loader throughput per objective on the built-in corpus, next to what training consumes.

    python benchmarks/loader.py [--seq-len 128] [--micro-batch 8] [--steps 20]

"Consumed" is measured: forward + backward + AdamW step of a small transformer encoder (d=256, 4 layers,
the same seq_len and micro-batch) on this CPU, one thread per rank like the CPU trainer; plus the analytic
rate of GPT-2 small (124M) at seq 1024 on one A100 at 40% MFU: 312e12 x 0.4 / (6 x 124e6 x 1024)."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from scaletrain.configs.schema import DataConfig
from scaletrain.data.loader import Loader
from scaletrain.data.objectives import build_objective
from scaletrain.data.prepare import build_datasets

OBJECTIVES = [("clm", "byte_bpe", {}), ("mlm", "wordpiece", {}), ("mlm", "wordpiece", {"whole_word_mask": True}),
              ("mlm", "wordpiece", {"nsp": True}), ("span_bert", "wordpiece", {}), ("t5_span", "unigram", {}),
              ("bart_denoise", "bart_bpe", {})]
A100_GPT2_SAMPLES_PER_S = 312e12 * 0.4 / (6 * 124e6 * 1024)


class _Args:
    pass


def loader_rate(data_cfg: DataConfig, seq_len: int, micro_batch: int, steps: int) -> float:
    args = _Args()
    args.data = data_cfg
    data = build_datasets(args, progress=False)
    objective = build_objective(data_cfg, data.tokenizer, seq_len)
    loader = Loader(data.train, objective, seq_len, micro_batch * 4, micro_batch, 0, 1, seed=0)
    next(loader)  # first-epoch permutation and page cache out of the measurement
    started = time.perf_counter()
    for _ in range(steps):
        next(loader)
    return steps * micro_batch * 4 / (time.perf_counter() - started)


def training_rate(seq_len: int, micro_batch: int, steps: int = 5) -> float:
    torch.set_num_threads(1)
    layer = torch.nn.TransformerEncoderLayer(256, 4, 1024, batch_first=True, norm_first=True)
    model = torch.nn.Sequential(torch.nn.Embedding(8192, 256), torch.nn.TransformerEncoder(layer, 4),
                                torch.nn.Linear(256, 8192))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, 8192, (micro_batch, seq_len))

    def step():
        loss = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * micro_batch / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cache-dir", default=str(Path(tempfile.gettempdir()) / "scaletrain-bench-cache"))
    args = parser.parse_args()
    consumed = training_rate(args.seq_len, args.micro_batch)
    print(f"training consumes: {consumed:,.2f} samples/s (CPU, d=256 x 4 layers, seq {args.seq_len}); "
          f"{A100_GPT2_SAMPLES_PER_S:,.0f} samples/s per A100 for GPT-2 small at seq 1024 (analytic)")
    for objective, kind, extra in OBJECTIVES:
        data_cfg = DataConfig(objective=objective, tokenizer_type=kind, cache_dir=args.cache_dir, **extra)
        rate = loader_rate(data_cfg, args.seq_len, args.micro_batch, args.steps)
        label = objective + "".join(f"+{key}" for key in extra)
        print(f"{label:28s} {rate:>10,.0f} samples/s  {rate / consumed:8.1f}x CPU training  "
              f"{rate / A100_GPT2_SAMPLES_PER_S:6.1f}x an A100 (one loader process, one core)")


if __name__ == "__main__":
    main()
