"""Model FLOPs per family (attention included), throughput, MFU and peak memory.

FLOPs count multiply-adds as 2 and only matmuls (norms, softmax and activations are a few % at most).
Notation per layer: d = d_model, a = n_heads * head_dim (the attention width), f = FFN width,
g = 3 if the FFN is gated (fc_in, fc_gate, fc_out) else 2, V = padded vocab, T = sequence length.

  attention projections, per token:  2 * d * 3a (q, k, v)  +  2 * a * d (out)
  attention itself, per query token: 2 * T_k * a (Q K^T)   +  2 * T_k * a (probs V)
      counted over all T_k keys even under a causal mask, as PaLM's and Megatron's MFU do: the model
      FLOPs of a layout do not depend on whether the kernel skips the masked half.
  MLP, per token:                    2 * d * f * g
  output projection, per token:      2 * d * V  (BERT's MLM head adds its d x d dense transform)

  decoder-only (GPT):  T tokens through n_layers layers, keys T, output projection on every token.
  encoder-only (BERT): the same with bidirectional attention, plus the MLM transform; the pooler and
                       NSP head are per sequence (2 * d * d + 2 * d * 2) and counted too. Given labels
                       the MLM head runs only on the labelled positions (models/bert.py), and only those
                       are counted: `mlm_positions`.
  encoder-decoder:     T_enc tokens through n_layers encoder layers (keys T_enc); T_dec tokens through
                       the decoder layers: self-attention (keys T_dec), cross-attention q/out on decoder
                       tokens, cross k/v projections on the T_enc encoder outputs (once per decoder layer),
                       cross scores over T_enc keys; the output projection on the T_dec tokens.
  XLNet:               the content stream over T rows, the query stream over M = num_predict rows, both
                       attending at the T positions to T (+ memory, when mems are passed) keys, plus the
                       relative positions (_xlnet_flops).

Training = forward + backward = 3 x forward (backward computes gradients for inputs and weights). Recompute
from activation checkpointing is not counted: MFU measures useful model FLOPs, not hardware FLOPs."""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from scaletrain.configs.schema import ModelConfig
from scaletrain.models.blocks import IGNORE_INDEX

TRAINING_MULTIPLIER = 3


def _layer_flops(d: int, a: int, f: int, gated: bool, tokens: int, keys: int) -> int:
    """Forward FLOPs of one self-attention + MLP layer for `tokens` queries attending to `keys` keys."""
    projections = 2 * d * 3 * a + 2 * a * d
    attention = 4 * keys * a
    mlp = 2 * d * f * (3 if gated else 2)
    return tokens * (projections + attention + mlp)


def _xlnet_flops(cfg: ModelConfig, batch_size: int, seq_len: int, num_predict: int, vocab: int,
                 memory: int = 0) -> tuple[int, int]:
    """XLNet (models/xlnet.py): (forward FLOPs, the part of them whose matmuls have one constant operand).
    T = seq_len tokens, K = T + `memory` keys (the previous segment's rows, only when mems are passed; training
    passes none), R relative positions (K + T bidirectional, K + 1 causal), M = num_predict query rows.
    Per layer and sequence:
      keys and values of the K context rows: 2 x 2Kda;
      content stream, T rows: q and out projections, the MLP, and its attention core over the T positions:
        q.k and the weighted sum over K keys (4TKa), q.r over the R positions (2TRa), the two segment scores;
      query stream, M rows: q and out projections and the MLP on M rows; its core runs at the T positions of
        its targets (target_mapping moves the M queries there and back: 2 x 2MTa).
    Per layer and batch: r_proj of the R positions (once per direction with bi_data). The head scores the M
    rows (all T without targets). The model's last content stream is not counted when there is a query
    stream: nothing reads it (the model computes it, but its output depends on it nowhere), only its keys and
    values. Constant operands: the positions (r_proj gets only a weight gradient) and target_mapping (only
    the moved stream gets one), so their matmuls cost 2x forward in training, not 3x."""
    d, a, f = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.ffn_dim
    mlp = 2 * d * f * (3 if cfg.activation.startswith("gated") else 2)
    T, M, K = seq_len, num_predict, seq_len + memory
    R = K + T if cfg.attn_type == "bi" else K + 1
    core = T * (4 * K * a + 2 * R * a + 2 * 2 * a)  # either stream, at the T positions
    content = T * (2 * d * a + 2 * a * d + mlp) + core
    moves = 2 * 2 * M * T * a
    query = M * (2 * d * a + 2 * a * d + mlp) + moves + core if M else 0
    keys_values = 2 * 2 * K * d * a
    layers = cfg.n_layers * (keys_values + query) + (cfg.n_layers - (1 if M else 0)) * content
    positions = cfg.n_layers * 2 * R * d * a * (2 if cfg.bi_data else 1)
    forward = batch_size * (layers + (M or T) * 2 * d * vocab) + positions
    return forward, positions + batch_size * cfg.n_layers * moves


