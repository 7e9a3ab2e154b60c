"""Encoder-decoder transformers: the original Transformer (sinusoidal positions, post-LN, embeddings shared
by encoder, decoder and output), T5 v1.0 / v1.1 (RMSNorm, relative position buckets, no attention scaling)
and BART (post-LN, embedding LayerNorm, learned positions offset by 2, final_logits_bias).

The token embedding table `tok_embeddings` is shared at the top level; each stack owns its positions,
embedding norm, T5 relative bias, layers and final norm."""

from __future__ import annotations

import math

import torch
from torch import nn

from scaletrain.configs.schema import ModelConfig
from scaletrain.models.blocks import (KVCache, Pooler, RelativePositionBias, attention_bias, last_token_index,
                                      make_layers, make_norm, make_positions, mask_backend, position_ids)
from scaletrain.models.init import init_model_weights


class Stack(nn.Module):
    """Encoder (bidirectional) or decoder (causal, with cross-attention to the encoder output)."""

    def __init__(self, cfg: ModelConfig, decoder: bool):
        super().__init__()
        self.cfg, self.is_decoder = cfg, decoder
        self.pos_embeddings = make_positions(cfg)
        self.embedding_norm = make_norm(cfg) if cfg.embedding_norm else None
        relative = cfg.position == "relative"  # T5: bidirectional buckets in the encoder, causal in the decoder
        self.relative_bias = RelativePositionBias(cfg, bidirectional=not decoder) if relative else None
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = make_layers(cfg, cfg.decoder_layers if decoder else cfg.n_layers, cross_attention=decoder)
        self.final_norm = make_norm(cfg) if cfg.final_norm else None

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                memory: torch.Tensor | None = None, memory_mask: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """x: (B, T, D) scaled token embeddings, or hidden states when `input_ids` is None (a later pipeline
        stage). memory: (B, S, D) encoder output for the decoder. cache (decoder, incremental decoding): the
        earlier positions' self-attention keys/values and the cross-attention ones of `memory`;
        attention_mask then spans cached + T positions."""
        past = cache.length if cache is not None else 0
        if input_ids is not None:
            if self.pos_embeddings is not None:
                x = x + self.pos_embeddings(position_ids(input_ids, self.cfg, start=past))
            if self.embedding_norm is not None:
                x = self.embedding_norm(x)
            x = self.dropout(x)
        T = x.shape[1]
        position_bias = self.relative_bias(T, past + T) if self.relative_bias is not None else None
        backend = mask_backend(self.cfg, x.device, self.training)
        bias = attention_bias(attention_mask, self.is_decoder, T, past + T, x.dtype, x.device, position_bias,
                              backend=backend)
        memory_bias = None
        if self.is_decoder and memory_mask is not None:
            memory_bias = attention_bias(memory_mask, False, T, memory.shape[1], x.dtype, x.device, backend=backend)
        for name, layer in self.layers.items():
            x = layer(x, bias=bias, is_causal=self.is_decoder, memory=memory, memory_bias=memory_bias,
                      cache=cache.layer(name) if cache is not None else None)
        if cache is not None:
            cache.advance(T)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return self.dropout(x) if self.relative_bias is not None else x  # T5 drops out after the final norm


class EncoderDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.embed_scale = math.sqrt(cfg.d_model) if cfg.scale_embeddings else 1.0
        self.encoder = Stack(cfg, decoder=False)
        self.decoder = Stack(cfg, decoder=True)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight
        if cfg.final_logits_bias:
            self.register_buffer("final_logits_bias", torch.zeros(1, cfg.vocab_size))
        else:
            self.final_logits_bias = None
        self.pooler = Pooler(cfg) if cfg.pooler else None  # with it, the head is Hugging Face's dense-tanh-out_proj
        self.dropout = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(cfg.d_model, cfg.num_labels) if cfg.num_labels > 0 else None

    @torch.no_grad()
    def reset_buffers(self) -> None:
        if self.final_logits_bias is not None:
            self.final_logits_bias.zero_()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.tok_embeddings(input_ids) * self.embed_scale  # (B, T, D)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.encoder(self.embed(input_ids), input_ids, attention_mask)  # (B, S, D)

    def decode(self, decoder_input_ids: torch.Tensor, memory: torch.Tensor, attention_mask: torch.Tensor | None = None,
               decoder_attention_mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        x = self.embed(decoder_input_ids)
        return self.decoder(x, decoder_input_ids, decoder_attention_mask, memory, attention_mask, cache)  # (B, T, D)

    def output_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Decoder states (B, T, D) -> logits (B, T, V)."""
        if self.cfg.scale_decoder_output:
            x = x * self.cfg.d_model**-0.5  # T5 v1.0 rescales before the tied lm_head
        logits = self.lm_head(x)  # (B, T, V)
        return logits + self.final_logits_bias if self.final_logits_bias is not None else logits

    def forward(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None,
                decoder_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        memory = self.encode(input_ids, attention_mask)
        return self.output_logits(self.decode(decoder_input_ids, memory, attention_mask, decoder_attention_mask))

    def classify(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None = None,
                 decoder_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Reads the decoder's final state at its last non-pad token (BART feeds the whole text to both)."""
        memory = self.encode(input_ids, attention_mask)
        x = self.decode(decoder_input_ids, memory, attention_mask, decoder_attention_mask)  # (B, T, D)
        last = last_token_index(decoder_attention_mask, x.shape[0], x.shape[1], x.device)
        summary = x[torch.arange(x.shape[0], device=x.device), last]  # (B, D)
        if self.pooler is not None:
            summary = self.pooler(summary[:, None])
        return self.classifier(self.dropout(summary))  # (B, num_labels)

    def init_weights(self, seed: int = 0) -> None:
        init_model_weights(self, self.cfg, seed)
