"""Cross-entropy forward + backward on CPU: scaletrain's chunked kernel (the path `cross_entropy_sum` takes on
CPU) against `F.cross_entropy`, alternated in one run, with the median milliseconds and the speed-up.

    python benchmarks/cross_entropy_cpu.py [--shapes 1024x8192 8192x50304] [--dtype fp32] [--repeats 5]"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import scaletrain.kernels as kernels

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _time_ms(step, repeats: int) -> list[float]:
    step()  # warm-up: allocator, first-call dispatch
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        timings.append((time.perf_counter() - started) * 1000)
    return timings


def measure(rows: int, vocab: int, dtype: torch.dtype, repeats: int) -> tuple[float, float]:
    generator = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(rows, vocab, generator=generator)).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (rows,), generator=generator)
    labels[::10] = -100  # some ignored positions, as in padded or MLM batches

    def eager():
        F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum").backward()
        logits.grad = None

    def chunked():
        kernels.cross_entropy(logits, labels, ignore_index=-100, reduction="sum", impl="torch").backward()
        logits.grad = None

    results = {"eager": [], "chunked": []}
    for _ in range(2):  # alternate, so drift on the machine hits both alike
        results["eager"] += _time_ms(eager, repeats)
        results["chunked"] += _time_ms(chunked, repeats)
    return statistics.median(results["eager"]), statistics.median(results["chunked"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["1024x8192", "8192x50304"], help="ROWSxVOCAB")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__} | {torch.get_num_threads()} threads | {args.dtype}")
    print(f"{'rows x vocab':>14} {'F.cross_entropy ms':>19} {'scaletrain ms':>14} {'speed-up':>9}")
    for shape in args.shapes:
        rows, vocab = (int(n) for n in shape.lower().split("x"))
        eager, chunked = measure(rows, vocab, DTYPES[args.dtype], args.repeats)
        print(f"{shape:>14} {eager:>19.1f} {chunked:>14.1f} {eager / chunked:>8.2f}x")


if __name__ == "__main__":
    main()