def forward_flops(cfg: ModelConfig, batch_size: int, seq_len: int, decoder_len: int = 0, tp: int = 1,
                  mlm_positions: Optional[int] = None, memory: int = 0) -> int:
    """Forward FLOPs of one batch. `seq_len` is the (encoder) input length, `decoder_len` the target length
    (XLNet: the query stream's rows), `mlm_positions` the positions BERT's MLM head scores in the whole batch
    (None: every position), `memory` the rows of XLNet's mems passed in."""
    d, a, f = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.ffn_dim
    gated = cfg.activation.startswith("gated")
    vocab = cfg.padded_vocab_size(tp)
    if cfg.family == "gpt":
        return batch_size * (cfg.n_layers * _layer_flops(d, a, f, gated, seq_len, seq_len) + seq_len * 2 * d * vocab)
    if cfg.family == "bert":
        per_sequence = cfg.n_layers * _layer_flops(d, a, f, gated, seq_len, seq_len)
        per_sequence += (2 * d * d if cfg.pooler else 0) + (2 * d * 2 if cfg.nsp_head else 0)
        scored = batch_size * seq_len if mlm_positions is None else mlm_positions
        return batch_size * per_sequence + scored * (2 * d * d + 2 * d * vocab)  # MLM transform + tied decoder
    if cfg.family == "xlnet":
        return _xlnet_flops(cfg, batch_size, seq_len, decoder_len, vocab, memory)[0]
    t_enc, t_dec = seq_len, decoder_len or seq_len
    encoder = cfg.n_layers * _layer_flops(d, a, f, gated, t_enc, t_enc)
    decoder_self = _layer_flops(d, a, f, gated, t_dec, t_dec)
    cross = t_dec * (2 * d * a + 2 * a * d + 4 * t_enc * a) + t_enc * 2 * d * 2 * a
    return batch_size * (encoder + cfg.decoder_layers * (decoder_self + cross) + t_dec * 2 * d * vocab)


def training_flops(cfg: ModelConfig, batch_size: int, seq_len: int, decoder_len: int = 0, tp: int = 1,
                   mlm_positions: Optional[int] = None, memory: int = 0) -> int:
    flops = TRAINING_MULTIPLIER * forward_flops(cfg, batch_size, seq_len, decoder_len, tp, mlm_positions, memory)
    if cfg.family == "xlnet":  # matmuls with a constant operand compute one gradient in backward, not two
        flops -= _xlnet_flops(cfg, batch_size, seq_len, decoder_len, cfg.padded_vocab_size(tp), memory)[1]
    return flops


def batch_flops(cfg: ModelConfig, batch: dict) -> int:
    """Training FLOPs of one micro-batch from its tensor shapes (the same formula for every family)."""
    batch_size, seq_len = batch["input_ids"].shape
    decoder_len = batch["decoder_input_ids"].shape[1] if "decoder_input_ids" in batch else 0
    if "target_mapping" in batch:  # XLNet's query stream (training passes no mems)
        decoder_len = batch["target_mapping"].shape[1]
    mlm_positions = None
    if cfg.family == "bert" and "labels" in batch:  # what the trainer passes: the head scores these only
        mlm_positions = int((batch["labels"] != IGNORE_INDEX).sum())
    return training_flops(cfg, batch_size, seq_len, decoder_len, mlm_positions=mlm_positions)


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Total and non-embedding parameters (Kaplan et al.: without token, position and type tables). Shared
    (tied) parameters count once; sharded DTensor parameters count with their global size."""
    total = non_embedding = 0
    for name, param in model.named_parameters():
        numel = getattr(param, "ds_numel", None) or param.numel()  # DeepSpeed ZeRO-3 leaves an empty local tensor
        total += numel
        if "embeddings" not in name:
            non_embedding += numel
    return {"params": total, "non_embedding_params": non_embedding}


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated accelerator memory; on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


@dataclass
class Throughput:
    """Tokens, FLOPs and seconds of the training steps since the last report -> tokens/s, TFLOP/s per
    device and MFU. Only step time counts (data loading included): evaluation and checkpoint saves are
    not training throughput."""

    peak_tflops: float  # per device, for the run's precision; 0 means unknown (MFU not reported)
    world_size: int = 1
    tokens: int = 0
    flops: int = 0
    seconds: float = 0.0

    def add(self, tokens: int, flops: int, seconds: float) -> None:
        """`tokens` and `flops` of one step over all ranks."""
        self.tokens += tokens
        self.flops += flops
        self.seconds += seconds

    def report(self) -> dict[str, Optional[float]]:
        """The window's rates; starts a new window."""
        elapsed = max(self.seconds, 1e-9)
        tflops_per_device = self.flops / elapsed / self.world_size / 1e12
        metrics = {"tokens_per_s": self.tokens / elapsed, "tflops": tflops_per_device,
                   "mfu": tflops_per_device / self.peak_tflops if self.peak_tflops > 0 else None}
        self.tokens, self.flops, self.seconds = 0, 0, 0.0
        return metrics
