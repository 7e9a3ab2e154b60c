"""`scaletrain plan model=<name> cluster=<preset> launcher.nodes=N [trainer.global_batch=..]
[trainer.seq_len=..] [--tokens 300e9] [--top 5] [--out DIR]`

Hydra-style overrides compose the same config `scaletrain train` would see; the planner prints the fastest
layouts that fit and writes the winner as an experiment preset (`parallel` + `trainer` sections) under
DIR/experiment/, runnable with the printed `scaletrain train` command."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import List, Optional, Sequence

import yaml

from scaletrain.cli import ArgumentParser
from scaletrain.configs.schema import TrainConfig
from scaletrain.errors import ConfigError
from scaletrain.plan.memory import GIB, count_parameters
from scaletrain.plan.memory import Layout
from scaletrain.plan.search import Plan, PlanRequest, describe, layout_overrides, search


def request_from_config(cfg: TrainConfig, precision: Optional[str] = None) -> PlanRequest:
    cluster = cfg.cluster
    devices_per_node = cluster.gpus_per_node or cfg.launcher.nproc_per_node
    precision = precision or cluster.default_precision
    return PlanRequest(model=cfg.model, cluster=cluster, nodes=cfg.launcher.nodes, devices_per_node=devices_per_node,
                       global_batch=cfg.trainer.global_batch, seq_len=cfg.trainer.seq_len, precision=precision,
                       scores_stored=cluster.device == "cpu" and cfg.model.attn_dropout > 0,
                       grad_reduce_bytes=4 if cfg.parallel.reduce_dtype == "fp32" else 2)


def format_table(plans: Sequence[Plan], tokens: Optional[float]) -> str:
    head = f"{'#':>2} {'layout':<44} {'mem GiB':>8} {'step s':>9} {'tokens/s':>11} {'MFU':>6}"
    if tokens:
        head += f" {'days':>8} {'GPU-hours':>11}"
    lines = [head]
    for i, plan in enumerate(plans, 1):
        line = (f"{i:>2} {describe(plan.layout):<44} {plan.memory.total / GIB:8.1f} {plan.time.step_s:9.3f} "
                f"{plan.tokens_per_s:11.4g} {plan.mfu:6.1%}")
        if tokens:
            line += f" {plan.days(tokens):8.2f} {plan.gpu_hours(tokens):11.4g}"
        lines.append(line)
    return "\n".join(lines)


def breakdown(plan: Plan) -> str:
    m, t = plan.memory.as_gib(), plan.time
    return (f"memory GiB: params {m['params']:.2f} grads {m['grads']:.2f} optimizer {m['optimizer']:.2f} "
            f"activations {m['activations']:.2f} buffers {m['buffers']:.2f}\n"
            f"step s: compute {t.compute_s:.3f} tp {t.tp_comm_s:.3f} pp {t.pp_comm_s:.3f} "
            f"bubble {t.bubble_s:.3f} dp (exposed) {t.dp_comm_s:.3f}")


def plan_document(plan: Plan) -> dict:
    parallel, trainer = layout_overrides(plan.layout, plan.request)
    return {"parallel": parallel, "trainer": trainer, "precision": plan.request.precision}


def write_plan(plan: Plan, out_dir: Path, name: str) -> Path:
    """Writes DIR/experiment/<name>.yaml, a global-package experiment preset."""
    path = out_dir / "experiment" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# @package _global_\n# scaletrain plan: {describe(plan.layout)}; "
              f"{plan.memory.total / GIB:.1f} GiB/device, {plan.time.step_s:.3f} s/step, MFU {plan.mfu:.1%}\n")
    path.write_text(header + yaml.safe_dump(plan_document(plan), sort_keys=False))
    return path


def plan_overrides(document: dict) -> List[str]:
    """The plan document as `section.key=value` overrides, for a command line."""
    out = []
    for section, values in document.items():
        if isinstance(values, dict):
            out += [f"{section}.{key}={str(value).lower() if isinstance(value, bool) else value}"
                    for key, value in values.items()]
        else:
            out.append(f"{section}={values}")
    return out


def kept_overrides(overrides: Sequence[str]) -> List[str]:
    """The user's overrides that say what to train where (the plan supplies parallel/trainer/precision)."""
    keep = ("model", "cluster", "launcher", "data", "optim")
    return [o for o in overrides if o.split("=")[0].lstrip("+").split(".")[0] in keep]


def train_commands(path: Path, plan: Plan, overrides: Sequence[str]) -> List[str]:
    kept = " ".join(kept_overrides(overrides))
    search_dir = path.parent.parent.resolve()
    return [f"scaletrain train {kept} {' '.join(plan_overrides(plan_document(plan)))}".replace("  ", " "),
            f"scaletrain train {kept} hydra.searchpath=[file://{search_dir}] experiment={path.stem}".replace("  ", " ")]


def parse_fixed(pins: Sequence[str]) -> dict:
    """--fix tp=1 --fix sequence_parallel=false -> {"tp": 1, "sequence_parallel": False}, typed like Layout."""
    fields = {f.name: f.type for f in dataclasses.fields(Layout)}
    fixed = {}
    for pin in pins:
        key, _, value = pin.partition("=")
        if key not in fields or not value:
            raise ConfigError(f"--fix {pin!r}: write FIELD=VALUE with FIELD one of {', '.join(fields)}")
        kind = fields[key] if isinstance(fields[key], str) else fields[key].__name__
        fixed[key] = {"int": int, "bool": lambda v: v.lower() in ("1", "true", "yes"), "str": str}[kind](value)
    return fixed


def cli(argv: List[str]) -> int:
    parser = ArgumentParser(prog="scaletrain plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides: model=... cluster=... launcher.nodes=N")
    parser.add_argument("--tokens", type=float, default=None, help="token budget for days and GPU-hours")
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("plans"), help="folder for the winning preset")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None,
                        help="default: the cluster's default precision")
    parser.add_argument("--fix", action="append", default=[], metavar="FIELD=VALUE",
                        help="pin a layout field, e.g. --fix tp=1 --fix recompute=full (repeatable)")
    args = parser.parse_args(argv)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise ConfigError(f"{bad[0]!r} is not an override; write key=value, e.g. model=gpt3_175b")
    from scaletrain.configs.store import compose_config

    cfg = compose_config(args.overrides)
    request = request_from_config(cfg, args.precision)
    request.fixed = parse_fixed(args.fix)
    print(f"{cfg.model.name}: {count_parameters(cfg.model) / 1e9:.3g}B parameters on {request.devices} x "
          f"{cfg.cluster.accelerator} ({request.nodes} node(s)), global batch {request.global_batch} x "
          f"{request.seq_len} tokens, {request.precision}")
    plans = search(request, top=args.top)
    print(format_table(plans, args.tokens))
    print(breakdown(plans[0]))
    name = f"plan_{cfg.model.name}_{cfg.cluster.name}_{request.nodes}n"
    path = write_plan(plans[0], args.out, name)
    explicit, preset = train_commands(path, plans[0], args.overrides)
    print(f"wrote {path}\nrun it: {explicit}\n    or: {preset}")
    return 0
