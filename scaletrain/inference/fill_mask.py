"""Fill-mask: the lecture's "University of Minnesota is located in [MASK], Minnesota." Each mask of the
text is filled independently from one forward: the softmax over the vocabulary at its position, top-k.
Works on token ids; inference/cli.py turns text into ids and the fillers into a table."""

from __future__ import annotations

import torch
from torch import nn

from scaletrain.errors import InputError
from scaletrain.models.blocks import IGNORE_INDEX


@torch.no_grad()
def fill_mask(model: nn.Module, input_ids: list[int], mask_id: int, top_k: int = 5) -> list[list[tuple[int, float]]]:
    """Token ids with one or more `mask_id` -> for each mask, in text order, the top_k (token id, probability)
    pairs, most probable first."""
    if model.cfg.family != "bert":
        kind = "decoder-only (GPT)" if model.cfg.family == "gpt" else "encoder-decoder"
        raise InputError(f"fill-mask needs a masked language model (BERT, RoBERTa); this is a {kind} model: "
                         f"use scaletrain generate")
    if top_k < 1:
        raise InputError(f"--top-k={top_k} must be at least 1")
    device = next(model.parameters()).device
    ids = torch.tensor([input_ids], dtype=torch.long, device=device)  # (1, T)
    is_mask = ids == mask_id
    if not bool(is_mask.any()):
        raise InputError("the text has no mask token; write [MASK] (or the tokenizer's own mask token) where a "
                         "word should be filled in")
    # labels at the masks only: the MLM head scores just those positions, (N, V) in text order
    labels = torch.where(is_mask, ids, IGNORE_INDEX)
    was_training = model.training
    model.eval()
    try:
        logits, _ = model(ids, labels=labels)
    finally:
        model.train(was_training)
    top = logits.float().softmax(dim=-1).topk(min(top_k, logits.shape[-1]), dim=-1)
    return [list(zip(ids_row, probs_row)) for ids_row, probs_row in zip(top.indices.tolist(), top.values.tolist())]
