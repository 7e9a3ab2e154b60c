"""Compute-optimal model size and tokens.

Training only: Hoffmann et al. 2022, C = 6ND, closed form (ChinchillaLaw.optimal).
With inference: Sardana & Frankle 2023 ("Beyond Chinchilla-Optimal: Accounting for Inference in Language
Model Scaling Laws", sec. 2): keep the quality the training budget buys at the Chinchilla optimum,
ℓ = L(N*(C), D*(C)), and minimize training + inference FLOPs, 6·N·D_train + 2·N·D_inference, over the
(N, D_train) pairs that reach ℓ: for each N, D_train = (B / (ℓ - E - A/N^α))^(1/β)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar

from scaletrain.scaling.fit import ChinchillaLaw, ScalingFitError


@dataclass
class Allocation:
    params: float
    tokens: float
    loss: float
    training_flops: float
    inference_flops: float

    @property
    def tokens_per_param(self) -> float:
        return self.tokens / self.params

    @property
    def total_flops(self) -> float:
        return self.training_flops + self.inference_flops


def chinchilla_optimal(law: ChinchillaLaw, compute: float, inference_tokens: float = 0.0) -> Allocation:
    n, d = law.optimal(compute)
    return Allocation(n, d, float(law(n, d)), 6 * n * d, 2 * n * inference_tokens)


def tokens_for_loss(law: ChinchillaLaw, params: float, loss: float) -> float:
    """D such that L(params, D) = loss; inf when the model is too small to ever reach that loss."""
    headroom = loss - law.E - law.A / params**law.alpha
    return (law.B / headroom) ** (1 / law.beta) if headroom > 0 else math.inf


def inference_aware_optimal(law: ChinchillaLaw, compute: float, inference_tokens: float) -> Allocation:
    """Same loss as the training-only optimum at `compute`, fewest training + inference FLOPs."""
    if compute <= 0 or inference_tokens < 0:
        raise ScalingFitError("--compute must be positive and --inference-tokens must not be negative")
    reference = chinchilla_optimal(law, compute)
    target = reference.loss
    # Smallest N that can reach the target at all (infinite data), then search N above it on a log scale.
    n_floor = (law.A / (target - law.E)) ** (1 / law.alpha)

    def total(log_n: float) -> float:
        n = math.exp(log_n)
        d = tokens_for_loss(law, n, target)
        return math.log(6 * n * d + 2 * n * inference_tokens) if math.isfinite(d) else 1e300

    lo, hi = math.log(n_floor) + 1e-9, math.log(reference.params) + 1.0
    best = minimize_scalar(total, bounds=(lo, hi), method="bounded", options={"xatol": 1e-9})
    candidates = [best.x] + list(np.linspace(lo, hi, 200))  # guard against a bounded-search local minimum
    log_n = min(candidates, key=total)
    n = math.exp(log_n)
    d = tokens_for_loss(law, n, target)
    return Allocation(n, d, target, 6 * n * d, 2 * n * inference_tokens)
