"""Scaling-law fits to a sweep of runs.

  * Kaplan et al. 2020 ("Scaling Laws for Neural Language Models", eq. 1.1-1.2): L(N) = (N_c/N)^α_N with N
    the non-embedding parameters, and L(D) = (D_c/D)^α_D; straight lines in log-log, fitted by least squares
    on the data-richest run of each size (resp. the largest model of each token budget).
  * Hoffmann et al. 2022 ("Training Compute-Optimal Large Language Models", sec. 3.3 and appendix D.2):
    L(N, D) = E + A/N^α + B/D^β with N the total parameters. As in the paper: the Huber loss (δ = 1e-3) between
    the predicted and observed log-loss, with the prediction written as a log-sum-exp of (a - α log N,
    b - β log D, e) where A = exp(a), B = exp(b), E = exp(e); L-BFGS from a grid of starting points; the
    best of the optimized starts is kept.
  * Compute-optimal allocation under C = 6ND (Hoffmann et al. eq. 4): N*(C) = G (C/6)^(β/(α+β)),
    D*(C) = G^-1 (C/6)^(α/(α+β)), G = (αA / (βB))^(1/(α+β)).
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
from scipy.optimize import minimize

from scaletrain.errors import UserError

HUBER_DELTA = 1e-3


def logsumexp(x: np.ndarray, axis: int = 0) -> np.ndarray:
    """log(sum(exp(x))) along `axis` without overflow (scipy's version re-checks its inputs on every call,
    which dominates the optimizer's thousands of tiny evaluations)."""
    top = x.max(axis=axis, keepdims=True)
    return np.squeeze(top, axis=axis) + np.log(np.exp(x - top).sum(axis=axis))


class ScalingFitError(UserError):
    pass


@dataclass
class Run:
    name: str
    params: float  # total N (Chinchilla)
    non_embedding_params: float  # Kaplan's N
    tokens: float  # D, tokens trained on
    loss: float  # final validation loss (nats/token)

    @property
    def compute(self) -> float:
        """C ≈ 6·N·D with the total parameter count (Hoffmann et al.'s convention)."""
        return 6.0 * self.params * self.tokens


@dataclass
class PowerLaw:
    """L(x) = (x_c / x)^alpha."""

    alpha: float
    scale: float  # x_c

    def __call__(self, x):
        return (self.scale / np.asarray(x, dtype=float)) ** self.alpha


@dataclass
class ChinchillaLaw:
    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def __call__(self, n, d):
        n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
        return self.E + self.A / n**self.alpha + self.B / d**self.beta

    def optimal(self, compute: float) -> tuple:
        """(N*, D*) minimizing L(N, D) under 6·N·D = compute."""
        a, b = self.alpha, self.beta
        if a <= 0 or b <= 0:  # an exponent at its lower bound: no interior optimum (fit_warnings says so)
            nan = np.full(np.shape(compute), np.nan)
            return (float(nan), float(nan)) if nan.ndim == 0 else (nan, nan)
        g = (a * self.A / (b * self.B)) ** (1 / (a + b))
        n = g * (compute / 6) ** (b / (a + b))
        return n, compute / (6 * n)

    def to_dict(self) -> Dict[str, float]:
        return asdict(self)


CHINCHILLA_PUBLISHED = ChinchillaLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)  # Hoffmann et al. eq. 10


def fit_power_law(x: Sequence[float], loss: Sequence[float]) -> PowerLaw:
    """Least squares on log L = α log x_c - α log x."""
    x, loss = np.log(np.asarray(x, float)), np.log(np.asarray(loss, float))
    if len(np.unique(x)) < 2:
        raise ScalingFitError(f"a power-law fit needs at least 2 distinct values of x, the sweep has "
                              f"{len(np.unique(x))}; sweep more model sizes / token budgets")
    slope, intercept = np.polyfit(x, loss, 1)
    alpha = -slope
    return PowerLaw(alpha=float(alpha), scale=float(np.exp(intercept / alpha)) if alpha != 0 else float("inf"))


def kaplan_fits(runs: Sequence[Run]) -> Dict[str, PowerLaw]:
    """L(N) from the most-trained run of each model size; L(D) from the largest model at each token budget."""
    by_size: Dict[float, Run] = {}
    by_tokens: Dict[float, Run] = {}
    for run in runs:
        if run.non_embedding_params not in by_size or run.tokens > by_size[run.non_embedding_params].tokens:
            by_size[run.non_embedding_params] = run
        if run.tokens not in by_tokens or run.params > by_tokens[run.tokens].params:
            by_tokens[run.tokens] = run
    law_n = fit_power_law([r.non_embedding_params for r in by_size.values()], [r.loss for r in by_size.values()])
    law_d = fit_power_law([r.tokens for r in by_tokens.values()], [r.loss for r in by_tokens.values()])
    return {"L(N)": law_n, "L(D)": law_d}


