"""XLNet (Yang et al. 2019): a permutation language model on Transformer-XL's relative attention.

Each layer carries two streams through the same weights:
  content stream h (B, T, D): token embeddings; position i attends to the tokens the permutation lets it see
                              and to itself (a standard bidirectional or causal encoder when no perm_mask);
  query stream   g (B, M, D): one learned vector `mask_emb` per prediction target (M = num_predict); a
                              target attends to the content of what precedes it in the factorization
                              order, never to its own content, so it can predict it.
Attention scores are Transformer-XL's three terms plus XLNet's segment term, per head:
  (q + r_w_bias) . k_j        content
  (q + r_r_bias) . r_(i-j)    position, r = r_proj(sinusoid of the relative distance)
  (q + r_s_bias) . seg_embed[same segment(i, j) ? 0 : 1]
The first term is SDPA's q.k; the other two enter as an additive bias. `mems` (per layer (B, M_mem, D), the
layer inputs of the previous segment) are keys/values every query may see.

Inputs follow Hugging Face's XLNetLMHeadModel: perm_mask (B, T, T) with 1 where query i may NOT see key j;
target_mapping (B, M, T) with target_mapping[b, m, j] = 1 when the m-th prediction is token j. With a
target_mapping the logits are the query stream's (B, M, V), otherwise the content stream's (B, T, V).
Sequence classification reads the last token (XLNet pads on the left) through a tanh summary."""

from __future__ import annotations

import torch
from torch import nn

from scaletrain.configs.schema import ModelConfig
from scaletrain.models.blocks import Block, attention_core
from scaletrain.models.init import init_model_weights


def relative_shift(scores: torch.Tensor, k_len: int) -> torch.Tensor:
    """(B, H, Tq, R) scores against relative positions R = [k_len, k_len-1, ...] -> (B, H, Tq, k_len) against
    keys: out[i, j] = scores[i, Tq - i + j], i.e. the distance (M_mem + i) - j. One reshape instead of a gather:
    dropping the first Tq entries of the flattened (R, Tq) view shifts row i left by Tq - i."""
    B, H, Tq, R = scores.shape
    shifted = scores.reshape(B, H, R, Tq)[:, :, 1:].reshape(B, H, Tq, R - 1)
    return shifted[..., :k_len]


def relative_sinusoid(q_len: int, k_len: int, cfg: ModelConfig, batch: int, device, dtype) -> torch.Tensor:
    """Transformer-XL's encoding of the distances k_len, k_len-1, ..., down to -q_len+1 (bi) or 0 (uni):
    (1, R, D) = [sin(d / 10000^(2i/D)) | cos(...)] concatenated, not interleaved. bi_data: the second half
    of the batch reads the distances negated (the sequence backwards): (B, R, D)."""
    end = -q_len if cfg.attn_type == "bi" else -1
    distance = torch.arange(k_len, end, -1, device=device, dtype=torch.float32)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, cfg.d_model, 2, device=device, dtype=torch.float32) / cfg.d_model))

    def encode(d: torch.Tensor) -> torch.Tensor:
        if cfg.clamp_len > 0:
            d = d.clamp(-cfg.clamp_len, cfg.clamp_len)
        angle = d[:, None] * inv_freq[None]  # (R, D/2)
        return torch.cat([angle.sin(), angle.cos()], dim=-1)[None].to(dtype)  # (1, R, D)

    if not cfg.bi_data:
        return encode(distance)
    if batch % 2:
        raise ValueError(f"model.bi_data needs an even batch, got {batch}")
    half = batch // 2
    return torch.cat([encode(distance).expand(half, -1, -1), encode(-distance).expand(half, -1, -1)])


def attention_masks(cfg: ModelConfig, q_len: int, mem_len: int, attention_mask, perm_mask, device):
    """-> (content mask, query mask), bool (B|1, Tq, M_mem + Tq) with True where a query may not look, or
    (None, None) when everything is visible. Memory is always visible; the content stream always sees its
    own token (it holds that token's content anyway), the query stream only where perm_mask allows."""
    k_len = mem_len + q_len
    hidden = None
    if cfg.attn_type == "uni":
        hidden = torch.ones(q_len, k_len, dtype=torch.bool, device=device).triu(mem_len + 1)[None]
    data = None
    if attention_mask is not None:  # (B, T): 1 token, 0 padding
        data = (attention_mask == 0)[:, None, :].to(device)
    if perm_mask is not None:  # (B, T, T): 1 where i does not attend to j
        permuted = perm_mask.to(device) > 0
        data = permuted if data is None else data | permuted
    if data is not None:
        if mem_len:
            data = torch.cat([data.new_zeros(*data.shape[:2], mem_len), data], dim=-1)
        hidden = data if hidden is None else hidden | data
    if hidden is None:
        return None, None
    own = torch.zeros(q_len, k_len, dtype=torch.bool, device=device)
    own[:, mem_len:] = torch.eye(q_len, dtype=torch.bool, device=device)
    return hidden & ~own, hidden


