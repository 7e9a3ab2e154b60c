"""Blocks shared by the three families: attention on SDPA, MLP, norms, positions and the transformer block.

Shapes: B batch, T (Tq, Tk) sequence, D d_model, H heads, Dh head dim, V vocab. Norms, activations and the
loss live in small named functions so the kernels layer can later route them through fused ops."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from scaletrain import kernels
from scaletrain.configs.schema import ModelConfig
from scaletrain.models.flex import FlexBias, flex_attention_core, flex_available


# ----------------------------------------------------------------------------------------- functional ops

def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # T5: no mean subtraction, no bias; the variance is taken in fp32 even under bf16/fp16. One fp32 copy
    # serves both uses, so autograd keeps one (B, T, D) fp32 tensor for backward instead of two.
    x32 = x.float()
    variance = x32.pow(2).mean(-1, keepdim=True)
    return weight * (x32 * torch.rsqrt(variance + eps)).to(weight.dtype)


def activation(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind in ("gelu_tanh", "gated_gelu"):  # GPT-2's gelu_new and T5 v1.1's gated-gelu are the tanh form
        return F.gelu(x, approximate="tanh")
    if kind == "gelu":
        return F.gelu(x)
    return F.relu(x)  # relu, gated_relu


def fused_impl(choice: str, device: torch.device) -> str:
    """model.kernels -> "torch" (the plain ops of this file) or "triton" (kernels/). Under "compile" the
    parallel plan compiles each block whole, so the ops inside stay plain torch for the compiler to fuse."""
    impl = kernels.resolve_impl(choice, device)
    return "torch" if impl == "compile" else impl


IGNORE_INDEX = -100  # label of a position no loss scores (PyTorch's and Hugging Face's convention)


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor,
                      kernels_choice: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(..., V) logits, (...) labels with -100 ignored -> (summed loss in fp32, number of counted labels).
    Neither kernel holds the fp32 softmax: Triton works in chunks of the vocab; on CPU the torch backend
    works in cache-sized chunks of rows (1.5-2x faster than F.cross_entropy). Vocab-sharded DTensor logits
    (tensor parallel) take F.cross_entropy under torch's loss_parallel context."""
    flat_logits, flat_labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    impl = fused_impl(kernels_choice, logits.device)
    if impl == "triton" or (logits.device.type == "cpu" and type(logits) is torch.Tensor):
        loss = kernels.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="sum", impl=impl)
    else:
        loss = F.cross_entropy(flat_logits.float(), flat_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss.float(), (labels != IGNORE_INDEX).sum()


# ---------------------------------------------------------------------------------------------- masks

def attention_backend(choice: str, device: torch.device) -> str:
    """model.attention -> "sdpa" | "flex". auto: FlexAttention on CUDA, where SDPA would run its math kernel
    for any float mask (padding, T5's bias) and hold the (B, H, Tq, Tk) scores; SDPA elsewhere: torch's
    FlexAttention has no CPU backward, and SDPA's CPU flash kernel already takes masks that need no gradient."""
    if choice == "auto":
        return "flex" if device.type == "cuda" and flex_available() else "sdpa"
    return choice


def mask_backend(cfg: ModelConfig, device: torch.device, training: bool) -> str:
    """The form attention_bias builds for a stack: FlexAttention has no dropout on the probabilities, so a
    training run with attention dropout keeps SDPA (and its dense mask)."""
    backend = attention_backend(cfg.attention, device)
    if backend == "flex" and training and cfg.attn_dropout > 0.0:
        return "sdpa"
    return backend


def attention_bias(attention_mask: torch.Tensor | None, causal: bool, q_len: int, k_len: int,
                   dtype: torch.dtype, device: torch.device,
                   position_bias: torch.Tensor | None = None, backend: str = "sdpa"):
    """What attention adds to its scores, built once per stack and shared by its layers: None when plain
    (causal) SDPA suffices, a FlexBias for backend "flex", else an additive float mask (B|1, H|1, Tq, Tk).

    attention_mask (B, Tk) holds 1 for tokens and 0 for padding; position_bias (1, H, Tq, Tk) is T5's."""
    if attention_mask is None and position_bias is None and (not causal or q_len in (1, k_len)):
        return None  # the caller passes is_causal=causal to SDPA (Attention skips it for one query)
    if backend == "flex" and q_len > 1:  # one query (a decoding step): the dense (B, 1, 1, Tk) mask is tiny
        return FlexBias(attention_mask, causal, q_len, k_len, device, position_bias)
    return dense_attention_bias(attention_mask, causal, q_len, k_len, dtype, device, position_bias)


def dense_attention_bias(attention_mask: torch.Tensor | None, causal: bool, q_len: int, k_len: int,
                         dtype: torch.dtype, device: torch.device,
                         position_bias: torch.Tensor | None = None) -> torch.Tensor:
    """(B|1, H|1, Tq, Tk) additive mask for SDPA. A large finite negative (not -inf) keeps rows that see no
    key at all finite, as Hugging Face does."""
    neg = torch.finfo(dtype).min
    bias = torch.zeros(1, 1, q_len, k_len, dtype=dtype, device=device)
    if causal:
        # queries are the last q_len positions of the k_len keys (fewer queries than keys with a KV cache;
        # SDPA's is_causal would align them with the first keys instead)
        future = torch.ones(q_len, k_len, dtype=torch.bool, device=device).triu(k_len - q_len + 1)
        bias = bias.masked_fill(future, neg)
    if attention_mask is not None:
        padding = attention_mask[:, None, None, :].to(device) == 0  # (B, 1, 1, Tk)
        bias = bias.masked_fill(padding, neg)
    if position_bias is not None:
        bias = bias + position_bias.to(dtype)
    return bias


# ---------------------------------------------------------------------------------------------- norms

class Norm(nn.Module):
    """LayerNorm (weight + bias) or T5's RMSNorm (weight only)."""

    def __init__(self, dim: int, kind: str = "layernorm", eps: float = 1e-5, kernels_choice: str = "auto"):
        super().__init__()
        self.kind, self.eps, self.kernels_choice = kind, eps, kernels_choice
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if kind == "layernorm" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_impl(self.kernels_choice, x.device) == "triton":
            if self.kind == "rmsnorm":
                return kernels.rms_norm(x, self.weight, self.eps, impl="triton")
            return kernels.layer_norm(x, self.weight, self.bias, self.eps, impl="triton")
        if self.kind == "rmsnorm":
            return rms_norm(x, self.weight, self.eps)
        return layer_norm(x, self.weight, self.bias, self.eps)


def make_norm(cfg: ModelConfig) -> Norm:
    return Norm(cfg.d_model, cfg.norm, cfg.norm_eps, cfg.kernels)


# ------------------------------------------------------------------------------------------ attention

@contextlib.contextmanager
def rng_stream(device: torch.device, stream: int):
    """Run the body on a forked RNG seeded by one draw of the global RNG mixed with `stream`, so ranks that
    are seeded alike (the tp ranks of one replica) draw different dropout masks for their shards
    (Megatron's model-parallel RNG region). The fork is derived from the global state, which advances
    alike on every rank (replicated dropout stays in sync), which activation checkpointing's recompute
    restores (same masks), and which checkpoints already save (exact resume)."""
    seed = int(torch.randint(2**62, (1,), device="cpu").item()) + stream  # on the CPU: no device sync
    accelerator = device.type != "cpu"
    with torch.random.fork_rng(devices=[device] if accelerator else [],
                               device_type=device.type if accelerator else None):
        torch.default_generator.manual_seed(seed)
        if accelerator:  # only this device: torch.manual_seed would reseed every device, unforked
            device_module = torch.get_device_module(device.type)
            with device_module.device(device):
                device_module.manual_seed(seed)
        yield


def attention_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | FlexBias | None,
                   is_causal: bool, dropout_p: float, scale: float | None, stream: int) -> torch.Tensor:
    """SDPA (FlexAttention for a FlexBias) on (B, H, Tq|Tk, Dh) -> (B, H, Tq, Dh). stream 0 draws the dropout
    mask from the global RNG as a single-device model does; a nonzero stream (tensor parallel: tp_rank + 1,
    each rank holding H/tp heads) draws it inside rng_stream."""
    if isinstance(bias, FlexBias):  # mask_backend builds one only when attention dropout is off
        return flex_attention_core(q, k, v, bias, scale)
    forked = dropout_p > 0.0 and stream != 0
    with rng_stream(q.device, stream) if forked else contextlib.nullcontext():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=is_causal,
                                              dropout_p=dropout_p, scale=scale)


