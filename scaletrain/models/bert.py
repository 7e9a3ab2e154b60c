"""Encoder-only transformers: BERT (post-LN, embedding LayerNorm, pooler, tied MLM head, NSP head) and
RoBERTa (the same network; positions counted from the padding index, one token type, no NSP)."""

from __future__ import annotations

import torch
from torch import nn

from scaletrain.configs.schema import ModelConfig
from scaletrain.models.blocks import (IGNORE_INDEX, Norm, Pooler, activation, attention_bias, make_layers, make_norm,
                                      make_positions, mask_backend, position_ids)
from scaletrain.models.init import init_model_weights


class MLMHead(nn.Module):
    """dense -> activation -> LayerNorm -> decoder (weight tied to the token embeddings) + per-token bias."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.activation
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.norm = Norm(cfg.d_model, "layernorm", cfg.norm_eps, cfg.kernels)
        self.decoder = nn.Linear(cfg.d_model, cfg.vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(activation(self.dense(x), self.kind)))  # (B, T, V)


class BERT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embeddings = make_positions(cfg)
        self.type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.d_model) if cfg.type_vocab_size else None
        self.embedding_norm = make_norm(cfg) if cfg.embedding_norm else None
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = make_layers(cfg, cfg.n_layers)
        self.final_norm = make_norm(cfg) if cfg.final_norm else None  # only a pre-LN variant needs one
        self.pooler = Pooler(cfg) if cfg.pooler else None
        self.mlm_head = MLMHead(cfg)
        if cfg.tie_embeddings:
            self.mlm_head.decoder.weight = self.tok_embeddings.weight
        self.nsp_head = nn.Linear(cfg.d_model, 2) if cfg.nsp_head else None
        self.classifier = nn.Linear(cfg.d_model, cfg.num_labels) if cfg.num_labels > 0 else None

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        x = self.tok_embeddings(input_ids)  # (B, T, D)
        if self.pos_embeddings is not None:
            x = x + self.pos_embeddings(position_ids(input_ids, self.cfg))
        if self.type_embeddings is not None:
            types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
            x = x + self.type_embeddings(types)
        if self.embedding_norm is not None:
            x = self.embedding_norm(x)
        return self.dropout(x)

    def hidden_states(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        # a later pipeline stage has no embeddings and receives hidden states (B, T, D)
        x = self.embed(input_ids, token_type_ids) if self.tok_embeddings is not None else input_ids
        T = x.shape[1]
        bias = attention_bias(attention_mask, False, T, T, x.dtype, x.device,
                              backend=mask_backend(self.cfg, x.device, self.training))
        for layer in self.layers.values():
            x = layer(x, bias=bias)
        return self.final_norm(x) if self.final_norm is not None else x

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None):
        """MLM logits (B, T, V) and NSP logits (B, 2) or None. With MLM `labels` (B, T) the head scores only
        the N labelled positions (about 15%) and returns (N, V) in row-major order, as fairseq's RoBERTa
        does: the D x V decoder is the largest matmul of a small BERT, and the other 85% of its output
        would be thrown away by the loss, which picks the same positions (registry.bert_loss)."""
        x = self.hidden_states(input_ids, token_type_ids, attention_mask)
        if self.mlm_head is None:
            return x
        nsp_logits = self.nsp_head(self.pooler(x)) if self.nsp_head is not None else None  # (B, 2)
        scored = x if labels is None else x[labels != IGNORE_INDEX]  # (B, T, D) or (N, D)
        return self.mlm_head(scored), nsp_logits

    def classify(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.hidden_states(input_ids, token_type_ids, attention_mask)
        summary = self.pooler(x) if self.pooler is not None else x[:, 0]  # [CLS]
        return self.classifier(self.dropout(summary))  # (B, num_labels)

    def init_weights(self, seed: int = 0) -> None:
        init_model_weights(self, self.cfg, seed)
