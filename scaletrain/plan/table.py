"""The planner's columns for `scaletrain table --cluster <preset> [--tokens 300e9] [--nodes N]`: per table
model, the fastest layout that fits and the training time for the token budget.

Without --nodes each model gets the smallest power-of-two node count on which some layout fits (the
optimizer-state floor first, then doubling while activations do not fit), up to MAX_NODES."""

from __future__ import annotations

import math
from typing import List, Optional

from scaletrain.configs.schema import ClusterConfig, ModelConfig
from scaletrain.plan.memory import GIB, count_parameters, state_bytes_per_param
from scaletrain.plan.search import USABLE_MEMORY_FRACTION, InfeasiblePlanError, PlanRequest, describe, search

MAX_NODES = 4096
DEFAULT_GLOBAL_BATCH = 512  # sequences; GPT-3 used 0.5M-3.2M tokens per batch, BERT 256 x 512


def default_seq_len(cfg: ModelConfig) -> int:
    """The context the model was built for (learned positions), else 512 (T5 / Transformer pretraining)."""
    return cfg.max_seq_len if cfg.position == "learned" else 512


def plan_row(cfg: ModelConfig, cluster: ClusterConfig, tokens: float, nodes: Optional[int] = None,
             global_batch: int = DEFAULT_GLOBAL_BATCH, seq_len: Optional[int] = None) -> dict:
    seq_len = seq_len or default_seq_len(cfg)
    per_node = max(cluster.gpus_per_node, 1)
    if nodes:
        candidates = [nodes]
    else:  # start at the optimizer-state floor (16 bytes per parameter over every device), then double
        floor_gpus = state_bytes_per_param(cluster.default_precision)
        needed = count_parameters(cfg) * sum(floor_gpus) / (cluster.memory_gb * GIB * USABLE_MEMORY_FRACTION)
        first = 2 ** max(0, math.ceil(math.log2(max(needed / per_node, 1))))
        candidates = [first * 2**k for k in range(6) if first * 2**k <= MAX_NODES]
    reason = ""
    for count in candidates:
        request = PlanRequest(cfg, cluster, nodes=count, devices_per_node=per_node, global_batch=global_batch,
                              seq_len=seq_len, precision=cluster.default_precision)
        try:
            best = search(request, top=1)[0]
        except InfeasiblePlanError as error:
            reason = str(error)
            continue
        return {"nodes": count, "gpus": request.devices, "layout": describe(best.layout), "mfu": best.mfu,
                "days": best.days(tokens), "gpu_hours": best.gpu_hours(tokens), "seq_len": seq_len,
                "global_batch": global_batch}
    return {"nodes": None, "reason": reason or "no node count up to the limit fits"}


def format_plan_columns(rows: List[dict], cluster: ClusterConfig, tokens: float) -> str:
    header = f"{'model':<18} {'nodes':>5} {'GPUs':>5} {'layout':<44} {'MFU':>6} {'days':>9} {'GPU-hours':>10}"
    lines = [f"planned on {cluster.name} ({cluster.accelerator}), {tokens:.3g} tokens, batch x seq per row "
             f"as shown in --format json", header]
    for row in rows:
        plan = row["plan"]
        if plan["nodes"] is None:
            lines.append(f"{row['name']:<18} infeasible: {plan['reason']}")
            continue
        lines.append(f"{row['name']:<18} {plan['nodes']:>5} {plan['gpus']:>5} {plan['layout']:<44} "
                     f"{plan['mfu']:6.1%} {plan['days']:9.2f} {plan['gpu_hours']:10.4g}")
    return "\n".join(lines)


def add_plan_columns(rows: List[dict], cluster_name: str, tokens: float, nodes: Optional[int] = None) -> str:
    """Adds row["plan"] to each table row (loaded by name) and returns the planner's table as text."""
    from scaletrain.configs.store import compose_config
    from scaletrain.models.registry import load_model_config

    cluster = compose_config([f"cluster={cluster_name}"]).cluster
    for row in rows:
        row["plan"] = plan_row(load_model_config(row["name"]), cluster, tokens, nodes)
    return format_plan_columns(rows, cluster, tokens)
