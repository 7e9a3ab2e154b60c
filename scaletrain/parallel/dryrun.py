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
    full_elements: int = 0  # the rank's parameter elements on its tp shard before any dp sharding

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer


def bytes_per_element(precision: str, optimizer: str = "adamw", momentum: float = 0.0) -> tuple[int, int, int]:
    """(P, G, K): parameter, gradient and optimizer-state bytes per parameter element."""
    mixed = precision in ("bf16", "fp16")
    state = {"adamw": 8, "sgd": 4 if momentum > 0 else 0}[optimizer]  # fp32 moments
    return (2, 2, 4 + state) if mixed else (4, 4, state)  # mixed precision keeps an fp32 master copy


def zero_formula(psi: float, zero: int, n_d: int, tp: int, sizes: tuple[int, int, int]) -> MemoryReport:
    """psi: the parameters this rank's pipeline stages hold (their whole tensors, before tp); n_d: the
    degree the ZeRO stage shards over (dp_shard for ZeRO 2/3, HSDP included; every dp rank for ZeRO-1)."""
    P, G, K = sizes
    psi = psi / tp
    sharded = {0: (False, False, False), 1: (False, False, True), 2: (False, True, True), 3: (True, True, True)}
    p_sh, g_sh, k_sh = sharded[zero]
    return MemoryReport(P * psi / (n_d if p_sh else 1), G * psi / (n_d if g_sh else 1), K * psi / (n_d if k_sh else 1))


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
    return MemoryReport(P * param_elements, G * grad_elements, K * state_elements, gathered)


def build_rank_model(cfg: TrainConfig, dims: ParallelDims) -> tuple[nn.Module, torch.optim.Optimizer]:
    """This rank's sharded meta model exactly as training builds it: parallelize() returns, with pp > 1, the
    PipelineModel of the rank's stages (each with TP, checkpointing and FSDP applied); and its optimizer."""
    from scaletrain.models.registry import build_model
    from scaletrain.parallel import padded_model_config, parallelize, shard_optimizer_state

    model = parallelize(build_model(padded_model_config(cfg.model, dims.tp), "meta"), dims, cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)  # no state until the first step
    shard_optimizer_state(optimizer, model, dims)
    return model, optimizer


def rank_layout(cfg: TrainConfig, dims: ParallelDims):
    """The planner's Layout of this run (plan/memory.py), for its formulas and estimates."""
    from scaletrain.plan.memory import Layout

    p, t = cfg.parallel, cfg.trainer
    split = tuple(p.pp_split) if p.pp_split is not None else None
    return Layout(tp=dims.tp, pp=dims.pp, dp=dims.dp_size, pp_virtual=p.pp_virtual if dims.pp_enabled else 1,
                  zero=dims.zero, micro_batch=t.micro_batch, recompute=t.activation_checkpointing,
                  sequence_parallel=p.sequence_parallel and dims.tp_enabled, pp_schedule=p.pp_schedule,
                  dp_replicate=dims.dp_replicate, pp_split=split)


def _coordinate(dims: ParallelDims, name: str) -> int:
    names = dims.mesh.mesh_dim_names if dims.mesh is not None else ()
    return dims.mesh[name].get_local_rank() if name in names else 0


def shard_index(dims: ParallelDims) -> int:
    """This rank's index among the Layout.shard_degree ranks ZeRO cuts its tensors over."""
    return dims.dp_rank if dims.zero == 1 else _coordinate(dims, "dp_shard") if dims.zero >= 2 else 0


def held_stages(model: nn.Module, model_cfg) -> str:
    """Which pipeline stages (and layers) this rank holds."""
    stages = getattr(model, "stages", None)
    if not stages:
        return "the whole model (no pipeline)"
    parts = []
    for stage in stages:
        plan = stage.plan
        ranges = []
        for stack, keys in plan.layer_keys(model_cfg.family).items():
            if keys:
                ranges.append(f"{'' if stack == 'layers' else stack + ' '}layers {keys[0]}-{keys[-1]}")
        ends = (["embeddings"] if plan.is_first else []) + (["head + loss"] if plan.is_last else [])
        parts.append(f"stage {plan.index} of {plan.num_stages} ({', '.join(ranges + ends)})")
    return "; ".join(parts)


def _size(n: float, unit: str) -> str:
    return f"{n / {'GiB': 2**30, 'MiB': 2**20}[unit]:10.3f} {unit}"


