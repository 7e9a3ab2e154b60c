"""Text-to-text classification (data.text_to_text, T5 / BART): the model writes a record's label words as the
decoder's output. A prediction is the class whose framed label words (its table row, up to and including
</s>) greedy decoding reproduced exactly; anything else is no class (counted wrong)."""

from __future__ import annotations

import torch
from torch import nn

from scaletrain.inference.generate import full_logits
from scaletrain.models.blocks import IGNORE_INDEX


@torch.no_grad()
def greedy_tokens(model: nn.Module, batch: dict, steps: int, start_id: int) -> torch.Tensor:
    """(B, steps) greedy tokens after the start token. Always `steps` whole forwards (encoder too, no early
    stop, no cache): every rank of a sharded model runs the same collectives, and FSDP gathers the root's
    parameters only around forward()."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    decoded = torch.full((ids.shape[0], 1), start_id, dtype=torch.long, device=ids.device)
    for _ in range(steps):
        logits = full_logits(model(ids, decoded, mask))[:, -1]  # (B, V)
        decoded = torch.cat([decoded, logits.argmax(dim=-1, keepdim=True)], dim=1)
    return decoded[:, 1:]


def matched_classes(tokens: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """tokens (B, L) and the label targets (K, L), -100 after each end -> (B,) the class whose target the
    tokens spell exactly (what follows its </s> is never read), or K for none."""
    real = table != IGNORE_INDEX  # (K, L)
    equal = (tokens[:, None, :] == table[None]) | ~real[None]  # (B, K, L)
    spelled = equal.all(dim=-1)  # (B, K); distinct targets (label_word_targets): at most one per row
    none = torch.full((tokens.shape[0],), table.shape[0], dtype=torch.long, device=tokens.device)
    return torch.where(spelled.any(dim=-1), spelled.long().argmax(dim=-1), none)
