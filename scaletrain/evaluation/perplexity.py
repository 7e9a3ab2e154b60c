"""Perplexity of a left-to-right LM on a token stream, token-weighted: exp(sum of the next-token NLLs / the
number of predicted tokens). The stream is cut into windows of `window + 1` tokens every `window` tokens (as
training reads it: every token is predicted once, with up to `window` tokens of context; the last, shorter
window is scored too), so the figure equals the training loss's definition on unseen text."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from scaletrain.inference.generate import full_logits, pad_batch


@dataclass
class Perplexity:
    perplexity: float
    loss: float  # mean NLL per predicted token (nats)
    tokens: int  # predicted tokens
    windows: int


def windows(stream, window: int) -> list[np.ndarray]:
    """(window + 1)-token slices every `window` tokens; the last keeps what is left (at least 2 tokens)."""
    return [np.asarray(stream[start:start + window + 1], dtype=np.int64)
            for start in range(0, max(len(stream) - 1, 0), window)]


@torch.no_grad()
def perplexity(model: nn.Module, stream, window: int, batch_size: int = 8, device="cpu",
               progress: bool = True) -> Perplexity:
    pieces = windows(stream, window)
    total_nll, total_tokens = 0.0, 0
    for first in tqdm(range(0, len(pieces), batch_size), desc="perplexity", unit="batch", disable=not progress,
                      leave=False):
        # right-padded: a causal model's real tokens never see the pads
        ids, mask = pad_batch([piece.tolist() for piece in pieces[first:first + batch_size]], pad_id=0, left=False,
                              device=device)
        logits = full_logits(model(ids[:, :-1])).float()  # (B, T, V)
        nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # (B, T)
        predicted = mask[:, 1:].bool()
        total_nll += float(nll[predicted].double().sum())
        total_tokens += int(predicted.sum())
    loss = total_nll / max(total_tokens, 1)
    return Perplexity(math.exp(min(loss, 700.0)), loss, total_tokens, len(pieces))
