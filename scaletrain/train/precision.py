"""Mixed precision. Parameters and optimizer state always stay fp32 (the master weights); autocast runs the
matmuls in bf16 or fp16. fp16's 5-bit exponent underflows small gradients, so its loss is multiplied by a
dynamic scale: an overflow (Inf/NaN in any gradient on any rank) skips the update and halves the scale,
and `growth_interval` clean steps in a row double it again."""

from __future__ import annotations

import contextlib
from typing import Any, Iterable

import torch
import torch.distributed as dist

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device_type: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=AUTOCAST_DTYPES[precision])


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's shard on this rank (sharded gradients are checked shard by shard)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def grads_are_finite(params: Iterable[torch.Tensor], group=None) -> bool:
    """True when no gradient on any rank holds Inf/NaN. One CPU-GPU sync and one all-reduce."""
    grads = [_local(p.grad) for p in params if p.grad is not None]
    bad = torch.zeros((), device=grads[0].device if grads else "cpu")
    for grad in grads:
        bad = bad + (~torch.isfinite(grad)).any().float()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=group)
    return bool(bad.item() == 0)


class LossScaler:
    """Dynamic loss scale for fp16; with `enabled=False` (fp32, bf16) it scales by 1 and never changes."""

    def __init__(self, enabled: bool, init_scale: float = 2.0**16, growth_interval: int = 1000,
                 growth_factor: float = 2.0, backoff_factor: float = 0.5):
        self.enabled = enabled
        self.scale = float(init_scale) if enabled else 1.0
        self.growth_interval, self.growth_factor, self.backoff_factor = growth_interval, growth_factor, backoff_factor
        self.clean_steps = 0  # updates since the last overflow or growth

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale if self.enabled else loss

    def unscale_(self, params: Iterable[torch.Tensor]) -> None:
        if not self.enabled:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, 1.0 / self.scale)

    def update(self, found_overflow: bool) -> None:
        if not self.enabled:
            return
        if found_overflow:
            self.scale *= self.backoff_factor
            self.clean_steps = 0
            return
        self.clean_steps += 1
        if self.clean_steps >= self.growth_interval:
            self.scale *= self.growth_factor
            self.clean_steps = 0

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "clean_steps": self.clean_steps, "enabled": self.enabled}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("enabled", self.enabled) == self.enabled:
            self.scale, self.clean_steps = float(state["scale"]), int(state["clean_steps"])
        # Switching precision on resume (fp16 <-> bf16/fp32) starts a fresh scale.