def _row(name: str, measured: float, reference: float, unit: str = "GiB") -> str:
    ratio = measured / reference if reference else float("nan")
    return f"  {name:<22}{_size(measured, unit):>18}{_size(reference, unit):>18}{ratio:>9.4f}"


@dataclass
class DryRunResult:
    measured: MemoryReport
    formula: MemoryReport
    text: str
    psi_rank: float = 0.0  # parameters of this rank's stages (whole tensors)
    activations: object = None  # ActivationReport, or None when not measured
    planner: object = None  # plan.memory.MemoryEstimate of this rank
    fsdp_buffers: float = 0.0  # gathered layers and the unsharded gradient accumulation, from the shards
    peak: float = 0.0


def dry_run(cfg: TrainConfig, activations: bool = True) -> DryRunResult:
    """Builds this rank's shard under a fake process group, measures it, and compares with the formulas."""
    import torch.distributed as dist
    from torch.distributed.tensor.debug import _clear_sharding_prop_cache
    from torch.testing._internal.distributed.fake_pg import FakeStore

    world, rank = cfg.dry_run.world_size, cfg.dry_run.rank
    if world < 1:
        raise ConfigError("dry_run.world_size must be >= 1 for a dry run")
    dims = ParallelDims.from_config(cfg.parallel, world)
    _check_model_fits(cfg, dims)
    microbatches = _microbatches(cfg, dims)
    if dist.is_initialized():
        raise RuntimeError("a dry run needs a process without a process group")
    start = time.perf_counter()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        dims.build_mesh("cpu")
        model, optimizer = build_rank_model(cfg, dims)
        built = time.perf_counter() - start
        sizes = bytes_per_element(cfg.precision, cfg.optim.name, cfg.optim.momentum)
        measured = measure(model, optimizer, dims, sizes)
        result = _compare(cfg, dims, model, measured, sizes, microbatches, activations)
        result.text = format_report(cfg, dims, model, result, built)
    finally:
        dist.destroy_process_group()
        # DTensor's sharding caches compare meshes by value: a later dry run in this process would get output
        # specs whose mesh names the process groups just destroyed
        _clear_sharding_prop_cache()
    return result


