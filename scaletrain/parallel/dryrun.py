"""Dry run at real scale: build one rank's shard of a model under a fake process group, on the meta device,
and report its per-rank memory for parameters, gradients and optimizer states, measured from the real
DTensor shards, next to the ZeRO paper's formulas (Rajbhandari et al. 2020, Fig. 1).

    scaletrain train model=gpt3_175b parallel.tp=8 parallel.dp_shard=128 parallel.zero=3 \\
        dry_run.world_size=1024 dry_run.rank=5

One CPU process, no real collectives (torch's "fake" backend answers them), no parameter memory (meta).
Formulas, with Psi parameters, N_d data-parallel ranks and Psi/tp per tensor-parallel rank (ZeRO with model
parallelism), P/G bytes per parameter/gradient element and K bytes of optimizer state per element
(mixed-precision Adam: P = G = 2, K = 12 = fp32 master + m + v; fp32 Adam: P = G = 4, K = 8):
    stage 0: (P + G + K) Psi      stage 1: (P + G) Psi + K Psi / N_d
    stage 2: P Psi + (G + K) Psi / N_d      stage 3: (P + G + K) Psi / N_d"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from scaletrain.configs.schema import TrainConfig
from scaletrain.errors import ConfigError
from scaletrain.parallel.dims import ParallelDims

log = logging.getLogger(__name__)


@dataclass
class MemoryReport:
    params: float  # bytes on this rank
    grads: float
    optimizer: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer


def bytes_per_element(precision: str, optimizer: str = "adamw", momentum: float = 0.0) -> tuple[int, int, int]:
    """(P, G, K): parameter, gradient and optimizer-state bytes per parameter element."""
    mixed = precision in ("bf16", "fp16")
    state = {"adamw": 8, "sgd": 4 if momentum > 0 else 0}[optimizer]  # fp32 moments
    return (2, 2, 4 + state) if mixed else (4, 4, state)  # mixed precision keeps an fp32 master copy


def zero_formula(psi: float, zero: int, dp: int, tp: int, sizes: tuple[int, int, int]) -> MemoryReport:
    P, G, K = sizes
    psi = psi / tp
    sharded = {0: (False, False, False), 1: (False, False, True), 2: (False, True, True), 3: (True, True, True)}
    p_sh, g_sh, k_sh = sharded[zero]
    return MemoryReport(P * psi / (dp if p_sh else 1), G * psi / (dp if g_sh else 1), K * psi / (dp if k_sh else 1))


def _local_numel(param: torch.Tensor) -> int:
    from torch.distributed.tensor import DTensor

    return param.to_local().numel() if isinstance(param, DTensor) else param.numel()


def _tp_local_numel(param: torch.Tensor, dims: ParallelDims) -> int:
    """Elements of the parameter on this tp rank before any dp sharding (what ZeRO <= 2 keeps gathered)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor) or "tp" not in (param.device_mesh.mesh_dim_names or ()):
        return param.numel()
    placement = param.placements[param.device_mesh.mesh_dim_names.index("tp")]
    if not placement.is_shard():
        return param.numel()
    size = param.shape[placement.dim]
    chunk = -(-size // dims.tp)
    local = max(0, min(chunk, size - dims.tp_rank * chunk))
    return param.numel() // size * local


def measure(model: nn.Module, optimizer: torch.optim.Optimizer, dims: ParallelDims,
            sizes: tuple[int, int, int]) -> MemoryReport:
    """Per-rank bytes from the shards parallelize() produced and the tensors the optimizer steps."""
    P, G, K = sizes
    params = list(model.parameters())
    persistent = sum(_local_numel(p) for p in params)  # sharded over dp under FSDP (ZeRO 2/3)
    gathered = sum(_tp_local_numel(p, dims) for p in params)
    # ZeRO-2 keeps the gathered parameters from forward to backward (reshard_after_forward=False).
    param_elements = persistent if dims.zero == 3 else gathered
    grad_elements = persistent  # FSDP reduce-scatters into sharded grads; replicate keeps full ones
    # What the optimizer steps, so what it will hold state for: ZeRO-1's row slices, else its parameters.
    zero_one = getattr(optimizer, "_zero_one", None)
    stepped = zero_one.slices.values() if zero_one else [p for g in optimizer.param_groups for p in g["params"]]
    state_elements = sum(_local_numel(p) for p in stepped)
    return MemoryReport(P * param_elements, G * grad_elements, K * state_elements)


def build_rank_model(cfg: TrainConfig, dims: ParallelDims) -> tuple[nn.Module, torch.optim.Optimizer, int]:
    """(sharded meta model, its optimizer, Psi = parameters of the whole padded model)."""
    from scaletrain.models.registry import build_model
    from scaletrain.parallel import padded_model_config, parallelize, shard_optimizer_state

    model_cfg = padded_model_config(cfg.model, dims.tp)
    model = build_model(model_cfg, "meta")
    psi = sum(p.numel() for p in model.parameters())  # tied weights once
    parallelize(model, dims, cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)  # no state until the first step
    shard_optimizer_state(optimizer, model, dims)
    return model, optimizer, psi


def _gib(n: float) -> str:
    return f"{n / 2**30:10.3f} GiB"


def format_report(cfg: TrainConfig, dims: ParallelDims, rank: int, psi: int, measured: MemoryReport,
                  formula: MemoryReport, seconds: float) -> str:
    coordinate = dict(zip(dims.mesh.mesh_dim_names, dims.mesh.get_coordinate())) if dims.mesh is not None else {}
    lines = [f"dry run: {cfg.model.name}, rank {rank} of {dims.world_size} at {coordinate}",
             f"  {dims.describe()}",
             f"  Psi = {psi / 1e9:.3f} B parameters (vocab padded to {cfg.model.padded_vocab_size(dims.tp)}), "
             f"precision {cfg.precision}, optimizer {cfg.optim.name}",
             f"  {'':<12}{'measured (shards)':>20}{'ZeRO formula':>20}{'ratio':>9}"]
    for name in ("params", "grads", "optimizer", "total"):
        m, f = getattr(measured, name), getattr(formula, name)
        lines.append(f"  {name:<12}{_gib(m):>20}{_gib(f):>20}{m / f if f else float('nan'):>9.4f}")
    lines.append(f"  built in {seconds:.1f} s")
    return "\n".join(lines)


def dry_run_report(cfg: TrainConfig) -> tuple[MemoryReport, MemoryReport, str]:
    """Builds this rank's shard under a fake process group; returns (measured, formula, printed text)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    world, rank = cfg.dry_run.world_size, cfg.dry_run.rank
    if world < 1:
        raise ConfigError("dry_run.world_size must be >= 1 for a dry run")
    dims = ParallelDims.from_config(cfg.parallel, world)
    _check_model_fits(cfg, dims)
    if dist.is_initialized():
        raise RuntimeError("a dry run needs a process without a process group")
    start = time.perf_counter()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        dims.build_mesh("cpu")
        model, optimizer, psi = build_rank_model(cfg, dims)
        sizes = bytes_per_element(cfg.precision, cfg.optim.name, cfg.optim.momentum)
        measured = measure(model, optimizer, dims, sizes)
        formula = zero_formula(psi, dims.zero, dims.dp_size, dims.tp, sizes)
        text = format_report(cfg, dims, rank, psi, measured, formula, time.perf_counter() - start)
    finally:
        dist.destroy_process_group()
    return measured, formula, text


def _check_model_fits(cfg: TrainConfig, dims: ParallelDims) -> None:
    m, p = cfg.model, cfg.parallel
    if dims.tp > m.n_heads or m.n_heads % dims.tp:
        raise ConfigError(f"model.n_heads={m.n_heads} is not divisible by parallel.tp={dims.tp}; lower tp")
    if m.ffn_dim % dims.tp:
        raise ConfigError(f"the FFN width {m.ffn_dim} is not divisible by parallel.tp={dims.tp}")
    if p.sequence_parallel and cfg.trainer.seq_len % dims.tp:
        raise ConfigError(f"trainer.seq_len={cfg.trainer.seq_len} is not divisible by parallel.tp={dims.tp} "
                          f"(sequence parallel is on)")


def run_dry_run(cfg: TrainConfig) -> int:
    """`scaletrain train ... dry_run.world_size=N dry_run.rank=R`: print the report, exit 0."""
    _, _, text = dry_run_report(cfg)
    print(text)
    return 0
