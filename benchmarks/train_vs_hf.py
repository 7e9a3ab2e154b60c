"""Training throughput, MFU and peak memory: scaletrain's models vs Hugging Face transformers, per family.

Same architecture (the Hugging Face class and config that `scaletrain export` writes for the model, built by
models/hf.py), same batch, same AdamW (torch's fused kernel: the default of both scaletrain's trainer and Hugging
Face's Trainer), dropout off. Every measurement runs in a fresh worker process so its peak memory is its own
(CPU: peak RSS above the RSS right after building the model and the optimizer; CUDA: max_memory_allocated);
the parent alternates scaletrain and HF workers round by round so load drift on the machine hits both alike,
and reports the median tokens/s and the peak memory.

    python benchmarks/train_vs_hf.py [--rounds 2] [--steps 6] [--cases gpt bert t5]        # CPU, small shapes
    python benchmarks/train_vs_hf.py --preset gpu --precision bf16 --compile                 # one GPU

The gpu preset runs GPT-2 124M at sequence 1024, GPT-3 XL at 2048 (full recompute), BERT-large at 512 and
T5-base at 512/114. scaletrain's side is parallelize()d as in training (activation checkpointing, model.kernels,
model.attention); with --compile Hugging Face's model is torch.compile'd whole and scaletrain uses
model.kernels=compile (each block compiled). MFU = the model's training FLOPs (train/metrics.py, attention
included; the same formula for both sides, BERT counting the head positions each side scores) per second over
--peak-tflops (the data-sheet dense figure) and over a measured 8192^3 matmul of the same dtype."""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Case:
    family: str
    model: str  # scaletrain config name
    batch: int
    seq_len: int
    target_len: int = 0  # encoder-decoders: decoder length
    overrides: dict = field(default_factory=dict)
    recompute: str = "none"


SMALL = dict(vocab_size=8192, d_model=256, n_layers=4, n_heads=4, d_ff=1024, pad_vocab_multiple=64)
PRESETS = {
    "cpu": {
        "gpt": Case("gpt", "gpt2_124m", 8, 128, overrides=dict(SMALL, max_seq_len=128)),
        # BertForMaskedLM has neither pooler nor NSP head
        "bert": Case("bert", "bert_base", 8, 128, overrides=dict(SMALL, max_seq_len=128, pooler=False, nsp_head=False)),
        "t5": Case("t5", "t5_small", 8, 128, 32, overrides=dict(SMALL, n_decoder_layers=4, d_head=64)),
    },
    "gpu": {
        "gpt2_124m": Case("gpt", "gpt2_124m", 16, 1024),
        "gpt3_xl": Case("gpt", "gpt3_xl", 4, 2048, recompute="full"),
        "bert_large": Case("bert", "bert_large", 16, 512, overrides=dict(pooler=False, nsp_head=False)),
        "t5_base": Case("t5", "t5_base", 16, 512, 114),
    },
}


def model_config(case: Case, kernels: str):
    from scaletrain.models.registry import load_model_config

    return load_model_config(case.model, dict(case.overrides, dropout=0.0, attn_dropout=0.0, kernels=kernels))


def make_batch(case: Case, vocab: int, generator: torch.Generator) -> dict:
    ids = torch.randint(5, vocab, (case.batch, case.seq_len), generator=generator)
    if case.family == "gpt":
        return {"input_ids": ids, "labels": torch.roll(ids, -1, dims=1)}
    if case.family == "bert":
        labels = torch.where(torch.rand(ids.shape, generator=generator) < 0.15, ids, torch.full_like(ids, -100))
        return {"input_ids": ids, "labels": labels}
    targets = torch.randint(5, vocab, (case.batch, case.target_len), generator=generator)
    decoder_input_ids = torch.cat([torch.zeros_like(targets[:, :1]), targets[:, :-1]], dim=1)
    return {"input_ids": ids, "decoder_input_ids": decoder_input_ids, "labels": targets}


def scaletrain_step(case: Case, device: torch.device, kernels: str):
    from scaletrain.configs.schema import ParallelConfig
    from scaletrain.models.registry import get_spec
    from scaletrain.parallel.equivalence import build_parallel_model

    cfg = model_config(case, kernels)
    model, _, _ = build_parallel_model(cfg, ParallelConfig(), 1, seq_len=case.seq_len, global_batch=case.batch,
                                       device=str(device), activation_checkpointing=case.recompute)
    spec = get_spec(cfg.family)

    def step(batch):
        outputs = model(**{k: batch[k] for k in spec.input_keys if k in batch})
        loss_sum, count = spec.loss_fn(outputs, batch)
        return loss_sum / count
    return model, step, cfg


