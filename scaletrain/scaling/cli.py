"""`scaletrain scaling fit <sweep folder> [--bootstrap 100] [--out DIR]` and
`scaletrain scaling fit <sweep folder> --metric task/<name>/acc [--floor 0.25] [--ceiling 1]` (a task score
against compute, scaling/score_fit.py) and
`scaletrain scaling optimal --compute 1e21 [--inference-tokens 1e12] [--fit fit.json]`.

The sweep folder is a Hydra multirun directory of `scaletrain train` jobs. Its summary.csv (train/summary.py)
gives each job's tokens and final validation loss; N comes from the summary's `params` /
`non_embedding_params` columns when present, else from the job's own composed config (.hydra/config.yaml)
through the planner's exact parameter inventory. Compute is C = 6·N·D with N the total parameters."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import fields
from pathlib import Path
from typing import List

from omegaconf import OmegaConf

from scaletrain.cli import ArgumentParser
from scaletrain.configs.schema import ModelConfig
from scaletrain.plan.memory import count_parameters, non_embedding_parameters
from scaletrain.scaling.fit import (CHINCHILLA_PUBLISHED, ChinchillaLaw, Run, ScalingFitError, bootstrap_chinchilla,
                                    check_enough_points, fit_chinchilla, fit_warnings, kaplan_fits)
from scaletrain.scaling.optimal import chinchilla_optimal, inference_aware_optimal
from scaletrain.scaling.score_fit import ScorePoint, fit_score_law, score_warnings

SUMMARY_FILE = "summary.csv"
FIT_FILE = "scaling_fit.json"
LOSS_COLUMNS = ("val_loss", "final_val_loss", "eval_loss")


def _model_config(job_dir: Path) -> ModelConfig:
    config_file = job_dir / ".hydra" / "config.yaml"
    if not config_file.is_file():
        raise ScalingFitError(f"{config_file} is missing; the sweep's summary names a job without its Hydra config")
    model = OmegaConf.to_container(OmegaConf.load(config_file).model, resolve=True)
    known = {f.name for f in fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in model.items() if k in known})


def _summary_rows(sweep_dir: Path) -> List[dict]:
    summary = sweep_dir / SUMMARY_FILE
    if not summary.is_file():
        raise ScalingFitError(f"{summary} not found; point at a `scaletrain train --multirun` folder "
                              f"(it writes {SUMMARY_FILE} when the sweep ends)")
    with open(summary, newline="") as handle:
        return [row for row in csv.DictReader(handle) if row.get("status") == "ok" and row.get("tokens")]


def _sizes(sweep_dir: Path, row: dict) -> tuple:
    """(total, non-embedding) parameters of a job: its summary columns, else its composed model config."""
    if row.get("params") and row.get("non_embedding_params"):
        return float(row["params"]), float(row["non_embedding_params"])
    cfg = _model_config(sweep_dir / row["job"])
    return count_parameters(cfg), non_embedding_parameters(cfg)


def read_sweep(sweep_dir: Path) -> List[Run]:
    runs = []
    for row in _summary_rows(sweep_dir):
        loss = next((row[c] for c in LOSS_COLUMNS if row.get(c) not in (None, "")), None)
        if loss is not None and math.isfinite(float(loss)):
            runs.append(Run(row["job"], *_sizes(sweep_dir, row), float(row["tokens"]), float(loss)))
    try:
        check_enough_points(runs)
    except ScalingFitError as error:
        raise ScalingFitError(f"{sweep_dir / SUMMARY_FILE}: {error} (a job without final metrics does not count; "
                              f"check the failed jobs' logs)") from None
    return runs


def read_scores(sweep_dir: Path, metric: str) -> List[ScorePoint]:
    """Each finished job's (compute, summary.csv's `metric` column)."""
    rows = _summary_rows(sweep_dir)
    if rows and metric not in rows[0]:
        have = sorted(k for k in rows[0] if k.startswith("task/")) or ["none: set trainer.eval_tasks in the sweep"]
        raise ScalingFitError(f"{sweep_dir / SUMMARY_FILE} has no column {metric}; its task scores: {', '.join(have)}")
    points = []
    for row in rows:
        if row.get(metric) not in (None, "") and math.isfinite(float(row[metric])):
            params, _ = _sizes(sweep_dir, row)
            points.append(ScorePoint(row["job"], 6.0 * params * float(row["tokens"]), float(row[metric])))
    return points


def score_fit_command(args) -> int:
    from scaletrain.scaling.plots import score_vs_compute

    points = read_scores(args.sweep, args.metric)
    law = fit_score_law(points, args.floor, args.ceiling)
    print(f"{len(points)} runs; {args.metric} = {law.floor:g} + ({law.ceiling:g} - {law.floor:g}) · "
          f"sigmoid(slope · (log10 C - log10 C_mid)), C = 6·N·D")
    print(f"  slope = {law.slope:.4g} logits per decade of compute, C_mid = 10^{law.log10_midpoint:.4g}")
    for p in sorted(points, key=lambda p: p.compute):
        print(f"  {p.name}: C = {p.compute:.3g}, {args.metric} {p.score:.4f}, fitted {float(law(p.compute)):.4f}")
    for fraction in (0.5, 0.9):
        target = law.floor + fraction * (law.ceiling - law.floor)
        print(f"  {args.metric} = {target:.3g} at C = {law.compute_for(target):.3g}")
    warnings = score_warnings(points, law)
    for warning in warnings:
        print(f"WARNING: {warning}")
    out = args.out or args.sweep
    out.mkdir(parents=True, exist_ok=True)
    stem = f"score_fit.{args.metric.replace('/', '.')}"
    path = out / f"{stem}.json"
    path.write_text(json.dumps({"metric": args.metric, "law": law.to_dict(), "warnings": warnings,
                                "runs": [vars(p) for p in points]}, indent=2))
    print(f"wrote {score_vs_compute(points, law, args.metric, out / f'{stem}.png')}")
    print(f"wrote {path}")
    return 0


def fit_command(args) -> int:
    from scaletrain.scaling.plots import plot_all

    runs = read_sweep(args.sweep)
    out = args.out or args.sweep
    kaplan = kaplan_fits(runs)
    law = fit_chinchilla(runs)
    intervals = bootstrap_chinchilla(runs, law, samples=args.bootstrap) if args.bootstrap else {}
    print(f"{len(runs)} runs; N = total parameters (Kaplan: non-embedding), D = tokens, C = 6·N·D")
    for name, power in kaplan.items():
        x = "N_c" if name == "L(N)" else "D_c"
        print(f"Kaplan {name} = ({x}/x)^alpha: alpha = {power.alpha:.4f}, {x} = {power.scale:.4g}")
    print("Chinchilla L(N, D) = E + A/N^alpha + B/D^beta (90% bootstrap intervals):")
    for key, value in law.to_dict().items():
        interval = f"  [{intervals[key][0]:.4g}, {intervals[key][1]:.4g}]" if key in intervals else ""
        print(f"  {key:>5} = {value:.4g}{interval}")
    a = law.beta / (law.alpha + law.beta)
    print(f"compute-optimal: N* ∝ C^{a:.3f}, D* ∝ C^{1 - a:.3f}")
    budgets = sorted({10 ** round(math.log10(r.compute)) for r in runs} | {1e21, 1e23})
    for c in budgets:
        n, d = law.optimal(c)
        print(f"  C = {c:.0e}: N* = {n:.3g}, D* = {d:.3g}, {d / n:.1f} tokens/param, loss {law(n, d):.4f}")
    warnings = fit_warnings(runs, law)
    for warning in warnings:
        print(f"WARNING: {warning}")
    document = {"chinchilla": law.to_dict(), "intervals": intervals, "warnings": warnings,
                "kaplan": {k: {"alpha": v.alpha, "scale": v.scale} for k, v in kaplan.items()},
                "runs": [vars(r) for r in runs]}
    out.mkdir(parents=True, exist_ok=True)
    (out / FIT_FILE).write_text(json.dumps(document, indent=2))
    for path in plot_all(runs, law, out):
        print(f"wrote {path}")
    print(f"wrote {out / FIT_FILE}")
    return 0


def load_law(path: Path | None) -> ChinchillaLaw:
    if path is None:
        return CHINCHILLA_PUBLISHED
    if not path.is_file():
        raise ScalingFitError(f"--fit {path} not found; run `scaletrain scaling fit <sweep>` first")
    return ChinchillaLaw(**json.loads(path.read_text())["chinchilla"])


def optimal_command(args) -> int:
    law = load_law(args.fit)
    if args.compute <= 0:
        raise ScalingFitError(f"--compute {args.compute} must be a positive FLOP count, e.g. 1e21")
    source = str(args.fit) if args.fit else "Hoffmann et al. 2022 (E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)"
    print(f"law: {source}")
    base = chinchilla_optimal(law, args.compute, args.inference_tokens)
    print(f"training-optimal at C = {args.compute:.3g}: N = {base.params:.4g}, D = {base.tokens:.4g} "
          f"({base.tokens_per_param:.1f} tokens/param), loss {base.loss:.4f}")
    if args.inference_tokens:
        best = inference_aware_optimal(law, args.compute, args.inference_tokens)
        print(f"with {args.inference_tokens:.3g} inference tokens (same loss, fewest training + inference FLOPs): "
              f"N = {best.params:.4g}, D = {best.tokens:.4g} ({best.tokens_per_param:.1f} tokens/param)")
        print(f"  FLOPs: training {best.training_flops:.4g} + inference {best.inference_flops:.4g} = "
              f"{best.total_flops:.4g} (training-optimal model: {base.total_flops:.4g}, "
              f"{1 - best.total_flops / base.total_flops:.1%} saved)")
    return 0


def cli(argv: List[str]) -> int:
    parser = ArgumentParser(prog="scaletrain scaling")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{fit,optimal}")
    fit = sub.add_parser("fit", help="fit Kaplan and Chinchilla laws to a sweep folder, write PNGs")
    fit.add_argument("sweep", type=Path)
    fit.add_argument("--bootstrap", type=int, default=50, help="bootstrap resamples for intervals (0: none)")
    fit.add_argument("--out", type=Path, default=None, help="where the PNGs and fit JSON go (default: the sweep)")
    fit.add_argument("--metric", default=None, help="fit this summary.csv column (a task score such as "
                     "task/<name>/acc) against compute with a logistic in log-compute, instead of the loss laws")
    fit.add_argument("--floor", type=float, default=0.0, help="--metric's chance level (1/choices for acc; default 0)")
    fit.add_argument("--ceiling", type=float, default=1.0, help="--metric's best value (default 1)")
    opt = sub.add_parser("optimal", help="compute-optimal N and D for a FLOP budget")
    opt.add_argument("--compute", type=float, required=True)
    opt.add_argument("--inference-tokens", type=float, default=0.0)
    opt.add_argument("--fit", type=Path, default=None, help=f"a {FIT_FILE} (default: Hoffmann et al.'s constants)")
    args = parser.parse_args(argv)
    if args.command == "fit" and not args.sweep.is_dir():
        raise ScalingFitError(f"{args.sweep} is not a folder; pass the multirun folder of the sweep")
    if args.command == "fit":
        return score_fit_command(args) if args.metric else fit_command(args)
    return optimal_command(args)
