"""Peak activation memory per pipeline stage: 1F1B against GPipe as the number of micro-batches grows.

    python benchmarks/pipeline_memory.py                       # pp=4, GPT 8 x 128, micro-batch 2 x 128
    python benchmarks/pipeline_memory.py --pp 2 --micro-batches 2 4 8 16 32

The micro-batch size is fixed and the global batch grows with the micro-batch count. Activation memory is
what autograd saves for backward (saved_tensors_hooks, counted once per storage, weights excluded), live at
the worst moment of one training step on each stage's rank; CPU gloo ranks, no timings involved. GPipe runs
every forward before any backward, so a stage holds all m micro-batches; 1F1B starts backwards after
pp - stage forwards, so it holds at most pp - stage, whatever m."""

from __future__ import annotations

import argparse

import torch
from torch import nn

from scaletrain.configs.schema import ParallelConfig, TrainerConfig
from scaletrain.models.registry import build_model, load_model_config
from scaletrain.parallel.dims import ParallelDims
from scaletrain.parallel.multiprocess import run_on_ranks
from scaletrain.parallel.pipeline import build_pipeline, n_microbatches, split_model


class ActivationMeter:
    """Bytes of tensors autograd holds for backward, by storage; `peak` is the high-water mark."""

    def __init__(self):
        self.live: dict[int, list] = {}  # storage pointer -> [bytes, references]
        self.current = self.peak = 0

    def pack(self, tensor: torch.Tensor):
        if isinstance(tensor, nn.Parameter) or (tensor.is_leaf and tensor.requires_grad):
            return tensor  # a weight, not an activation
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self.live:
            self.live[key][1] += 1
        else:
            self.live[key] = [storage.nbytes(), 1]
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
        return _Saved(self, key, tensor)

    def release(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, _unpack)


class _Saved:
    def __init__(self, meter: ActivationMeter, key: int, tensor: torch.Tensor):
        self.meter, self.key, self.tensor = meter, key, tensor

    def __del__(self):  # the graph that saved the tensor was freed (after its backward)
        self.meter.release(self.key)


def _unpack(saved):
    return saved.tensor if isinstance(saved, _Saved) else saved


def _peak_activation_bytes(rank, world_size, schedule, n_micro, args):
    parallel = ParallelConfig(pp=world_size, dp_shard=1, pp_schedule=schedule)
    dims = ParallelDims.from_config(parallel, world_size)
    dims.build_mesh("cpu")
    cfg = load_model_config("gpt_tiny", {"n_layers": args.layers, "d_model": args.width, "n_heads": 4,
                                         "max_seq_len": args.seq, "vocab_size": 512})
    parts = split_model(build_model(cfg, "meta"), cfg, parallel, dims.mesh["pp"].get_local_rank())
    for part in parts:
        part.to_empty(device="cpu")
        part.init_weights(0)
    trainer = TrainerConfig(global_batch=args.micro_batch * n_micro, micro_batch=args.micro_batch, seq_len=args.seq)
    pipe = build_pipeline(parts, cfg, parallel, n_microbatches(trainer, 1), dims)
    generator = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, 512, (trainer.global_batch, args.seq), generator=generator),
             "labels": torch.randint(0, 512, (trainer.global_batch, args.seq), generator=generator)}
    pipe.step(batch, batch["labels"].numel())  # warm-up: shape inference and buffers outside the count
    meter = ActivationMeter()
    with meter.hooks():
        pipe.step(batch, batch["labels"].numel())
    return meter.peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pp", type=int, default=4)
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    print(f"peak activation memory (MiB) per stage, pp={args.pp}, GPT {args.layers} layers x {args.width}, "
          f"micro-batch {args.micro_batch} x {args.seq} tokens")
    header = "  ".join(f"{'stage ' + str(s):>17}" for s in range(args.pp))
    print(f"{'micro-batches':>13}  {header}")
    print(f"{'':>13}  " + "  ".join(f"{'1F1B':>8} {'GPipe':>8}" for _ in range(args.pp)))
    for n_micro in args.micro_batches:
        peaks = {s: run_on_ranks(_peak_activation_bytes, args.pp, s, n_micro, args) for s in ("1f1b", "gpipe")}
        cells = "  ".join(f"{peaks['1f1b'][r] / 2**20:8.2f} {peaks['gpipe'][r] / 2**20:8.2f}" for r in range(args.pp))
        print(f"{n_micro:>13}  {cells}")


if __name__ == "__main__":
    main()