def _huber_objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_loss: np.ndarray):
    """Sum of Huber(log L̂ - log L) and its gradient w.r.t. theta = (a, b, e, α, β)."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])  # (3, runs)
    predicted = logsumexp(terms, axis=0)
    weights = np.exp(terms - predicted)  # softmax over the three terms: d predicted / d term
    r = predicted - log_loss
    small = np.abs(r) <= HUBER_DELTA
    value = np.where(small, 0.5 * r**2, HUBER_DELTA * (np.abs(r) - 0.5 * HUBER_DELTA)).sum()
    dr = np.where(small, r, HUBER_DELTA * np.sign(r))  # d huber / d r
    grad = np.array([(dr * weights[0]).sum(), (dr * weights[1]).sum(), (dr * weights[2]).sum(),
                     -(dr * weights[0] * log_n).sum(), -(dr * weights[1] * log_d).sum()])
    return value, grad


# Hoffmann et al. D.2's grid of starting points: α, β ∈ {0, 0.5, ..., 2}, e ∈ {-1, -.5, ..., 1}, a, b ∈ {0, 5, ..., 25}.
# They ran L-BFGS from every point; we evaluate the objective on the whole grid (one vectorized pass) and run
# L-BFGS from the OPTIMIZED_STARTS best points, which finds the same minimum in a fraction of the time.
DEFAULT_GRID = {"a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0), "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
                "e": (-1.0, -0.5, 0.0, 0.5, 1.0), "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
                "beta": (0.0, 0.5, 1.0, 1.5, 2.0)}
OPTIMIZED_STARTS = 5


def _grid_starts(grid: Dict[str, Sequence[float]], log_n, log_d, log_loss, keep: int) -> List[np.ndarray]:
    points = np.array(list(itertools.product(grid["a"], grid["b"], grid["e"], grid["alpha"], grid["beta"])))
    a, b, e, alpha, beta = (points[:, i:i + 1] for i in range(5))  # each (starts, 1)
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.broadcast_to(e, (len(points), len(log_n)))])
    r = np.abs(logsumexp(terms, axis=0) - log_loss)  # (starts, runs)
    values = np.where(r <= HUBER_DELTA, 0.5 * r**2, HUBER_DELTA * (r - 0.5 * HUBER_DELTA)).sum(axis=1)
    return list(points[np.argsort(values)[:keep]])


EXPONENT_BOUNDS = (0.0, 3.0)  # L-BFGS-B bounds of α and β
CHINCHILLA_CONSTANTS = 5  # E, A, α, B, β
TERM_CONSTANTS = 3  # along N at a fixed D, the law has 3 free constants (E + B/D^β, A, α); likewise along D


def sweep_shape(runs: Sequence[Run]) -> tuple:
    """(distinct model sizes, distinct token budgets, distinct (size, budget) points)."""
    return (len({r.params for r in runs}), len({r.tokens for r in runs}),
            len({(r.params, r.tokens) for r in runs}))


def check_enough_points(runs: Sequence[Run]) -> None:
    """Refuses a sweep with fewer distinct (N, D) points than the law's 5 constants, saying what to add."""
    sizes, budgets, points = sweep_shape(runs)
    if points < CHINCHILLA_CONSTANTS:
        raise ScalingFitError(
            f"the Chinchilla law has {CHINCHILLA_CONSTANTS} constants but the sweep has {points} distinct (model "
            f"size, token budget) points ({len(runs)} finished runs, {sizes} sizes x {budgets} budgets); it needs "
            f"at least {CHINCHILLA_CONSTANTS} points with >= {TERM_CONSTANTS} model sizes and >= {TERM_CONSTANTS} "
            f"token budgets: add {CHINCHILLA_CONSTANTS - points} more finished runs"
            + _what_to_add(sizes, budgets))


def _more(count: int, kind: str) -> str:
    return f"{count} more {kind}{'s' if count > 1 else ''}"


