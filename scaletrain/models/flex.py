"""FlexAttention for the masked and biased cases, where SDPA on a GPU falls back to its math kernel.

Causality and padding become a block mask (FlexAttention skips whole blocks of masked keys and never
materializes (B, H, Tq, Tk) scores); T5's learned bias becomes a score_mod that reads the (1, H, Tq, Tk)
table, which FlexAttention differentiates as a captured tensor. FlexAttention has no dropout on the
attention probabilities, so blocks.mask_backend keeps SDPA for a training run with attention dropout.

torch 2.13 has no FlexAttention backward on the CPU; there the forward (inference) runs the unfused
reference, which the tests compare with SDPA. On CUDA the kernel is compiled once per process."""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch

from scaletrain.errors import ConfigError


@functools.cache
def flex_available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401  (torch >= 2.5)
    except ImportError:
        return False
    return True


@functools.cache
def _flex_kernel(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    # dynamic=False: one kernel per shape, as training reuses a few shapes; compile fuses score_mod/mask_mod
    return torch.compile(flex_attention, dynamic=False) if compiled else flex_attention


@dataclass(eq=False)
class FlexBias:
    """The pieces of an attention mask kept apart: key padding (B, Tk), causality, T5's (1, H, Tq, Tk) bias."""

    attention_mask: torch.Tensor | None
    causal: bool
    q_len: int
    k_len: int
    device: torch.device
    position_bias: torch.Tensor | None = None

    def __post_init__(self) -> None:
        # built once per stack forward and shared by its layers
        self.block_mask = self._block_mask() if self.causal or self.attention_mask is not None else None
        self.score_mod = self._score_mod() if self.position_bias is not None else None

    def _score_mod(self):
        table = self.position_bias  # (1, H, Tq, Tk)

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + table[0, h, q_idx, kv_idx].to(score.dtype)
        return score_mod

    def _block_mask(self):
        from torch.nn.attention.flex_attention import create_block_mask

        keep = self.attention_mask.to(self.device) != 0 if self.attention_mask is not None else None  # (B, Tk)
        offset = self.k_len - self.q_len  # queries are the last q_len of the k_len positions (KV cache)
        causal = self.causal

        def mask_mod(b, h, q_idx, kv_idx):
            allowed = kv_idx <= q_idx + offset if causal else kv_idx >= 0
            return allowed & keep[b, kv_idx] if keep is not None else allowed

        batch = keep.shape[0] if keep is not None else None
        return create_block_mask(mask_mod, batch, None, self.q_len, self.k_len, device=self.device)


def flex_attention_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: FlexBias,
                        scale: float | None) -> torch.Tensor:
    """(B, H, Tq|Tk, Dh) -> (B, H, Tq, Dh). Under tensor parallelism q/k/v and the bias hold this rank's
    heads, so h indexes local heads on both."""
    if q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad:
        raise ConfigError("model.attention=flex has no backward on the CPU in this torch; train with "
                          "model.attention=auto or sdpa (flex runs forward-only on the CPU)")
    score_mod, block_mask = bias.score_mod, bias.block_mask
    if q.device.type != "cpu":
        return _flex_kernel(compiled=True)(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)
    with warnings.catch_warnings():  # the unfused CPU reference is the point here, not a mistake
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return _flex_kernel(compiled=False)(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)