class RelativeAttention(nn.Module):
    """Two-stream relative multi-head attention; the projections keep the shared block's names. Shapes use -1
    heads so that a tensor-parallel plan (not written yet: r_proj and the per-head biases need sharding by
    heads) can give a rank its local heads."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        inner, d = cfg.n_heads * cfg.head_dim, cfg.d_model
        self.q_proj = nn.Linear(d, inner, bias=False)
        self.k_proj = nn.Linear(d, inner, bias=False)
        self.v_proj = nn.Linear(d, inner, bias=False)
        self.r_proj = nn.Linear(d, inner, bias=False)  # relative-position keys
        self.out_proj = nn.Linear(inner, d, bias=False)
        self.r_w_bias = nn.Parameter(torch.empty(cfg.n_heads, cfg.head_dim))  # content bias (u)
        self.r_r_bias = nn.Parameter(torch.empty(cfg.n_heads, cfg.head_dim))  # position bias (v)
        self.r_s_bias = nn.Parameter(torch.empty(cfg.n_heads, cfg.head_dim))  # segment bias
        self.seg_embed = nn.Parameter(torch.empty(2, cfg.n_heads, cfg.head_dim))  # same / different segment
        self.dropout = cfg.attn_dropout
        self.scale = cfg.head_dim ** -0.5
        self.dropout_stream = 0  # as blocks.Attention: a tensor-parallel plan would set tp_rank + 1

    def heads(self, x: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
        B, T, _ = x.shape
        return proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)

    def core(self, q, k, v, k_pos, segment_diff, hidden) -> torch.Tensor:
        """q (B, H, Tq, Dh) at positions M_mem..M_mem+Tq-1, k/v (B, H, Tk, Dh), k_pos (B|1, H, R, Dh)."""
        per_head = lambda bias: bias[None, :, None, :]  # (H, Dh) -> (1, H, 1, Dh)
        bias = relative_shift((q + per_head(self.r_r_bias)) @ k_pos.transpose(-1, -2), k.shape[2])
        if segment_diff is not None:  # (B, Tq, Tk) bool: key j is in another segment than query i
            seg = (q + per_head(self.r_s_bias)) @ self.seg_embed.permute(1, 2, 0)  # (B, H, Tq, 2)
            bias = bias + torch.where(segment_diff[:, None], seg[..., 1:], seg[..., :1])
        bias = bias * self.scale
        if hidden is not None:
            # finfo.min, like HF's -1e30: a query that may see nothing attends uniformly (stays finite)
            bias = bias.masked_fill(hidden[:, None], torch.finfo(bias.dtype).min)
        dropout = self.dropout if self.training else 0.0
        return attention_core(q + per_head(self.r_w_bias), k, v, bias, False, dropout, self.scale,
                              self.dropout_stream)  # (B, H, Tq, Dh)

    def merge(self, y: torch.Tensor) -> torch.Tensor:
        B, _, T, _ = y.shape
        return self.out_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, D)

    def forward(self, h, g, positions, hidden_h, hidden_g, segment_diff, mem=None, target_mapping=None):
        """-> (content output (B, T, D), query output (B, M, D) or None), before residual and norm."""
        context = h if mem is None else torch.cat([mem, h], dim=1)  # (B, M_mem + T, D)
        k, v = self.heads(context, self.k_proj), self.heads(context, self.v_proj)
        k_pos = self.heads(positions, self.r_proj)  # (B|1, H, R, Dh)
        out_h = self.merge(self.core(self.heads(h, self.q_proj), k, v, k_pos, segment_diff, hidden_h))
        if g is None:
            return out_h, None
        mapping = target_mapping.to(g.dtype)[:, None]  # (B, 1, M, T)
        # Each target's query moves to its token's position (so the relative distances and the mask row are
        # that token's), attends there, and its output moves back: (B, H, M, Dh) <-> (B, H, T, Dh).
        q_g = mapping.transpose(-1, -2) @ self.heads(g, self.q_proj)
        out_g = self.merge(mapping @ self.core(q_g, k, v, k_pos, segment_diff, hidden_g))
        return out_h, out_g


class XLNetBlock(Block):
    """Post-LN like BERT: each stream x -> norm(x + dropout(attn(x))) -> norm(x + dropout(ffn(x))), with
    XLNet's extra dropout between the FFN's activation and fc_out. Both streams share every weight."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.attn = RelativeAttention(cfg)

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp.fc_out(self.dropout(self.mlp.activation(self.mlp.fc_in(x))))

    def forward(self, h, g, positions, hidden_h, hidden_g, segment_diff, mem=None, target_mapping=None):
        out_h, out_g = self.attn(h, g, positions, hidden_h, hidden_g, segment_diff, mem, target_mapping)
        h = self.attn_norm(h + self.residual_dropout(out_h))
        h = self.sublayer(h, self.mlp_norm, self.feed_forward)
        if g is not None:
            g = self.attn_norm(g + self.residual_dropout(out_g))
            g = self.sublayer(g, self.mlp_norm, self.feed_forward)
        return h, g