def hf_step(case: Case, device: torch.device, compile_model: bool):
    import transformers

    from scaletrain.models.hf import hf_class_for, to_hf_config

    cfg = model_config(case, "torch")
    config = to_hf_config(cfg)
    config._attn_implementation = "sdpa" if case.family != "t5" else "eager"  # T5 has no SDPA path in HF
    with torch.device(device):
        model = getattr(transformers, hf_class_for(cfg))(config)
    if case.recompute != "none":
        model.gradient_checkpointing_enable()
    forward = torch.compile(model) if compile_model else model

    def step(batch):
        if case.family == "gpt":  # HF shifts the labels itself: give it the unshifted ids
            return forward(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
        if case.family == "bert":
            return forward(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        return forward(input_ids=batch["input_ids"], decoder_input_ids=batch["decoder_input_ids"],
                       labels=batch["labels"]).loss
    return model, step, cfg


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def worker(case: Case, impl: str, steps: int, precision: str, compile_model: bool) -> dict:
    from scaletrain.train.metrics import batch_flops
    from scaletrain.train.precision import autocast

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    if impl == "scaletrain":
        model, step, cfg = scaletrain_step(case, device, "compile" if compile_model else "auto")
    else:
        model, step, cfg = hf_step(case, device, compile_model)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    generator = torch.Generator().manual_seed(0)
    batches = [{k: v.to(device) for k, v in make_batch(case, cfg.vocab_size, generator).items()}
               for _ in range(steps + 2)]
    baseline = _rss_bytes()
    timings = []
    for index, batch in enumerate(batches):  # two warm-up steps (compile, allocator, optimizer state)
        started = time.perf_counter()
        with autocast(precision, device.type):
            loss = step(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if index >= 2:
            timings.append(time.perf_counter() - started)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    counted = batches[0] if impl == "scaletrain" else {k: v for k, v in batches[0].items() if k != "labels"}
    seconds = statistics.median(timings)
    tokens = sum(v.numel() for k, v in batches[0].items() if k in ("input_ids", "decoder_input_ids"))
    return {"tokens_per_s": tokens / seconds, "flops_per_s": batch_flops(cfg, counted) / seconds, "peak_bytes": peak,
            "params": sum(p.numel() for p in model.parameters()), "loss": float(loss)}


def measured_matmul_tflops(precision: str) -> float:
    """The achieved rate of an 8192^3 matmul in the training dtype (the practical roof for MFU)."""
    if not torch.cuda.is_available():
        return 0.0
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * 8192**3 * 10 / (start.elapsed_time(end) / 1e3) / 1e12


def _run_worker(args, name: str, impl: str) -> dict:
    command = [sys.executable, __file__, "--preset", args.preset, "--steps", str(args.steps),
               "--precision", args.precision, "--worker", name, impl] + (["--compile"] if args.compile else [])
    out = subprocess.run(command, capture_output=True, text=True, timeout=args.worker_timeout)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1][:100]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(args, results: dict, matmul_tflops: float) -> None:
    print(f"{'case':<11} {'impl':<11} {'params':>13} {'tokens/s':>10} {'MFU':>6} {'MFU/mm':>7} {'peak MiB':>9}"
          f"   ratio (tokens/s, memory)")
    for name in args.cases:
        summary = {}
        for impl in ("scaletrain", "hf"):
            runs = [r for r in results[(name, impl)] if "error" not in r]
            if not runs:
                print(f"{name:<11} {impl:<11} failed: {results[(name, impl)][0]['error']}")
                continue
            speed = statistics.median(r["tokens_per_s"] for r in runs)
            flops = statistics.median(r["flops_per_s"] for r in runs) / 1e12
            summary[impl] = (speed, max(r["peak_bytes"] for r in runs))
            mfu = f"{flops / args.peak_tflops:>6.1%}" if args.peak_tflops else f"{'-':>6}"
            mfu_mm = f"{flops / matmul_tflops:>7.1%}" if matmul_tflops else f"{'-':>7}"
            print(f"{name:<11} {impl:<11} {runs[0]['params']:>13,} {speed:>10.0f} {mfu} {mfu_mm} "
                  f"{summary[impl][1] / 2**20:>9.0f}")
        if len(summary) == 2:
            print(f"{name:<11} {'ratio':<11} {'':>13} {summary['scaletrain'][0] / summary['hf'][0]:>9.2f}x "
                  f"{'':>6} {'':>7} {summary['scaletrain'][1] / max(summary['hf'][1], 1):>8.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="cpu")
    parser.add_argument("--cases", nargs="+", help="cases of the preset (default: all of them)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--compile", action="store_true", help="torch.compile both sides")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="data-sheet dense peak, for MFU")
    parser.add_argument("--worker-timeout", type=float, default=600.0)
    parser.add_argument("--worker", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        case = PRESETS[args.preset][args.worker[0]]
        print(json.dumps(worker(case, args.worker[1], args.steps, args.precision, args.compile)))
        return
    args.cases = args.cases or list(PRESETS[args.preset])
    unknown = sorted(set(args.cases) - set(PRESETS[args.preset]))
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)} for --preset {args.preset}: "
                     f"choose from {', '.join(PRESETS[args.preset])}")
    results = {(name, impl): [] for name in args.cases for impl in ("scaletrain", "hf")}
    for round_index in range(args.rounds):
        for name in args.cases:
            order = ("scaletrain", "hf") if round_index % 2 == 0 else ("hf", "scaletrain")
            for impl in order:
                results[(name, impl)].append(_run_worker(args, name, impl))
    report(args, results, measured_matmul_tflops(args.precision))


if __name__ == "__main__":
    main()
