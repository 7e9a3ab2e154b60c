"""Greedy decoding speed: scaletrain's `generate` with its KV cache, without it (the whole prefix recomputed
at every step), and Hugging Face `generate` on the same weights (the model `scaletrain export` writes, built
in memory by models/hf.py), side by side in one run. All three must produce the same tokens; the script
says so per case. Random weights, fixed prompts, no eos (every row decodes --new-tokens tokens).

    python benchmarks/generate.py [--cases gpt2_124m t5_small] [--batch 4] [--prompt-len 64] [--new-tokens 64]
    python benchmarks/generate.py --device cuda --cases gpt2_355m t5_base
"""

from __future__ import annotations

import argparse
import time

import torch

from scaletrain.inference.generate import GenerationConfig, generate
from scaletrain.models.hf import to_hf_model
from scaletrain.models.registry import build_model, load_model_config


def _best_times(runs: dict, device: torch.device, repeats: int) -> tuple[dict, dict]:
    """name -> (tokens of the last call, best seconds). One warm-up each, then round-robin rounds, so a
    change of load on the machine hits every contender alike."""
    results = {name: fn() for name, fn in runs.items()}
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, fn in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            results[name] = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best[name] = min(best[name], time.perf_counter() - started)
    return results, best


def run_case(name: str, args, device: torch.device) -> dict:
    cfg = load_model_config(name, {"dropout": 0.0, "attn_dropout": 0.0})
    model = build_model(cfg, device=device).eval()
    hf_model = to_hf_model(model)
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(5, cfg.vocab_size, (args.batch, args.prompt_len), generator=generator)
    start = cfg.pad_token_id if cfg.family == "encdec" else None  # T5's convention; any fixed id serves here
    ours = GenerationConfig(max_new_tokens=args.new_tokens, pad_token_id=cfg.pad_token_id, decoder_start_token_id=start)
    no_cache = GenerationConfig(**{**ours.__dict__, "use_cache": False})
    ids = prompts.to(device)

    def hf_generate():
        extra = {"decoder_start_token_id": start} if cfg.family == "encdec" else {}
        out = hf_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1,
                                max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, eos_token_id=None,
                                pad_token_id=cfg.pad_token_id, use_cache=True, **extra)
        return out[:, (1 if cfg.family == "encdec" else ids.shape[1]):].tolist()

    runs = {"cached": lambda: generate(model, prompts.tolist(), ours),
            "no_cache": lambda: generate(model, prompts.tolist(), no_cache), "hf": hf_generate}
    with torch.inference_mode():
        tokens, seconds = _best_times(runs, device, args.repeats)
    rates = {key: args.batch * args.new_tokens / value for key, value in seconds.items()}
    return {"case": name, **rates, "same_tokens": tokens["cached"] == tokens["no_cache"] == tokens["hf"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=["gpt2_124m", "t5_small"], help="configs/model presets")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"greedy decoding, batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"{device}, torch {torch.__version__}, {torch.get_num_threads()} threads; tokens/s (best of {args.repeats})")
    print(f"{'case':<12} {'cache':>9} {'no cache':>9} {'HF':>9} {'cache/no':>9} {'cache/HF':>9}  same tokens")
    for name in args.cases:
        r = run_case(name, args, device)
        print(f"{r['case']:<12} {r['cached']:>9.1f} {r['no_cache']:>9.1f} {r['hf']:>9.1f} "
              f"{r['cached'] / r['no_cache']:>8.2f}x {r['cached'] / r['hf']:>8.2f}x  {'yes' if r['same_tokens'] else 'NO'}")


if __name__ == "__main__":
    main()
