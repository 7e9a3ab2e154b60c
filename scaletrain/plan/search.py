"""Enumerate the layouts a cluster allows, keep those that fit in memory, rank them by step time.

The search space (Narayanan et al. 2021, sec. 3, takeaways): tp within a node, pp over layers, interleaved
virtual stages, dp with the rest; ZeRO 0-3; the micro batch; recompute none / selective / full; sequence
parallelism whenever tp > 1 is worth trying (same traffic as TP, activations /t)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

from scaletrain.configs.schema import ClusterConfig, ModelConfig
from scaletrain.errors import UserError
from scaletrain.plan.memory import (GIB, Layout, MemoryEstimate, count_parameters, peak_memory,
                                    rank_state_elements, stage_parameters, state_bytes_per_param, total_layers)
from scaletrain.plan.timing import TimeEstimate, step_time

# Part of a device's memory a run cannot use: the CUDA context, NCCL buffers and the caching allocator's
# fragmentation (PyTorch's memory docs; ~5-8 GiB of an 80 GiB A100 in Megatron-LM and torchtitan logs).
USABLE_MEMORY_FRACTION = 0.92
RECOMPUTE_MODES = ("none", "selective", "full")
MAX_MICRO_BATCH = 64


class InfeasiblePlanError(UserError):
    pass


@dataclass
class PlanRequest:
    model: ModelConfig
    cluster: ClusterConfig
    nodes: int
    devices_per_node: int
    global_batch: int
    seq_len: int
    precision: str = "bf16"
    scores_stored: bool = False  # False: fused attention (SDPA flash) keeps no s x s scores
    grad_reduce_bytes: int = 4
    dp_overlap: float = 0.5
    fixed: Dict[str, object] = field(default_factory=dict)  # pin Layout fields, e.g. {"tp": 8, "pp": 8}

    @property
    def devices(self) -> int:
        return self.nodes * self.devices_per_node

    @property
    def usable_bytes(self) -> float:
        return self.cluster.memory_gb * GIB * USABLE_MEMORY_FRACTION


@dataclass
class Plan:
    layout: Layout
    memory: MemoryEstimate
    time: TimeEstimate
    request: PlanRequest

    @property
    def tokens_per_s(self) -> float:
        return self.request.global_batch * self.request.seq_len / self.time.step_s

    @property
    def mfu(self) -> float:
        """Model FLOPs (no recompute) per second over the devices' peak."""
        peak = self.request.cluster.peak_tflops(self.request.precision) * 1e12 * self.request.devices
        return self.time.model_flops / self.time.step_s / peak

    @property
    def achieved_tflops(self) -> float:
        """Hardware FLOP/s per device, recompute included (how Narayanan et al. report throughput)."""
        return self.time.hardware_flops / self.time.step_s / self.request.devices / 1e12

    def days(self, tokens: float) -> float:
        return tokens / self.tokens_per_s / 86400

    def gpu_hours(self, tokens: float) -> float:
        return self.days(tokens) * 24 * self.request.devices


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def enumerate_layouts(request: PlanRequest) -> Iterator[Layout]:
    cfg, n = request.model, request.devices
    layers = total_layers(cfg)
    node = request.devices_per_node
    fixed = request.fixed
    # No sequence parallelism for XLNet (configs/schema.py refuses it): the SP plan shards one residual stream
    # (a block's first input) over the sequence, but an XLNet block carries two, the content stream over T
    # and the query stream over M = num_predict rows (which need not divide by tp), and its relative attention
    # reads every position's keys and the (B, T, T) masks whole.
    sequence_parallel_plan = cfg.family != "xlnet"
    for tp in _divisors(min(node, n)):
        if cfg.n_heads % tp or cfg.ffn_dim % tp:
            continue
        for pp in _divisors(n // tp):
            dp = n // (tp * pp)
            if layers % pp or request.global_batch % dp:
                continue
            per_rank = request.global_batch // dp
            virtuals = [v for v in (1, 2, 4) if pp > 1 and layers % (pp * v) == 0] or [1]
            micro_batches = [b for b in _divisors(per_rank) if b <= MAX_MICRO_BATCH]
            for v in virtuals:
                for b in micro_batches:
                    if v > 1 and (per_rank // b) % pp:  # interleaved 1F1B wants micro-batches in multiples of pp
                        continue
                    for zero in (range(4) if dp > 1 else (0,)):
                        for recompute in RECOMPUTE_MODES:
                            sp_choices = (False, True) if tp > 1 and request.seq_len % tp == 0 else (False,)
                            for sp in sp_choices if sequence_parallel_plan else (False,):
                                layout = Layout(tp, pp, dp, v, zero, b, recompute, sp,
                                                "interleaved_1f1b" if v > 1 else "1f1b")
                                if all(getattr(layout, k) == val for k, val in fixed.items()):
                                    yield layout


def evaluate(request: PlanRequest, layout: Layout, cache: Optional[dict] = None) -> Plan:
    cache = {} if cache is None else cache
    elements = {}
    for stage in {0, layout.pp - 1}:
        key = (layout.tp, layout.pp, layout.pp_virtual, layout.dp, layout.zero, stage)
        if key not in cache:
            cache[key] = rank_state_elements(request.model, layout, stage)
        elements[stage] = cache[key]
    memory = peak_memory(request.model, layout, request.seq_len, request.global_batch, request.precision,
                         request.scores_stored, elements, request.cluster.device)
    params_key = (layout.tp, layout.pp, layout.pp_virtual, "params")
    if params_key not in cache:
        cache[params_key] = stage_parameters(request.model, layout, 0)
    time = step_time(request.model, layout, request.cluster, request.global_batch, request.seq_len,
                     request.precision, request.grad_reduce_bytes, request.scores_stored, request.dp_overlap,
                     cache[params_key])
    return Plan(layout, memory, time, request)


def search(request: PlanRequest, top: int = 5) -> List[Plan]:
    """The `top` fastest layouts that fit; raises InfeasiblePlanError with the reason when none does."""
    _check_model_states_fit(request)
    cache: dict = {}
    candidates = [evaluate(request, layout, cache) for layout in enumerate_layouts(request)]
    if not candidates:
        raise InfeasiblePlanError(_no_layout_reason(request))
    feasible = [p for p in candidates if p.memory.total <= request.usable_bytes]
    if not feasible:
        leanest = min(candidates, key=lambda p: p.memory.total)
        raise InfeasiblePlanError(
            f"no layout fits: the leanest ({describe(leanest.layout)}) needs {leanest.memory.total / GIB:.1f} GiB "
            f"per device of {request.usable_bytes / GIB:.1f} usable on {request.cluster.accelerator}; "
            f"add nodes or lower trainer.seq_len / trainer.global_batch")
    feasible.sort(key=lambda p: (p.time.step_s, p.memory.total))
    # Show distinct layouts: only the best micro batch of each (degrees, ZeRO, recompute, SP) combination.
    best, seen = [], set()
    for plan in feasible:
        key = (plan.layout.tp, plan.layout.pp, plan.layout.pp_virtual, plan.layout.zero, plan.layout.recompute,
               plan.layout.sequence_parallel)
        if key not in seen:
            seen.add(key)
            best.append(plan)
    return best[:top]


def _check_model_states_fit(request: PlanRequest) -> None:
    """Parameters, gradients and Adam state sharded over every device (ZeRO-3, all of tp x pp x dp) is the
    floor of per-device memory; if even that does not fit, say how many devices would."""
    p, g, o = state_bytes_per_param(request.precision)
    params = count_parameters(request.model)
    states = params * (p + g + o)
    needed = math.ceil(states / request.usable_bytes)
    if needed > request.devices:
        nodes = math.ceil(needed / request.devices_per_node)
        raise InfeasiblePlanError(
            f"{request.model.name} ({params / 1e9:.1f}B parameters x {p + g + o} bytes) needs at least {needed} "
            f"{request.cluster.accelerator} for parameters, gradients and optimizer state alone, but "
            f"{request.devices} are requested; use launcher.nodes={nodes} or more")


def _no_layout_reason(request: PlanRequest) -> str:
    return (f"no tp x pp x dp layout of {request.devices} devices divides the model and batch: "
            f"{request.model.n_heads} heads, {total_layers(request.model)} layers, "
            f"trainer.global_batch={request.global_batch}; pick a global batch divisible by the data-parallel "
            f"degree (e.g. a multiple of {request.devices})")


def describe(layout: Layout) -> str:
    parts = [f"tp{layout.tp}", f"pp{layout.pp}" + (f"x{layout.pp_virtual}v" if layout.pp_virtual > 1 else ""),
             f"dp{layout.dp}", f"zero{layout.zero}", f"mb{layout.micro_batch}", f"ac={layout.recompute}"]
    if layout.sequence_parallel:
        parts.append("sp")
    return " ".join(parts)


def layout_overrides(layout: Layout, request: PlanRequest) -> Tuple[dict, dict]:
    """The `parallel` and `trainer` sections `scaletrain train` reads."""
    parallel = {"dp_replicate": 1, "dp_shard": layout.dp, "tp": layout.tp, "pp": layout.pp,
                "pp_virtual": layout.pp_virtual, "zero": layout.zero,
                "pp_schedule": layout.schedule,
                "sequence_parallel": layout.sequence_parallel}
    trainer = {"global_batch": request.global_batch, "micro_batch": layout.micro_batch,
               "seq_len": request.seq_len, "activation_checkpointing": layout.recompute}
    return parallel, trainer
