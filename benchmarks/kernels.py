"""Fused kernels vs eager PyTorch vs torch.compile at GPT-3 shapes: forward+backward time and achieved GB/s.

    python benchmarks/kernels.py                  # every op, bf16, 8192 tokens (4 x 2048), widths of GPT-3
    python benchmarks/kernels.py --ops cross_entropy layer_norm --tokens 16384 --dtype fp16

For each op it prints one line per implementation: milliseconds for one forward + backward, the GB/s that
time implies for the op's minimum memory traffic (every input read and every output written once per
pass, as the byte counts below say), the speedup over eager, and the peak memory above the inputs. The
fused outputs are checked against eager first. On a machine without CUDA it says so and exits 0."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import scaletrain.kernels as kernels

GPT3_WIDTH = 12288  # GPT-3 175B d_model (d_ff = 4x); GPT-3 2.7B / 6.7B widths are 2560 / 4096
GPT3_VOCAB = 50304  # GPT-2 BPE 50257 padded to a multiple of 128
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Case:
    name: str
    make_inputs: Callable[[], dict]  # tensors; the ones with requires_grad get grads
    bytes_moved: int  # minimum HBM traffic of forward + backward


def _eager_cross_entropy(logits, labels):
    # What an eager training loop does: autocast runs cross_entropy in fp32, so the logits are upcast.
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1), reduction="sum")


def _eager(name: str) -> Callable:
    return {
        "layer_norm": lambda t: F.layer_norm(t["x"], (t["x"].shape[-1],), t["weight"], t["bias"], 1e-5),
        "rms_norm": lambda t: F.rms_norm(t["x"], (t["x"].shape[-1],), t["weight"], 1e-5),
        "bias_gelu": lambda t: F.gelu(t["x"] + t["bias"], approximate="tanh"),
        "gated_gelu": lambda t: F.gelu(t["gate"], approximate="tanh") * t["up"],
        "cross_entropy": lambda t: _eager_cross_entropy(t["logits"], t["labels"]),
        "residual_dropout_norm": lambda t: _eager_residual_dropout_norm(t),
    }[name]


def _eager_residual_dropout_norm(t):
    new_residual = t["residual"] + F.dropout(t["x"] + t["bias"], 0.1)
    return F.layer_norm(new_residual, (new_residual.shape[-1],), t["weight"], t["norm_bias"], 1e-5), new_residual


def _fused(name: str) -> Callable:
    return {
        "layer_norm": lambda t: kernels.layer_norm(t["x"], t["weight"], t["bias"], 1e-5, impl="triton"),
        "rms_norm": lambda t: kernels.rms_norm(t["x"], t["weight"], 1e-5, impl="triton"),
        "bias_gelu": lambda t: kernels.bias_gelu(t["x"], t["bias"], "tanh", impl="triton"),
        "gated_gelu": lambda t: kernels.gated_gelu(t["gate"], t["up"], impl="triton"),
        "cross_entropy": lambda t: kernels.cross_entropy(t["logits"], t["labels"], impl="triton"),
        "residual_dropout_norm": lambda t: kernels.residual_dropout_norm(
            t["x"], t["residual"], t["bias"], 0.1, True, t["weight"], t["norm_bias"], 1e-5, "layernorm",
            impl="triton"),
    }[name]


def make_cases(tokens: int, dtype: torch.dtype) -> list[Case]:
    width, ff, size = GPT3_WIDTH, 4 * GPT3_WIDTH, torch.tensor([], dtype=dtype).element_size()

    def tensor(*shape, grad=True, scale=1.0):
        return (scale * torch.randn(*shape, device="cuda", dtype=dtype)).requires_grad_(grad)

    def norm_inputs():
        return {"x": tensor(tokens, width), "weight": tensor(width), "bias": tensor(width)}

    def residual_inputs():
        return {"x": tensor(tokens, width), "residual": tensor(tokens, width), "bias": tensor(width),
                "weight": tensor(width), "norm_bias": tensor(width)}

    def ce_inputs():
        labels = torch.randint(0, GPT3_VOCAB, (tokens,), device="cuda")
        return {"logits": tensor(tokens, GPT3_VOCAB, scale=4.0), "labels": labels}

    hidden, mlp, logits = tokens * width * size, tokens * ff * size, tokens * GPT3_VOCAB * size
    return [
        # forward reads x, writes y; backward reads x and dy, writes dx
        Case("layer_norm", norm_inputs, 5 * hidden),
        Case("rms_norm", lambda: {"x": tensor(tokens, width), "weight": tensor(width)}, 5 * hidden),
        Case("bias_gelu", lambda: {"x": tensor(tokens, ff), "bias": tensor(ff)}, 5 * mlp),
        # forward reads gate, up, writes y; backward reads gate, up, dy, writes dgate, dup
        Case("gated_gelu", lambda: {"gate": tensor(tokens, ff), "up": tensor(tokens, ff)}, 8 * mlp),
        # forward reads the logits; backward reads them again and writes their grad
        Case("cross_entropy", ce_inputs, 3 * logits),
        # forward reads x, residual, writes normed, new residual; backward reads dy, d new residual and
        # the new residual, writes dx and d residual
        Case("residual_dropout_norm", residual_inputs, 9 * hidden),
    ]


def _forward_backward(fn: Callable, inputs: dict) -> Callable[[], None]:
    outputs = fn(inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    upstream = [torch.randn_like(o) for o in outputs]
    leaves = [t for t in inputs.values() if t.requires_grad]

    def step():
        results = fn(inputs)
        results = results if isinstance(results, tuple) else (results,)
        torch.autograd.grad(results, leaves, upstream)

    return step


def _check(name: str, inputs: dict) -> float:
    """Largest forward difference triton vs eager, relative to the output scale."""
    with torch.no_grad():
        if name == "residual_dropout_norm":  # the masks differ by design: compare with dropout off
            t = inputs
            eager = kernels.residual_dropout_norm(t["x"], t["residual"], t["bias"], 0.1, False, t["weight"],
                                                  t["norm_bias"], 1e-5, "layernorm", impl="torch")
            fused = kernels.residual_dropout_norm(t["x"], t["residual"], t["bias"], 0.1, False, t["weight"],
                                                  t["norm_bias"], 1e-5, "layernorm", impl="triton")
        else:
            eager, fused = _eager(name)(inputs), _fused(name)(inputs)
    eager, fused = (eager if isinstance(eager, tuple) else (eager,)), (fused if isinstance(fused, tuple) else (fused,))
    return max((e.float() - f.float()).abs().max().item() / max(e.float().abs().max().item(), 1.0)
               for e, f in zip(eager, fused))


def bench_case(case: Case) -> list[tuple[str, float, float, float]]:
    from triton.testing import do_bench

    inputs = case.make_inputs()
    rows = []
    base_memory = torch.cuda.memory_allocated()
    for impl, fn in (("eager", _eager(case.name)), ("compile", torch.compile(_eager(case.name))),
                     ("triton", _fused(case.name))):
        step = _forward_backward(fn, inputs)
        step()  # compiles the backward too, before do_bench sizes its repetitions from the first call
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        peak_gib = (torch.cuda.max_memory_allocated() - base_memory) / 2**30
        milliseconds = do_bench(step, warmup=25, rep=100)
        rows.append((impl, milliseconds, case.bytes_moved / milliseconds / 1e6, peak_gib))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192, help="rows = micro-batch x sequence (default 4 x 2048)")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--ops", nargs="*", default=None, help="subset of ops (default: all)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU (the Triton kernels are measured against eager and "
              "torch.compile on the device); nothing to measure here.")
        return 0
    dtype = DTYPES[args.dtype]
    cases = [c for c in make_cases(args.tokens, dtype) if args.ops is None or c.name in args.ops]
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | {args.dtype} | {args.tokens} tokens | "
          f"width {GPT3_WIDTH}, d_ff {4 * GPT3_WIDTH}, vocab {GPT3_VOCAB}")
    print(f"{'op':<24}{'impl':<9}{'fwd+bwd ms':>11}{'GB/s':>9}{'vs eager':>10}{'peak GiB':>10}")
    for case in cases:
        error = _check(case.name, case.make_inputs())
        rows = bench_case(case)
        eager_ms = rows[0][1]
        for impl, milliseconds, gbps, peak in rows:
            print(f"{case.name:<24}{impl:<9}{milliseconds:>11.3f}{gbps:>9.0f}{eager_ms / milliseconds:>9.2f}x"
                  f"{peak:>10.2f}")
        print(f"{'':<24}max relative difference triton vs eager (forward): {error:.2e}")
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
