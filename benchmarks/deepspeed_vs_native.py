"""parallel.engine=deepspeed against the native engine (FSDP2) on 2 gloo CPU ranks, side by side: per-rank
peak host memory and median step time at ZeRO 2 and 3 with CPU offload of the optimizer state (DeepSpeed:
ZeRO-Offload with its CPU Adam; native: FSDP2's CPUOffloadPolicy with torch's fused AdamW), and DeepSpeed's
ZeRO-Infinity (offload=nvme, parameters and optimizer state in parallel.offload_dir) against the size of the
model's optimizer state.

Peak host memory is the process's peak resident set while it trains (VmHWM, reset once the trainer is
built, so a one-off peak while DeepSpeed partitions a materialized model is reported apart as "setup")
minus its resident set just before the trainer is built (torch and, for DeepSpeed, deepspeed imported, the prepared data opened, torch's CPU
kernels loaded), so it is what the run itself added: model states, activations, buffers. Every case runs
in fresh processes, with glibc's mmap threshold fixed so that freed tensors leave the resident set.

    python benchmarks/deepspeed_vs_native.py [--d-model 256] [--layers 8] [--vocab 16384] [--steps 6]
        [--seq-len 128] [--micro-batch 2] [--offload-dir /tmp/scaletrain-nvme] [--cases all|nvme]

Under NVMe offload DeepSpeed still keeps per rank an fp32 gradient partition of the whole model (half the
rank's Adam state), buffers sized to the largest parameter's partition (parallel/deepspeed.py's
size_nvme_buffers) and the activations of one micro-batch: its host memory gets below the optimizer state
where the layers, not the embedding, hold the parameters and a micro-batch's tokens are few next to d_model,
e.g. `--d-model 1024 --layers 16 --vocab 4096 --seq-len 64 --micro-batch 1 --steps 3 --cases nvme`."""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))

from scaletrain.parallel.multiprocess import run_on_ranks  # noqa: E402


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_bytes() -> int:
    """The peak resident set (VmHWM), which /proc/self/clear_refs can reset, unlike ru_maxrss."""
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def _warm_up(overrides) -> None:
    """What every run holds before its model exists, so it stays out of the figure: the prepared data
    (memory-mapped), and torch's CPU kernels loaded by a first forward + backward."""
    import torch

    from scaletrain.configs.store import compose_config
    from scaletrain.data.prepare import build_datasets

    build_datasets(compose_config(overrides), progress=False)
    layer = torch.nn.Linear(64, 64)
    torch.nn.functional.cross_entropy(layer(torch.randn(8, 64)), torch.zeros(8, dtype=torch.long)).backward()


