"""Communication volume of one training step, DDP (zero 0) against ZeRO-3, counted from the collectives
actually issued on 4 CPU gloo ranks, against the ZeRO paper's analysis (§7): DDP all-reduces the gradients
(a reduce-scatter + an all-gather: 2 Psi per rank), ZeRO-3 all-gathers the parameters in forward and again
in backward and reduce-scatters the gradients (3 Psi): 1.5x DDP.

    python benchmarks/zero_comm.py                    # GPT 6 x 256, dp=4
    python benchmarks/zero_comm.py --ranks 2 --layers 12

A TorchDispatchMode sees every c10d op (FSDP2 and replicate issue them through the dispatcher) and sums
its payload in the paper's units: the full size of an all-gather's output or a reduce-scatter's input, and
twice the size of an all-reduce (ring all-reduce = reduce-scatter + all-gather). The root module (token
embeddings and the tied head) is kept gathered from forward to backward (it is needed first in backward),
so ZeRO-3 lands slightly below 1.5x."""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from scaletrain.configs.schema import ParallelConfig
from scaletrain.models.registry import load_model_config
from scaletrain.parallel.equivalence import build_parallel_model
from scaletrain.parallel.multiprocess import run_on_ranks
from zero_memory import parse_gpt_args  # the sibling benchmark; scripts run from benchmarks/ see it

# op name -> (index of the tensor argument whose size is the payload, multiplier in units of Psi)
_PAYLOAD = {"allreduce_": (0, 2), "_allgather_base_": (0, 1), "allgather_into_tensor_coalesced_": (0, 1),
            "_reduce_scatter_base_": (1, 1), "reduce_scatter_tensor_coalesced_": (1, 1),
            "allgather_": (0, 1), "reduce_scatter_": (1, 1)}


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


class CollectiveBytes(TorchDispatchMode):
    """Sums the payload of every c10d collective issued while active, per op name."""

    def __init__(self):
        super().__init__()
        self.bytes, self.calls = Counter(), Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d":
            name = func._schema.name.split("::")[-1]
            if name in _PAYLOAD:
                index, multiplier = _PAYLOAD[name]
                self.bytes[name] += multiplier * _nbytes(args[index])
                self.calls[name] += 1
        return func(*args, **(kwargs or {}))


def _one_step(rank, world_size, model_overrides, zero):
    cfg = load_model_config("gpt_tiny", model_overrides)
    model, dims, _ = build_parallel_model(cfg, ParallelConfig(dp_shard=world_size, zero=zero), world_size)
    psi_bytes = sum(p.numel() for p in build_parallel_model(cfg, ParallelConfig(dp_shard=1), 1,
                                                            device="meta")[0].parameters()) * 4
    ids = torch.randint(0, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(rank))
    F.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()  # warm-up: FSDP's lazy init
    model.zero_grad()
    with CollectiveBytes() as counter:
        F.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
    return dict(counter.bytes), dict(counter.calls), psi_bytes


def main() -> None:
    args, overrides = parse_gpt_args(__doc__.splitlines()[0])
    totals = {}
    for zero, label in ((0, "DDP (zero 0)"), (3, "ZeRO-3")):
        payload, calls, psi_bytes = run_on_ranks(_one_step, args.ranks, overrides, zero)[0]
        totals[zero] = sum(payload.values())
        detail = ", ".join(f"{name} x{calls[name]}: {payload[name] / psi_bytes:.3f} Psi" for name in payload)
        print(f"{label:<13} {totals[zero] / psi_bytes:6.3f} Psi per step  ({detail})")
    print(f"ZeRO-3 / DDP = {totals[3] / totals[0]:.3f}   (theory 1.5)")


if __name__ == "__main__":
    main()
