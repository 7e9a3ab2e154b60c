"""Per-rank bytes of parameters, gradients and optimizer states at ZeRO 0/1/2/3, measured on 4 CPU gloo
ranks, against the ZeRO paper's formulas (fp32 AdamW: P = G = 4, K = 8 bytes per element).

    python benchmarks/zero_memory.py                 # GPT 6 x 256, dp=4
    python benchmarks/zero_memory.py --ranks 2 --d-model 128

Measured on the real tensors of one training step, each storage counted once:
- parameters right after forward (ZeRO-2 keeps the gathered parameters until backward; ZeRO-3 frees them),
- gradients right after backward (FSDP reduce-scatters them into shards),
- optimizer state right after the step (ZeRO-1 keeps only this rank's slices)."""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from scaletrain.configs.schema import ParallelConfig
from scaletrain.models.registry import load_model_config
from scaletrain.parallel.dryrun import bytes_per_element, zero_formula
from scaletrain.parallel.equivalence import build_parallel_model
from scaletrain.parallel.multiprocess import run_on_ranks
from scaletrain.parallel import shard_optimizer_state


def _bytes(tensors) -> int:
    seen, total = set(), 0
    for tensor in tensors:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        storage = local.untyped_storage()
        if local.numel() and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def _measure(rank, world_size, model_overrides, zero):
    cfg = load_model_config("gpt_tiny", model_overrides)
    model, dims, _ = build_parallel_model(cfg, ParallelConfig(dp_shard=world_size, zero=zero), world_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    shard_optimizer_state(optimizer, model, dims)
    ids = torch.randint(0, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(rank))
    logits = model(ids)
    param_bytes = _bytes(model.parameters())  # after forward: ZeRO-2 still holds the gathered weights
    F.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
    grad_bytes = _bytes(p.grad for p in model.parameters() if p.grad is not None)
    optimizer.step()
    state_bytes = _bytes(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())
    psi = sum(p.numel() for p in build_parallel_model(cfg, ParallelConfig(dp_shard=1), 1, device="meta")[0].parameters())
    return param_bytes, grad_bytes, state_bytes, psi


def parse_gpt_args(description: str) -> tuple[argparse.Namespace, dict]:
    """The ZeRO benchmarks' shared command line: ranks and the GPT's size -> (args, model overrides)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    args = parser.parse_args()
    return args, {"d_model": args.d_model, "n_layers": args.layers, "n_heads": 4, "max_seq_len": 64}


def main() -> None:
    args, overrides = parse_gpt_args(__doc__.splitlines()[0])
    sizes = bytes_per_element("fp32", "adamw")
    print(f"GPT d_model={args.d_model} x {args.layers} layers, dp={args.ranks}, fp32 AdamW "
          f"(P, G, K = {sizes}); bytes on rank 0")
    print(f"{'zero':>4} {'part':<10}{'measured':>14}{'formula':>14}{'ratio':>8}")
    for zero in range(4):
        params, grads, states, psi = run_on_ranks(_measure, args.ranks, overrides, zero)[0]
        formula = zero_formula(psi, zero, args.ranks, 1, sizes)
        for part, measured in (("params", params), ("grads", grads), ("optimizer", states),
                               ("total", params + grads + states)):
            expected = getattr(formula, part)
            print(f"{zero:>4} {part:<10}{measured:>14,d}{int(expected):>14,d}{measured / expected:>8.3f}")


if __name__ == "__main__":
    main()
