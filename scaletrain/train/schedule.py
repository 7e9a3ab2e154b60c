"""Learning-rate schedules as pure functions of the optimizer step, so resuming needs only the step count.

`step` counts optimizer updates already taken: the first update uses lr_at(0). Every schedule ramps
linearly over `warmup_steps` (lr * (step + 1) / warmup, so the first update never has lr = 0), then:
  cosine        half a cosine from lr down to lr * min_lr_ratio at total_steps, flat afterwards
  linear        a straight line from lr down to lr * min_lr_ratio at total_steps
  constant      lr
  inverse_sqrt  lr * sqrt(warmup / step): the original Transformer's d^-0.5 * min(s^-0.5, s * w^-1.5) with
                the peak at the end of warmup, and T5's 1/sqrt(max(s, w)) (T5 sets warmup_steps=10000)."""

from __future__ import annotations

import math
from typing import Any

from scaletrain.configs.schema import OptimConfig


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    warmup = cfg.warmup_steps
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "inverse_sqrt":
        return cfg.lr * math.sqrt(max(warmup, 1) / max(step, 1))
    min_lr = cfg.lr * cfg.min_lr_ratio
    decay_steps = max(total_steps - warmup, 1)
    progress = min((step - warmup) / decay_steps, 1.0)
    if cfg.schedule == "linear":
        return cfg.lr - (cfg.lr - min_lr) * progress
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1.0 + math.cos(math.pi * progress))  # cosine


class LRSchedule:
    """Sets every param group's lr before each update. Groups may carry an `lr_scale` (default 1)."""

    def __init__(self, optimizer, cfg: OptimConfig, total_steps: int):
        self.optimizer, self.cfg, self.total_steps = optimizer, cfg, total_steps
        self.step_count = 0
        self._apply()

    @property
    def lr(self) -> float:
        return lr_at(self.step_count, self.cfg, self.total_steps)

    def _apply(self) -> None:
        lr = self.lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {"step_count": self.step_count, "schedule": self.cfg.schedule, "total_steps": self.total_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # The schedule's shape comes from the (possibly edited) config; only the position is restored.
        self.step_count = int(state["step_count"])
        self._apply()