class AttentionCache:
    """Keys and values (B, H, T, Dh) one attention module has computed, for incremental decoding.
    Self-attention writes each call's new positions into a buffer of `capacity` positions allocated on the
    first call (no re-concatenation per token); cross-attention (static) projects the encoder output once,
    on the first call, and every later call reuses it."""

    def __init__(self, capacity: int, static: bool = False):
        self.capacity, self.static = capacity, static
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """New (B, H, T, Dh) keys/values -> every cached position so far, (B, H, length + T, Dh)."""
        B, H, T, Dh = k.shape
        if self.k is None:
            self.k = k.new_empty(B, H, self.capacity, Dh)
            self.v = v.new_empty(B, H, self.capacity, Dh)
        if self.length + T > self.capacity:
            raise ValueError(f"KV cache of {self.capacity} positions cannot take {self.length + T}")
        self.k[:, :, self.length:self.length + T] = k
        self.v[:, :, self.length:self.length + T] = v
        self.length += T
        return self.k[:, :, :self.length], self.v[:, :, :self.length]

    def reorder(self, index: torch.Tensor) -> None:
        """Beam search: row b of the batch continues from row index[b]. A static (cross-attention) cache
        is left alone: beams only move within their own example, whose rows hold the same encoder output."""
        if self.k is not None and not self.static:
            self.k[:, :, :self.length] = self.k[index, :, :self.length]
            self.v[:, :, :self.length] = self.v[index, :, :self.length]