def _measure(rank, world_size, run_dir, overrides, engine):
    from train_utils import make_trainer

    if engine == "deepspeed":
        from scaletrain.parallel.deepspeed import import_deepspeed

        import_deepspeed("cpu")
    _warm_up(overrides)
    before = _rss_bytes()
    trainer = make_trainer(run_dir, overrides)
    setup_peak, after_setup = _peak_bytes(), _rss_bytes()
    with open("/proc/self/clear_refs", "w") as handle:  # "5": reset the peak resident set to the current one
        handle.write("5")
    times = []
    original = trainer.train_step

    def timed(micro_batches):
        started = time.perf_counter()
        metrics = original(micro_batches)
        times.append(time.perf_counter() - started)
        return metrics

    trainer.train_step = timed
    trainer.train()
    peak = _peak_bytes()
    params = sum(getattr(p, "ds_numel", None) or p.numel() for p in trainer.model.parameters())
    return {"peak_added": peak - before, "peak": peak, "setup_added": setup_peak - before, "kept_after_setup": after_setup - before, "step_s": statistics.median(times[1:]), "params": params,
            "loss": trainer.losses[-1]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=2, help="per rank; a step is one micro-batch per rank")
    parser.add_argument("--offload-dir", default=None, help="the NVMe folder (default: a temporary folder)")
    parser.add_argument("--cases", choices=("all", "nvme"), default="all",
                        help="nvme: only ZeRO-Infinity against the optimizer state's size (no engine comparison)")
    args = parser.parse_args(argv)
    # glibc raises its mmap threshold after the first large free (up to 32 MiB), after which freed tensors
    # stay resident in the heap and the resident set stops saying what is live: fix it, for the workers
    # (the forkserver starts with this environment)
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    from train_utils import tiny_overrides

    base = tiny_overrides("gpt", f"model.d_model={args.d_model}", f"model.n_layers={args.layers}",
                          f"model.vocab_size={args.vocab}", f"model.max_seq_len={args.seq_len}", f"trainer.seq_len={args.seq_len}",
                          f"trainer.max_steps={args.steps}", f"trainer.global_batch={2 * args.micro_batch}",
                          f"trainer.micro_batch={args.micro_batch}",
                          "parallel.dp_shard=2", "checkpoint.save_final=false", "trainer.log_every=1000")
    offload_dir = args.offload_dir or tempfile.mkdtemp(prefix="scaletrain-nvme-")
    cases = [(f"zero{z} offload=cpu", engine, [f"parallel.zero={z}", "parallel.offload=cpu"])
             for z in (2, 3) for engine in ("native", "deepspeed") if args.cases == "all"]
    cases.append(("zero3 offload=nvme", "deepspeed", ["parallel.zero=3", "parallel.offload=nvme",
                                                      f"parallel.offload_dir={offload_dir}"]))
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for index, (name, engine, extra) in enumerate(cases):
            overrides = base + extra + [f"parallel.engine={engine}"]
            per_rank = run_on_ranks(_measure, 2, Path(scratch) / str(index), overrides, engine)
            rows.append((name, engine, per_rank))
    params = rows[0][2][0]["params"]
    adam_state = params * 8  # exp_avg + exp_avg_sq in fp32
    print(f"GPT d_model={args.d_model} layers={args.layers} vocab={args.vocab}: {params / 1e6:.2f}M parameters; "
          f"AdamW state {adam_state / 2**20:.0f} MiB (fp32 m + v), {adam_state / 2 / 2**20:.0f} MiB per rank at dp 2")
    print("peak host MiB added: the training steps' peak resident set minus the one before the trainer existed; "
          "setup: the peak while the trainer was built / what it kept")
    print(f"{'case':<20}{'engine':<11}{'peak host MiB added, rank 0 / 1 (rank 0 setup: peak / kept)':>58}{'step s, rank 0':>16}{'final loss':>12}")
    for name, engine, per_rank in rows:
        memory = " / ".join(f"{r['peak_added'] / 2**20:.0f}" for r in per_rank)
        memory += f" ({per_rank[0]['setup_added'] / 2**20:.0f} / {per_rank[0]['kept_after_setup'] / 2**20:.0f})"
        print(f"{name:<20}{engine:<11}{memory:>58}{per_rank[0]['step_s']:>16.3f}{per_rank[0]['loss']:>12.4f}")
    for zero in (2, 3) if args.cases == "all" else ():
        native, ours = (next(r for n, e, r in rows if n == f"zero{zero} offload=cpu" and e == engine)
                        for engine in ("native", "deepspeed"))
        print(f"zero{zero} offload=cpu, deepspeed / native: peak host memory x"
              f"{ours[0]['peak_added'] / native[0]['peak_added']:.2f}, step time x{ours[0]['step_s'] / native[0]['step_s']:.2f}")
    nvme = rows[-1][2]
    worst, per_rank_state = max(r["peak_added"] for r in nvme), adam_state / 2
    print(f"zero3 offload=nvme: peak host memory added {worst / 2**20:.0f} MiB per rank (setup peak "
          f"{max(r['setup_added'] for r in nvme) / 2**20:.0f}) "
          f"{'<' if worst < per_rank_state else '>='} the rank's optimizer state {per_rank_state / 2**20:.0f} MiB "
          f"({'below' if worst < per_rank_state else 'NOT below'}; the whole model's: {adam_state / 2**20:.0f} MiB); "
          f"swap files in {offload_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