class SequenceSummary(nn.Module):
    """tanh(dense(h[:, -1])): XLNet's summary of a sequence, its last token (<cls>)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x[:, -1]))  # (B, D)


class XLNet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.mask_emb = nn.Parameter(torch.empty(1, 1, cfg.d_model))  # the query stream's input
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleDict({str(i): XLNetBlock(cfg) for i in range(cfg.n_layers)})
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=True)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight
        self.pooler = SequenceSummary(cfg) if cfg.num_labels > 0 else None
        self.classifier = nn.Linear(cfg.d_model, cfg.num_labels) if cfg.num_labels > 0 else None

    def cache(self, layer_input: torch.Tensor, mem: torch.Tensor | None) -> torch.Tensor:
        """Next segment's memory for one layer: its input (the first reuse_len tokens) after the old memory,
        the last mem_len kept (0 keeps all), detached: recurrence carries no gradient across segments."""
        current = layer_input[:, :self.cfg.reuse_len] if self.cfg.reuse_len else layer_input
        new = current if mem is None else torch.cat([mem, current], dim=1)
        return (new[:, -self.cfg.mem_len:] if self.cfg.mem_len else new).detach()

    def embed(self, input_ids, target_mapping=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> content stream h (B, T, D), query stream g (B, M, D) or None without target_mapping."""
        h = self.dropout(self.tok_embeddings(input_ids))  # (B, T, D)
        if target_mapping is None:
            return h, None
        return h, self.dropout(self.mask_emb.expand(input_ids.shape[0], target_mapping.shape[1], -1))

    def layer_inputs(self, h, token_type_ids=None, attention_mask=None, perm_mask=None, mem_len: int = 0) -> dict:
        """What every layer reads besides the streams, built from the batch alone (so a pipeline stage builds
        its own): the relative positions (B|1, R, D), the two masks, and which keys are in another segment."""
        B, T, _ = h.shape
        hidden_h, hidden_g = attention_masks(self.cfg, T, mem_len, attention_mask, perm_mask, h.device)
        segment_diff = None
        if token_type_ids is not None:  # memory counts as segment 0
            key_types = torch.cat([token_type_ids.new_zeros(B, mem_len), token_type_ids], dim=1)
            segment_diff = token_type_ids[:, :, None] != key_types[:, None, :]  # (B, T, M_mem + T)
        positions = self.dropout(relative_sinusoid(T, mem_len + T, self.cfg, B, h.device, h.dtype))
        return dict(positions=positions, hidden_h=hidden_h, hidden_g=hidden_g, segment_diff=segment_diff)

    def run_layers(self, h, g, inputs: dict, mems=None, target_mapping=None):
        """The layers this module holds (all of them, or a pipeline stage's) -> (h, g, new memory per layer)."""
        new_mems = []
        for key, layer in self.layers.items():
            mem = mems[int(key)] if mems is not None else None
            new_mems.append(self.cache(h, mem))
            h, g = layer(h, g, mem=mem, target_mapping=target_mapping, **inputs)
        return h, g, new_mems

    def streams(self, input_ids, token_type_ids=None, attention_mask=None, perm_mask=None, target_mapping=None,
                mems=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """-> (last layer's query stream (B, M, D), or content stream (B, T, D) without target_mapping, and
        the new memory: per layer (B, M_mem', D))."""
        h, g = self.embed(input_ids, target_mapping)
        mem_len = mems[0].shape[1] if mems is not None else 0
        inputs = self.layer_inputs(h, token_type_ids, attention_mask, perm_mask, mem_len)
        h, g, new_mems = self.run_layers(h, g, inputs, mems, target_mapping)
        return self.dropout(g if g is not None else h), new_mems

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, perm_mask=None, target_mapping=None,
                mems=None, return_mems: bool = False):
        """Logits (B, M, V) of the targets with target_mapping, else (B, T, V); with return_mems also the
        new memory (a list of per-layer (B, M_mem', D)) to pass as `mems` with the next segment."""
        x, new_mems = self.streams(input_ids, token_type_ids, attention_mask, perm_mask, target_mapping, mems)
        logits = self.lm_head(x)
        return (logits, new_mems) if return_mems else logits

    def classify(self, input_ids, token_type_ids=None, attention_mask=None, perm_mask=None, target_mapping=None,
                 mems=None) -> torch.Tensor:
        x, _ = self.streams(input_ids, token_type_ids, attention_mask, perm_mask, target_mapping, mems)
        return self.classifier(self.dropout(self.pooler(x)))  # (B, num_labels)

    def init_weights(self, seed: int = 0) -> None:
        init_model_weights(self, self.cfg, seed)
