"""Decoder-only transformers: GPT-1 (post-LN), GPT-2 / GPT-3 / Megatron-LM / Turing-NLG (pre-LN).

forward: embed -> layers -> final_norm -> lm_head. A pipeline stage that lost its embeddings takes hidden
states (B, T, D) instead of token ids, and one without a head returns hidden states."""

from __future__ import annotations

import torch
from torch import nn

from scaletrain.configs.schema import ModelConfig
from scaletrain.models.blocks import (KVCache, attention_bias, last_token_index, make_layers, make_norm, make_positions,
                                      mask_backend, position_ids)
from scaletrain.models.init import init_model_weights


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embeddings = make_positions(cfg)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = make_layers(cfg, cfg.n_layers)
        self.final_norm = make_norm(cfg) if cfg.final_norm else None  # GPT-1 (post-LN) has none
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight
        # P(y | x) = softmax(h_T W_y) (GPT-1, eq. 3): no bias, as Hugging Face's GPT2ForSequenceClassification
        self.classifier = nn.Linear(cfg.d_model, cfg.num_labels, bias=False) if cfg.num_labels > 0 else None

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      positions: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """Incremental decoding passes a `cache` holding the keys/values of the earlier positions, the new
        tokens as input_ids (B, T), and attention_mask (B, cached + T) over every position; `positions`
        (B, T) overrides the default cached .. cached + T - 1 (left-padded prompts count from their first token)."""
        past = cache.length if cache is not None else 0
        if self.tok_embeddings is not None:
            x = self.tok_embeddings(input_ids)  # (B, T, D)
            if self.pos_embeddings is not None:
                x = x + self.pos_embeddings(positions if positions is not None
                                            else position_ids(input_ids, self.cfg, start=past))
            x = self.dropout(x)
        else:
            x = input_ids  # a later pipeline stage: already (B, T, D)
        T = x.shape[1]
        bias = attention_bias(attention_mask, True, T, past + T, x.dtype, x.device,
                              backend=mask_backend(self.cfg, x.device, self.training))
        for name, layer in self.layers.items():
            x = layer(x, bias=bias, is_causal=True, cache=cache.layer(name) if cache is not None else None)
        if cache is not None:
            cache.advance(T)
        return self.final_norm(x) if self.final_norm is not None else x

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        x = self.hidden_states(input_ids, attention_mask, positions, cache)
        return self.lm_head(x) if self.lm_head is not None else x  # (B, T, V)

    def classify(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """GPT finetuning reads the state of the last non-pad token (padding on the right)."""
        x = self.hidden_states(input_ids, attention_mask)  # (B, T, D)
        last = last_token_index(attention_mask, x.shape[0], x.shape[1], x.device)
        return self.classifier(x[torch.arange(x.shape[0], device=x.device), last])  # (B, num_labels)

    def init_weights(self, seed: int = 0) -> None:
        init_model_weights(self, self.cfg, seed)