@dataclass
class LayerCache:
    self_attn: AttentionCache
    cross_attn: AttentionCache  # static; unused by a decoder-only model


class KVCache:
    """The attention caches of a decoder stack, one LayerCache per layer name, and `length`: the positions
    already seen, so the position of the next call's first token."""

    def __init__(self, capacity: int):
        self.capacity, self.length = capacity, 0
        self.layers: dict[str, LayerCache] = {}

    def layer(self, name: str) -> LayerCache:
        if name not in self.layers:
            self.layers[name] = LayerCache(AttentionCache(self.capacity), AttentionCache(self.capacity, static=True))
        return self.layers[name]

    def advance(self, new_positions: int) -> None:
        self.length += new_positions

    def reorder(self, index: torch.Tensor) -> None:
        for layer in self.layers.values():
            layer.self_attn.reorder(index)
            layer.cross_attn.reorder(index)


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v/out projections; self or cross (pass `memory`).
    The inner width H * Dh may differ from D (T5-11B: 128 heads x 128 over d_model 1024)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        inner = self.n_heads * self.head_dim
        self.q_proj = nn.Linear(cfg.d_model, inner, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.d_model, inner, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.d_model, inner, bias=cfg.bias)
        self.out_proj = nn.Linear(inner, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.attn_dropout
        self.scale = None if cfg.scale_attention else 1.0  # None: SDPA's default 1/sqrt(Dh)
        self.dropout_stream = 0  # 0: single-device dropout; tp sets tp_rank + 1 (see attention_core)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                is_causal: bool = False, cache: AttentionCache | None = None) -> torch.Tensor:
        """cache: keys/values of earlier calls (incremental decoding); `bias` then spans every cached key."""
        source = x if memory is None else memory
        B, Tq, _ = x.shape
        # (B, T, H*Dh) -> (B, H, T, Dh); -1 lets a tensor-parallel shard carry fewer heads
        q = self.q_proj(x).view(B, Tq, -1, self.head_dim).transpose(1, 2)
        if cache is not None and cache.static and cache.k is not None:
            k, v = cache.k, cache.v  # cross-attention: the encoder output was projected on the first call
        else:
            Tk = source.shape[1]
            k = self.k_proj(source).view(B, Tk, -1, self.head_dim).transpose(1, 2)
            v = self.v_proj(source).view(B, Tk, -1, self.head_dim).transpose(1, 2)
            if cache is not None and cache.static:
                cache.k, cache.v = k, v
            elif cache is not None:
                k, v = cache.append(k, v)
        # one query (a decoding step) is the last position and sees every key: SDPA's is_causal would
        # align it with the first key instead
        causal = is_causal and bias is None and Tq > 1
        y = attention_core(q, k, v, bias, causal, self.dropout if self.training else 0.0,
                           self.scale, self.dropout_stream)
        return self.out_proj(y.transpose(1, 2).reshape(B, Tq, -1))  # (B, Tq, D)


# ------------------------------------------------------------------------------------------------ MLP

class MLP(nn.Module):
    """fc_out(act(fc_in(x))); gated: fc_out(act(fc_gate(x)) * fc_in(x)) (T5 v1.1: fc_gate = wi_0, fc_in = wi_1)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind, self.kernels_choice = cfg.activation, cfg.kernels
        self.fc_in = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=cfg.bias)
        self.fc_gate = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=cfg.bias) if self.gated else None
        self.fc_out = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=cfg.bias)

    @property
    def gated(self) -> bool:
        return self.kind.startswith("gated_")

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        return activation(x, self.kind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_impl(self.kernels_choice, x.device) == "triton" and self.kind != "relu":
            if self.kind == "gated_gelu":  # one kernel for gelu_tanh(gate) * up
                return self.fc_out(kernels.gated_gelu(self.fc_gate(x), self.fc_in(x), impl="triton"))
            if not self.gated:
                approximate = "tanh" if self.kind == "gelu_tanh" else "none"
                return self.fc_out(kernels.bias_gelu(self.fc_in(x), None, approximate, impl="triton"))
        if self.fc_gate is not None:
            return self.fc_out(self.activation(self.fc_gate(x)) * self.fc_in(x))
        return self.fc_out(self.activation(self.fc_in(x)))


# ------------------------------------------------------------------------------------------ positions

class SinusoidalPositions(nn.Module):
    """Vaswani et al.: PE[p, 2i] = sin(p / 10000^(2i/D)), PE[p, 2i+1] = cos(...). A buffer, no parameters;
    `reset_buffers` recomputes it after `to_empty()`."""

    def __init__(self, max_len: int, dim: int, offset: int = 0):
        super().__init__()
        self.max_len, self.dim, self.offset = max_len, dim, offset
        self.register_buffer("table", torch.empty(max_len + offset, dim), persistent=False)
        if self.table.device.type != "meta":
            self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        position = torch.arange(self.max_len + self.offset, dtype=torch.float32)[:, None]  # (L, 1)
        inv_freq = torch.exp(torch.arange(0, self.dim, 2, dtype=torch.float32) * (-math.log(10000.0) / self.dim))
        table = torch.zeros(self.max_len + self.offset, self.dim)
        table[:, 0::2] = torch.sin(position * inv_freq)
        table[:, 1::2] = torch.cos(position * inv_freq[: self.dim // 2])
        self.table.copy_(table.to(self.table.device))

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return self.table[position_ids]


def relative_position_bucket(relative: torch.Tensor, bidirectional: bool, n_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """T5 buckets of key - query distances: half exact for small distances, half log-spaced up to
    max_distance; bidirectional splits the buckets between keys before and after the query."""
    bucket = torch.zeros_like(relative)
    if bidirectional:
        n_buckets //= 2
        bucket += (relative > 0).long() * n_buckets
        distance = relative.abs()
    else:
        distance = (-relative).clamp(min=0)  # a causal decoder only looks back
    exact = n_buckets // 2
    log_ratio = torch.log(distance.float().clamp(min=1) / exact) / math.log(max_distance / exact)
    far = (exact + (log_ratio * (n_buckets - exact)).long()).clamp(max=n_buckets - 1)
    return bucket + torch.where(distance < exact, distance, far)


class RelativePositionBias(nn.Module):
    """T5: one learned scalar per (bucket, head), computed once per stack and added to every layer's scores."""

    def __init__(self, cfg: ModelConfig, bidirectional: bool):
        super().__init__()
        self.bidirectional = bidirectional
        self.n_buckets, self.max_distance = cfg.relative_buckets, cfg.relative_max_distance
        self.weight = nn.Parameter(torch.empty(cfg.relative_buckets, cfg.n_heads))

    def forward(self, q_len: int, k_len: int) -> torch.Tensor:
        """Queries are the last q_len of the k_len positions (fewer than the keys under a KV cache)."""
        device = self.weight.device
        queries = torch.arange(k_len - q_len, k_len, device=device)
        relative = torch.arange(k_len, device=device)[None, :] - queries[:, None]
        buckets = relative_position_bucket(relative, self.bidirectional, self.n_buckets, self.max_distance)
        return F.embedding(buckets, self.weight).permute(2, 0, 1)[None]  # (1, H, Tq, Tk)


def position_ids(input_ids: torch.Tensor, cfg: ModelConfig, start: int = 0) -> torch.Tensor:
    """(B, T) ids -> (B|1, T) positions, the first at `start` (the positions a KV cache already holds).
    RoBERTa counts non-pad tokens from pad_token_id + 1 (pads get pad_token_id); learned tables of
    BART/RoBERTa start at position_offset (2)."""
    if cfg.positions_from_padding:
        not_pad = (input_ids != cfg.pad_token_id).long()
        return torch.cumsum(not_pad, dim=1) * not_pad + cfg.pad_token_id
    return (torch.arange(start, start + input_ids.shape[1], device=input_ids.device) + cfg.position_offset)[None]


def make_positions(cfg: ModelConfig) -> nn.Module | None:
    if cfg.position == "learned":
        return nn.Embedding(cfg.max_seq_len + cfg.position_offset, cfg.d_model)
    if cfg.position == "sinusoidal":
        return SinusoidalPositions(cfg.max_seq_len, cfg.d_model, cfg.position_offset)
    return None  # relative: a bias inside attention


# ---------------------------------------------------------------------------------------------- block

class Block(nn.Module):
    """One transformer layer: self-attention, optional cross-attention (encdec decoder), MLP.
    pre-LN: x + f(norm(x)); post-LN: norm(x + f(x)). Causality and padding come in through `bias`."""

    def __init__(self, cfg: ModelConfig, cross_attention: bool = False):
        super().__init__()
        self.pre_norm = cfg.norm_position == "pre"
        self.attn_norm, self.attn = make_norm(cfg), Attention(cfg)
        self.cross_attn_norm = make_norm(cfg) if cross_attention else None
        self.cross_attn = Attention(cfg) if cross_attention else None
        self.mlp_norm, self.mlp = make_norm(cfg), MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)
        # 0: one mask stream for the whole residual stream. Sequence parallel on a CPU mesh sets tp_rank + 1:
        # each rank holds a (B, T/tp, D) shard, and DTensor has no CPU RNG to give the shards their own masks
        self.dropout_stream = 0

    def residual_dropout(self, x: torch.Tensor) -> torch.Tensor:
        forked = self.dropout_stream != 0 and self.training and self.dropout.p > 0.0
        with rng_stream(x.device, self.dropout_stream) if forked else contextlib.nullcontext():
            return self.dropout(x)

    def sublayer(self, x: torch.Tensor, norm: Norm, fn) -> torch.Tensor:
        if self.pre_norm:
            return x + self.residual_dropout(fn(norm(x)))
        return norm(x + self.residual_dropout(fn(x)))

    def add_dropout_norm(self, branch: torch.Tensor, residual: torch.Tensor,
                         norm: Norm) -> tuple[torch.Tensor, torch.Tensor]:
        """Megatron's fused tail: new = residual + dropout(branch) -> (norm(new), new), one kernel."""
        return kernels.residual_dropout_norm(branch, residual, None, self.dropout.p, self.training, norm.weight,
                                             norm.bias, norm.eps, norm.kind, impl="triton")

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None, is_causal: bool = False,
                memory: torch.Tensor | None = None, memory_bias: torch.Tensor | None = None,
                cache: LayerCache | None = None) -> torch.Tensor:
        self_cache, cross_cache = (cache.self_attn, cache.cross_attn) if cache is not None else (None, None)
        steps = [(self.attn_norm, lambda h: self.attn(h, bias=bias, is_causal=is_causal, cache=self_cache))]
        if self.cross_attn is not None:
            steps.append((self.cross_attn_norm,
                          lambda h: self.cross_attn(h, memory, bias=memory_bias, cache=cross_cache)))
        steps.append((self.mlp_norm, self.mlp))
        if fused_impl(self.mlp.kernels_choice, x.device) == "triton":
            return self.fused_forward(x, steps)
        for norm, fn in steps:
            x = self.sublayer(x, norm, fn)
        return x

    def fused_forward(self, x: torch.Tensor, steps: list) -> torch.Tensor:
        """Same math with each residual add + dropout + norm in one kernel.
        post-LN: x = norm(x + drop(f(x))) per step. pre-LN: the add of step i is fused with the norm that
        opens step i+1; the block's last add stays plain (the next block's norm opens it)."""
        if not self.pre_norm:
            for norm, fn in steps:
                x, _ = self.add_dropout_norm(fn(x), x, norm)
            return x
        normed = steps[0][0](x)
        for (_, fn), (next_norm, _) in zip(steps, steps[1:]):
            normed, x = self.add_dropout_norm(fn(normed), x, next_norm)
        return x + self.residual_dropout(steps[-1][1](normed))


class Pooler(nn.Module):
    """tanh(dense(h[:, 0])): the [CLS] summary BERT's NSP and classification read; an encoder-decoder's
    classification head applies it to its final decoder state (Hugging Face's Bart/T5ClassificationHead)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x[:, 0]))  # (B, T, D) -> (B, D)


def make_layers(cfg: ModelConfig, n_layers: int, cross_attention: bool = False) -> nn.ModuleDict:
    # keyed by str(index): a pipeline stage deletes the others and parameter names never change
    return nn.ModuleDict({str(i): Block(cfg, cross_attention) for i in range(n_layers)})


def last_token_index(attention_mask: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    """(B,) index of the last non-pad token (the last token without a mask)."""
    if attention_mask is None:
        return torch.full((batch,), length - 1, dtype=torch.long, device=device)
    positions = torch.arange(length, device=attention_mask.device)[None]
    return (positions * (attention_mask != 0)).argmax(dim=1)
