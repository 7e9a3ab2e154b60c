"""A task score against training compute: `scaletrain scaling fit <sweep> --metric task/<name>/<metric>`.

A loss falls toward a floor as a power law; an accuracy rises from chance toward a ceiling, and over the
range where it moves it is close to linear in log-compute (GPT-3's few-shot curves, Brown et al. 2020,
fig. 1.3). Its law here is a logistic in log10 of the compute C = 6·N·D:

    score(C) = floor + (ceiling - floor) · sigmoid(slope · (log10 C - log10 C_mid))

with floor (chance: 1/choices for multiple choice, 0 for exact match) and ceiling (1) given, not fitted: a
sweep of a few sizes seldom shows both plateaus, and fitting them too leaves the middle undetermined.
`slope` is the rise per decade of compute in logits, C_mid the compute at half way. The two constants are
fitted by least squares on the scores, starting from a straight line through logit(scaled score) against
log10 C. The upper tail of the logistic is a power law of the error, ceiling - score ∝ C^(-slope·log10 e)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import List, Sequence

import numpy as np
from scipy.optimize import least_squares

from scaletrain.scaling.fit import ScalingFitError

SCORE_CONSTANTS = 2  # slope and C_mid
LOGIT_CLIP = 1e-3  # the starting line reads scores at a plateau as this close to it
FLAT = 0.01  # a fitted rise over the runs below this share of ceiling - floor is no rise
FLAT_SLOPE = 1e-9  # logits per decade: no rise at all, kept finite


@dataclass
class ScorePoint:
    name: str
    compute: float  # 6·N·D
    score: float


@dataclass
class ScoreLaw:
    floor: float
    ceiling: float
    slope: float  # logits per decade of compute
    log10_midpoint: float  # log10 C_mid; far outside the runs for a nearly flat fit

    def __call__(self, compute):
        x = np.log10(np.asarray(compute, dtype=float))
        return self.floor + (self.ceiling - self.floor) / (1 + np.exp(-self.slope * (x - self.log10_midpoint)))

    def compute_for(self, score: float) -> float:
        """The compute at which the law reaches `score` (inf when it never does)."""
        share = (score - self.floor) / (self.ceiling - self.floor)
        if not 0 < share < 1 or self.slope == 0:
            return math.inf
        exponent = self.log10_midpoint + math.log(share / (1 - share)) / self.slope
        return 10**exponent if exponent < 300 else math.inf  # a nearly flat fit reaches it nowhere near

    def to_dict(self) -> dict:
        return asdict(self)


def fit_score_law(points: Sequence[ScorePoint], floor: float = 0.0, ceiling: float = 1.0) -> ScoreLaw:
    if not ceiling > floor:
        raise ScalingFitError(f"--ceiling {ceiling} must be above --floor {floor}")
    x = np.log10([p.compute for p in points])
    distinct = len(np.unique(x))
    if distinct < SCORE_CONSTANTS:
        raise ScalingFitError(f"a score law has {SCORE_CONSTANTS} constants (slope, midpoint) but the sweep has "
                              f"{distinct} distinct compute budget(s); add runs of other sizes or token budgets")
    share = (np.array([p.score for p in points]) - floor) / (ceiling - floor)
    center = x.mean()  # fitted as sigmoid(a + b·(x - center)): finite for every start, flat data included
    clipped = np.clip(share, LOGIT_CLIP, 1 - LOGIT_CLIP)
    b0, a0 = np.polyfit(x - center, np.log(clipped / (1 - clipped)), 1)

    def residuals(theta):
        a, b = theta
        return 1 / (1 + np.exp(-(a + b * (x - center)))) - share

    a, b = least_squares(residuals, [a0, b0], method="lm", xtol=1e-15, ftol=1e-15, gtol=1e-15).x
    # Exactly flat scores (equal at every run) leave b exactly 0, and a level a != 0 has no finite midpoint:
    # a tiny slope keeps the level sigmoid(a) in (slope, midpoint) form, where 0 x inf would give NaN
    b = b if b != 0 or a == 0 else FLAT_SLOPE
    midpoint = center - a / b if b != 0 else center
    return ScoreLaw(floor=floor, ceiling=ceiling, slope=float(b), log10_midpoint=float(midpoint))


def score_warnings(points: Sequence[ScorePoint], law: ScoreLaw) -> List[str]:
    warnings = []
    if len({p.compute for p in points}) == SCORE_CONSTANTS:
        warnings.append(f"only {SCORE_CONSTANTS} distinct compute budgets for the {SCORE_CONSTANTS} constants: "
                        f"the curve passes through them and predicts nothing; add a third size or budget")
    outside = sum(not law.floor <= p.score <= law.ceiling for p in points)
    if outside:
        warnings.append(f"{outside} of {len(points)} scores lie outside [--floor {law.floor:g}, --ceiling "
                        f"{law.ceiling:g}], which the law never leaves: check the chance level given as --floor")
    computes = [p.compute for p in points]
    rise = float(law(max(computes)) - law(min(computes)))
    if rise <= FLAT * (law.ceiling - law.floor):
        warnings.append(f"the score does not rise with compute (fitted change {rise:.3g} over the runs, slope "
                        f"{law.slope:.3g}): the runs are too small or too short to move it; sweep larger compute")
    return warnings
