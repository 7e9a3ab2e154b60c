"""Matplotlib PNGs of a scaling fit: loss against N per token budget, iso-FLOP curves, and the fitted
compute-optimal frontier with the runs on it. Agg backend: no display needed."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from scaletrain.scaling.fit import ChinchillaLaw, Run  # noqa: E402


def _groups(values: Sequence[float], relative_tolerance: float = 0.05) -> Dict[float, List[int]]:
    """Indices grouped by value, values within 5% of a group's first member joining it (budgets that
    differ only by rounding of steps x batch land together)."""
    groups: Dict[float, List[int]] = {}
    for i in np.argsort(values):
        for key in groups:
            if abs(values[i] - key) <= relative_tolerance * key:
                groups[key].append(int(i))
                break
        else:
            groups[float(values[i])] = [int(i)]
    return groups


def _y_range_of_the_runs(ax, runs: Sequence[Run]) -> None:
    """The y-axis spans the observed losses (plus a margin); fitted curves leaving it are clipped, so a
    curve that blows up at the edge of the grid does not flatten the data into a line."""
    losses = [r.loss for r in runs]
    low, high = min(losses), max(losses)
    margin = 0.15 * (high - low) or 0.05 * abs(high) or 0.1
    ax.set_ylim(low - margin, high + margin)


def loss_vs_params(runs: Sequence[Run], law: ChinchillaLaw, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4.5))
    tokens = [r.tokens for r in runs]
    n_grid = np.geomspace(min(r.params for r in runs) / 1.5, max(r.params for r in runs) * 1.5, 100)
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(_groups(tokens))))
    for color, (budget, members) in zip(colors, _groups(tokens).items()):
        ax.scatter([runs[i].params for i in members], [runs[i].loss for i in members], color=color,
                   label=f"D = {budget:.3g} tokens")
        ax.plot(n_grid, law(n_grid, budget), color=color, lw=1)
    ax.set(xscale="log", xlabel="parameters N", ylabel="final validation loss",
           title="Loss against model size per token budget (lines: fitted L(N, D))")
    _y_range_of_the_runs(ax, runs)
    ax.legend(fontsize=8)
    return _save(fig, path)


def iso_flop(runs: Sequence[Run], law: ChinchillaLaw, path: Path) -> Path:
    """Runs grouped by compute C = 6ND; each curve is the fitted law along N·D = C/6, its minimum marked."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    compute = [r.compute for r in runs]
    groups = _groups(compute, relative_tolerance=0.25)
    colors = plt.cm.plasma(np.linspace(0, 0.85, len(groups)))
    for color, (budget, members) in zip(colors, groups.items()):
        c = float(np.exp(np.mean(np.log([compute[i] for i in members]))))
        ax.scatter([runs[i].params for i in members], [runs[i].loss for i in members], color=color,
                   label=f"C ≈ {c:.2g} FLOPs")
        n_opt, _ = law.optimal(c)
        n_grid = np.geomspace(n_opt / 30, n_opt * 30, 200)
        ax.plot(n_grid, law(n_grid, c / (6 * n_grid)), color=color, lw=1)
        ax.scatter([n_opt], [law(n_opt, c / (6 * n_opt))], color=color, marker="*", s=120, edgecolor="k")
    ax.set(xscale="log", xlabel="parameters N", ylabel="final validation loss",
           title="Iso-FLOP curves (star: fitted compute-optimal N)")
    _y_range_of_the_runs(ax, runs)
    ax.legend(fontsize=8)
    return _save(fig, path)


def frontier(runs: Sequence[Run], law: ChinchillaLaw, path: Path) -> Path:
    """Left: loss against compute, the runs and the fitted frontier L(N*(C), D*(C)).
    Right: N*(C) and D*(C) with each run placed at its own (C, N)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    compute = np.array([r.compute for r in runs])
    c_grid = np.geomspace(compute.min() / 3, compute.max() * 30, 100)
    n_opt, d_opt = law.optimal(c_grid)
    left.scatter(compute, [r.loss for r in runs], c=np.log10([r.params for r in runs]), cmap="viridis",
                 label="runs (colour: log10 N)")
    left.plot(c_grid, law(n_opt, d_opt), "k-", label="fitted frontier")
    left.set(xscale="log", xlabel="compute C = 6ND (FLOPs)", ylabel="final validation loss",
             title="Compute-optimal frontier")
    left.legend(fontsize=8)
    right.plot(c_grid, n_opt, "C0-", label="N*(C)")
    right.plot(c_grid, d_opt, "C1-", label="D*(C)")
    right.scatter(compute, [r.params for r in runs], color="C0", s=12, label="runs: N")
    right.scatter(compute, [r.tokens for r in runs], color="C1", s=12, label="runs: D")
    right.set(xscale="log", yscale="log", xlabel="compute C (FLOPs)", title="Optimal allocation")
    right.legend(fontsize=8)
    return _save(fig, path)


def score_vs_compute(points: Sequence, law, metric: str, path: Path) -> Path:
    """A task score against compute: the runs, the fitted logistic in log-compute a decade past them on
    each side, and its floor and ceiling."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    compute = np.array([p.compute for p in points])
    c_grid = np.geomspace(compute.min() / 10, compute.max() * 10, 200)
    ax.scatter(compute, [p.score for p in points], color="C0", label="runs", zorder=3)
    ax.plot(c_grid, law(c_grid), "k-", label=f"fit: slope {law.slope:.3g}/decade")
    for level, name in ((law.floor, "floor"), (law.ceiling, "ceiling")):
        ax.axhline(level, color="grey", ls="--", lw=0.8)
        ax.annotate(name, (c_grid[0], level), fontsize=8, color="grey", va="bottom")
    ax.set(xscale="log", xlabel="compute C = 6ND (FLOPs)", ylabel=metric, title=f"{metric} against compute")
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(runs: Sequence[Run], law: ChinchillaLaw, out_dir: Path) -> List[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    return [loss_vs_params(runs, law, out_dir / "loss_vs_params.png"),
            iso_flop(runs, law, out_dir / "iso_flop.png"),
            frontier(runs, law, out_dir / "frontier.png")]