def _microbatches(cfg: TrainConfig, dims: ParallelDims) -> int:
    from scaletrain.parallel.pipeline import n_microbatches

    if dims.pp_enabled:  # the schedule needs them: the same rules as training
        return n_microbatches(cfg.trainer, dims.dp_size)
    return max(1, cfg.trainer.global_batch // (dims.dp_size * cfg.trainer.micro_batch))


def _compare(cfg: TrainConfig, dims: ParallelDims, model: nn.Module, measured: MemoryReport, sizes, microbatches: int,
             activations: bool) -> DryRunResult:
    from scaletrain.parallel.dryrun_activations import measure_rank_activations, scored_positions
    from scaletrain.plan.memory import rank_state_elements, stage_memory, stage_tensors
    from scaletrain.plan.memory_buffers import accumulation_bytes, fsdp_gather_bytes
    from scaletrain.plan.memory_xlnet import plm_num_predict

    layout = rank_layout(cfg, dims)
    pp_rank = _coordinate(dims, "pp")
    psi_rank = sum(t.numel for t in stage_tensors(cfg.model, layout, pp_rank))  # the planner's inventory
    formula = zero_formula(psi_rank, dims.zero, layout.shard_degree, dims.tp, sizes)
    result = DryRunResult(measured, formula, "", psi_rank)
    if not activations:
        return result
    model_cfg = model.stages[0].cfg if getattr(model, "stages", None) else model.cfg
    result.activations = measure_rank_activations(cfg, model_cfg, dims, model, microbatches)
    elements = rank_state_elements(cfg.model, layout, pp_rank, dims.tp_rank, shard_index(dims))
    seq = cfg.trainer.seq_len
    scored = 1.0 if dims.pp_enabled else scored_positions(cfg, seq) / seq  # BERT's MLM head without pp
    # the planner for the kernels the CPU ran: float dropout masks, SDPA's math path (s x s) with dropout
    num_predict = plm_num_predict(seq, cfg.data.plm_k, cfg.data.plm_max_span)  # XLNet's query-stream rows
    result.planner = stage_memory(cfg.model, layout, seq, microbatches * dims.dp_size * layout.micro_batch, pp_rank,
                                  cfg.precision, cfg.model.attn_dropout > 0, elements, device="cpu", scored=scored,
                                  num_predict=num_predict)
    result.fsdp_buffers = (accumulation_bytes(layout, measured.full_elements, microbatches, cfg.precision)
                           + fsdp_gather_bytes(layout, measured.full_elements,
                                               sum(result.activations.layers.values()), cfg.precision))
    result.peak = measured.total + result.activations.peak + result.fsdp_buffers
    return result


def format_report(cfg: TrainConfig, dims: ParallelDims, model: nn.Module, r: DryRunResult, seconds: float) -> str:
    coordinate = dict(zip(dims.mesh.mesh_dim_names, dims.mesh.get_coordinate())) if dims.mesh is not None else {}
    from scaletrain.plan.memory import parameter_inventory

    model_cfg = model.stages[0].cfg if getattr(model, "stages", None) else model.cfg
    psi = sum(t.numel for t in parameter_inventory(cfg.model, dims.tp))  # tied weights once
    n_d = rank_layout(cfg, dims).shard_degree  # N_d: ZeRO-1 over every dp rank, FSDP over dp_shard
    lines = [f"dry run: {cfg.model.name}, rank {cfg.dry_run.rank} of {dims.world_size} at {coordinate}",
             f"  {dims.describe()}",
             f"  holds {held_stages(model, model_cfg)}",
             f"  Psi = {psi / 1e9:.3f} B parameters (vocab padded to {cfg.model.padded_vocab_size(dims.tp)}); this "
             f"rank's stages {r.psi_rank / 1e9:.3f} B, /tp={dims.tp}, N_d={n_d}; precision {cfg.precision}, "
             f"optimizer {cfg.optim.name}",
             f"  {'':<22}{'measured (shards)':>18}{'ZeRO formula':>18}{'ratio':>9}"]
    unit = "GiB" if r.measured.total > 2**30 else "MiB"
    for name in ("params", "grads", "optimizer", "total"):
        lines.append(_row(name if name != "total" else "model states", getattr(r.measured, name),
                          getattr(r.formula, name), unit))
    lines.append(f"  built in {seconds:.1f} s")
    if r.activations is not None:
        lines += _activation_lines(cfg, dims, r, "GiB" if r.peak > 2**30 else "MiB")
    return "\n".join(lines)


def _activation_lines(cfg: TrainConfig, dims: ParallelDims, r: DryRunResult, unit: str) -> list[str]:
    a, plan, t = r.activations, r.planner, cfg.trainer
    heads = cfg.model.n_heads // dims.tp
    width = f"b={t.micro_batch} s={t.seq_len}{'/tp' if cfg.parallel.sequence_parallel and dims.tp_enabled else ''}" \
            f" d={cfg.model.d_model}, {heads} of {cfg.model.n_heads} heads, ffn {cfg.model.ffn_dim // dims.tp}"
    blocks = ", ".join(f"{stack} block {m.kept / 2**20:.1f} MiB x {a.layers[stack]}" for stack, m in a.per_block.items())
    schedule = cfg.parallel.pp_schedule if dims.pp_enabled else "no pipeline"
    lines = [f"  activations, one micro-batch measured on CPU ({width}, recompute={t.activation_checkpointing}): "
             f"{blocks}; ends {(a.first_end.kept + a.last_end.kept) / 2**20:.1f} MiB",
             f"  {a.in_flight:.2f} micro-batches in flight at the peak ({schedule}, {a.microbatches} micro-batches); "
             f"measured in {a.seconds:.1f} s",
             f"  {'':<22}{'measured':>18}{'planner':>18}{'ratio':>9}",
             _row("params", r.measured.params, plan.params, unit), _row("grads", r.measured.grads, plan.grads, unit),
             _row("optimizer", r.measured.optimizer, plan.optimizer, unit),
             _row("activations", a.kept_peak, plan.activations, unit),
             _row("transient + FSDP", a.transient + r.fsdp_buffers, plan.buffers, unit),
             _row("peak total", r.peak, plan.total, unit)]
    capacity = cfg.cluster.memory_gb * 2**30
    lines.append(f"  peak {r.peak / 2**30:.1f} GiB of {cfg.cluster.memory_gb:g} GiB on {cfg.cluster.accelerator} "
                 f"({r.peak / capacity:.0%}){'' if r.peak <= capacity else ': DOES NOT FIT'}")
    return lines


def dry_run_report(cfg: TrainConfig, activations: bool = False) -> tuple[MemoryReport, MemoryReport, str]:
    """(measured, formula, printed text) of this rank's model states (activations measured on request)."""
    result = dry_run(cfg, activations)
    return result.measured, result.formula, result.text


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
    print(dry_run(cfg).text)
    return 0