def _what_to_add(sizes: int, budgets: int) -> str:
    wanted = [_more(TERM_CONSTANTS - have, kind) for have, kind in ((sizes, "model size"), (budgets, "token budget"))
              if have < TERM_CONSTANTS]
    return f" ({' and '.join(wanted)})" if wanted else ""


def fit_warnings(runs: Sequence[Run], law: ChinchillaLaw) -> List[str]:
    """What makes a fit look fine when it is not: an exponent pinned at its bound (the optimizer stopped at
    the wall, the value is no measurement), or a term with fewer distinct points than its constants."""
    sizes, budgets, _ = sweep_shape(runs)
    warnings = []
    for name, value, kind, values in (("alpha", law.alpha, "model sizes", [r.params for r in runs]),
                                      ("beta", law.beta, "token budgets", [r.tokens for r in runs])):
        low, high = EXPONENT_BOUNDS
        if min(value - low, high - value) < 1e-3:
            lo, hi = min(values), max(values)
            warnings.append(f"Chinchilla {name} = {value:.4g} sits at its bound [{low:g}, {high:g}]: not a "
                            f"measurement; add {kind} outside {lo:.3g}..{hi:.3g} (e.g. {lo / 3:.3g} and "
                            f"{hi * 3:.3g}) so the curvature along that axis is visible")
    for have, kind, term in ((sizes, "model size", "A/N^alpha"), (budgets, "token budget", "B/D^beta")):
        if have < TERM_CONSTANTS:
            warnings.append(f"only {have} distinct {kind}s for the {TERM_CONSTANTS} constants of E + {term}: "
                            f"the fit passes through the points and does not determine them; add "
                            f"{_more(TERM_CONSTANTS - have, kind)} to the sweep")
    return warnings


def fit_chinchilla(runs: Sequence[Run], grid: Optional[Dict[str, Sequence[float]]] = None,
                   starts: Optional[List[np.ndarray]] = None, max_iterations: int = 1000) -> ChinchillaLaw:
    check_enough_points(runs)
    log_n = np.log([r.params for r in runs])
    log_d = np.log([r.tokens for r in runs])
    log_loss = np.log([r.loss for r in runs])
    if starts is None:
        starts = _grid_starts(grid or DEFAULT_GRID, log_n, log_d, log_loss, OPTIMIZED_STARTS)
    bounds = [(None, None), (None, None), (None, None), EXPONENT_BOUNDS, EXPONENT_BOUNDS]
    best = None
    for start in starts:
        result = minimize(_huber_objective, start, args=(log_n, log_d, log_loss), jac=True, method="L-BFGS-B",
                          bounds=bounds, options={"maxiter": max_iterations, "ftol": 1e-15, "gtol": 1e-12})
        if best is None or result.fun < best.fun:
            best = result
    a, b, e, alpha, beta = best.x
    return ChinchillaLaw(E=float(np.exp(e)), A=float(np.exp(a)), B=float(np.exp(b)), alpha=float(alpha),
                         beta=float(beta))


def _as_theta(law: ChinchillaLaw) -> np.ndarray:
    return np.array([np.log(law.A), np.log(law.B), np.log(law.E), law.alpha, law.beta])


def bootstrap_chinchilla(runs: Sequence[Run], law: ChinchillaLaw, samples: int = 100, seed: int = 0,
                         coverage: float = 0.9) -> Dict[str, tuple]:
    """Percentile intervals of each constant (and of the exponent a = β/(α+β) of N*(C)) over fits to runs
    resampled with replacement. Each refit starts from the full-data fit, which is near the resample's optimum."""
    rng = np.random.default_rng(seed)
    starts = [_as_theta(law)]
    fits = []
    for _ in range(samples):
        sample = [runs[i] for i in rng.integers(0, len(runs), len(runs))]
        if sweep_shape(sample)[2] < CHINCHILLA_CONSTANTS:
            continue
        # Resamples of a small sweep can be flat in some direction; 200 iterations bound the time spent there.
        fits.append(fit_chinchilla(sample, starts=starts, max_iterations=200))
    lo, hi = (1 - coverage) / 2 * 100, (1 + coverage) / 2 * 100
    out = {}
    for key in ("E", "A", "B", "alpha", "beta"):
        values = np.array([getattr(f, key) for f in fits])
        out[key] = (float(np.percentile(values, lo)), float(np.percentile(values, hi)))
    exponents = np.array([f.beta / (f.alpha + f.beta) for f in fits])
    out["N*_exponent"] = (float(np.percentile(exponents, lo)), float(np.percentile(exponents, hi)))
    return out
