"""XLNet in the planner (models/xlnet.py): its parameter tensors (part of plan/memory.py's parameter_inventory)
and what its two streams keep for backward (plan/memory.py's stage_activation_bytes for this family).

Activations follow the dry run's convention (parallel/dryrun_activations.py): a piece counts what its forward
adds to its inputs, its outputs included. Notation: s rows of the content stream (the sequence), M of the query
stream (num_predict), b the micro-batch, d the width, heads h and i = h x head_dim split over tp, f = ffn / tp,
R relative positions (2s bidirectional, s + 1 causal). Each block runs one attention core per stream, both over
s query rows (a target's query moves to its token's position), and keeps on the CPU's math path:
  per core:    q + r_r_bias, q + r_s_bias (2 s b i), the position keys broadcast over the batch (b R i), the
               segment terms (2 b i x 2), q x scale, k, v (3 s b i, fp32 when the math path upcasts), softmax
               b h s^2 (fp32 too), and with attention dropout its mask and output (2 b h s^2);
  per stream:  its input (rows b d), the out_proj input (rows b i), two residual-dropout masks, two LayerNorm
               inputs and their mean / rstd, the fc_in input, then the GELU input, its dropout mask and the
               fc_out input (rows b f each); the query stream also the two (b h s M) broadcasts of
               target_mapping that move it to its tokens and back.
Once per stage: the relative positions (R d) and three bool (b s^2) masks (content, query, segment). The model's
last block is kept without its content stream: nothing reads that output, so autograd frees its attention
and FFN when the block returns; only the keys and values the query stream attends to stay."""

from __future__ import annotations

from typing import List, Optional

from scaletrain.configs.schema import ModelConfig
from scaletrain.data.objectives import PLM
from scaletrain.plan.memory import Layout, ParamTensor, linear_params, norm_params, stage_split
from scaletrain.plan.memory_buffers import block_gradient_bytes, embedding_gradient_bytes


def plm_num_predict(seq: int, k: int = 6, max_span: int = 5) -> int:
    """Rows of target_mapping at trainer.seq_len (data/objectives.py: PLM; data.plm_k, data.plm_max_span)."""
    objective = PLM(sep_id=0, cls_id=0, special=None, k=k, max_span=max_span)
    return objective.num_predict(objective.window_length(seq))


def relative_positions(cfg: ModelConfig, seq: int) -> int:
    return 2 * seq if cfg.attn_type == "bi" else seq + 1


def _stream_tail(rows: float, b: int, d: int, ffn: float, v: int, mask: float, dropout: bool) -> float:
    """After attention, one stream of `rows` positions: residual dropout + LayerNorm twice, the FFN."""
    # the norms' inputs and their mean / rstd, fc_in's input, the GELU input and fc_out's input
    per_row = 2 * d * v + 2 * 2 * v + d * v + 2 * ffn * v
    if dropout:
        per_row += 2 * d * mask + ffn * mask  # the two residual masks, the FFN's dropout mask
    return rows * b * per_row


def xlnet_block_bytes(cfg: ModelConfig, seq: int, b: int, num_predict: int, tp: int = 1, *, value_bytes: int = 2,
                      core_bytes: int = 2, mask_bytes: float = 1, recompute: str = "none",
                      content_used: bool = True, scores_stored: bool = True) -> float:
    """One block, one micro-batch (see the module docstring). content_used=False: the model's last block.
    scores_stored=False: a fused kernel (CUDA's memory-efficient SDPA, which takes the additive bias) keeps
    that bias and a log-sum-exp per row instead of the softmax; not measured here, the CPU always runs the
    math path (XLNet's float bias)."""
    s, M, d, v = seq, num_predict, cfg.d_model, value_bytes
    heads, inner, ffn = cfg.n_heads / tp, cfg.n_heads * cfg.head_dim / tp, cfg.ffn_dim / tp
    if recompute == "full":  # a checkpointed block keeps its inputs; counted as its outputs (the next one's inputs)
        return (s * content_used + M) * b * d * v
    R, drop, attn_drop = relative_positions(cfg, s), cfg.dropout > 0, cfg.attn_dropout > 0
    scores = b * heads * s * s * core_bytes * (3 if attn_drop else 1)  # softmax (+ its dropout mask and output)
    if recompute == "selective":  # the matmul_outputs policy recomputes the element-wise ops (approximate)
        scores = b * heads * s * s * core_bytes
    if not scores_stored:
        scores = b * heads * s * (s * v + 4)
    core = 2 * s * b * inner * v + 3 * s * b * inner * core_bytes + scores
    if b > 1:  # the position keys and segment embeddings broadcast over the batch: a copy per core
        core += b * R * inner * v + b * inner * 2 * v
    positions = R * inner * v if b == 1 else 0.0  # one batch: a view of the position keys, shared by the cores
    mapping = 2 * b * heads * s * M * v if b > 1 else M * s * v  # one batch: target_mapping itself, viewed
    query = M * b * d * v + mapping + M * b * inner * v + _stream_tail(M, b, d, ffn, v, mask_bytes, drop)
    if not content_used:  # the keys / values the query stream reads, from the content input it keeps
        return core + positions + query
    content = s * b * d * v + s * b * inner * v + _stream_tail(s, b, d, ffn, v, mask_bytes, drop)
    if b == 1 and core_bytes == v:  # and, not upcast, one core's values are a view of the other's
        content -= s * inner * v
    return 2 * core + positions + content + query


def xlnet_shared_bytes(cfg: ModelConfig, seq: int, b: int, value_bytes: int, content_mask: bool = True) -> float:
    """Once per stage: the relative positions (per sequence with bi_data) and the bool masks (b, s, s): the
    query stream's and the segment one, and the content stream's where some block's content output is read."""
    positions = relative_positions(cfg, seq) * cfg.d_model * value_bytes * (b if cfg.bi_data else 1)
    return positions + (3 if content_mask else 2) * b * seq * seq


def xlnet_end_bytes(cfg: ModelConfig, seq: int, b: int, num_predict: int, value_bytes: int, mask_bytes: float,
                    first: bool, last: bool, tp: int = 1) -> float:
    """The embeddings' outputs on the first stage (the content stream and the query stream's mask_emb copies,
    each after its dropout, with its mask), the head on the last: its dropout (output and mask), the logits
    of the M predictions (vocab-sharded under tp, where the vocab-parallel loss keeps them in fp32) and what
    the loss keeps per row (int64 labels, fp32 losses, a valid mask: 13 bytes; 10 vocab-parallel)."""
    d, M = cfg.d_model, num_predict
    per_row = d * (value_bytes + (mask_bytes if cfg.dropout > 0 else 0))  # nn.Dropout copies even at p=0
    kept = 0.0
    if first:
        kept += (seq + M) * b * per_row
        kept += seq * b * 8 if tp > 1 else 0  # the vocab-parallel lookup's int64 local ids
    if last:
        logits = cfg.padded_vocab_size(tp) / tp * (4 if tp > 1 else value_bytes)
        kept += M * b * (per_row + logits + (10 if tp > 1 else 13)) + 4
    return kept


def xlnet_tensors(cfg: ModelConfig, vocab: int) -> List[ParamTensor]:
    """models/xlnet.py after the token table: the query stream's mask_emb, per block the relative attention
    (bias-free projections, r_proj for the position keys; the per-head biases and segment embeddings sharded
    by heads as parallel/tensor.py does) and the FFN, then the LM head's bias (its weight is the tied table)."""
    d, heads, head_dim, inner = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.n_heads * cfg.head_dim
    out = [ParamTensor("mask_emb", (1, 1, d), None, "embed")]
    for i in range(cfg.n_layers):
        prefix = f"layers.{i}"
        out += norm_params(f"{prefix}.attn_norm", d, cfg, "layer", i)
        for name in ("r_w_bias", "r_r_bias", "r_s_bias"):
            out.append(ParamTensor(f"{prefix}.attn.{name}", (heads, head_dim), 0, "layer", i))
        out.append(ParamTensor(f"{prefix}.attn.seg_embed", (2, heads, head_dim), 1, "layer", i))
        for proj in ("q_proj", "k_proj", "v_proj", "r_proj"):
            out += linear_params(f"{prefix}.attn.{proj}", inner, d, "col", cfg, "layer", i, bias=False)
        out += linear_params(f"{prefix}.attn.out_proj", d, inner, "row", cfg, "layer", i, bias=False)
        out += norm_params(f"{prefix}.mlp_norm", d, cfg, "layer", i)
        out += linear_params(f"{prefix}.mlp.fc_in", cfg.ffn_dim, d, "col", cfg, "layer", i)
        out += linear_params(f"{prefix}.mlp.fc_out", d, cfg.ffn_dim, "row", cfg, "layer", i)
    out.append(ParamTensor("lm_head.bias", (vocab,), 0, "head"))
    if not cfg.tie_embeddings:
        out.append(ParamTensor("lm_head.weight", (vocab, d), 0, "head"))
    if cfg.num_labels > 0:  # the summary (tanh dense on the last token) and the classifier
        out += linear_params("pooler.dense", d, d, "none", cfg, "head", bias=True)
        out += linear_params("classifier", cfg.num_labels, d, "none", cfg, "head", bias=True)
    return out


def xlnet_stage_bytes(cfg: ModelConfig, layout: Layout, seq: int, stage: int, kwargs: dict,
                       num_predict: Optional[int]) -> tuple:
    """stage_activation_bytes for XLNet (plan/memory.py): full blocks, the model's last block without
    its content stream, the positions and masks once per stage module, the embeddings and the head."""
    M = plm_num_predict(seq) if num_predict is None else num_predict
    b, t, v = layout.micro_batch, layout.tp, kwargs["value_bytes"]
    plans, owned = stage_split(cfg, layout)
    stages = [range(plans[i].start, plans[i].end) for i in owned[stage]] if layout.pp > 1 else [range(cfg.n_layers)]
    first = layout.pp == 1 or 0 in owned[stage]
    last = layout.pp == 1 or len(plans) - 1 in owned[stage]
    # the CPU's math attention keeps q x scale, k, v and the scores in fp32 under 16-bit autocast
    core = 4 if kwargs["math_fp32"] else v
    sizes = dict(value_bytes=v, core_bytes=core, mask_bytes=kwargs["mask_bytes"], recompute=layout.recompute,
                 scores_stored=kwargs["scores_stored"] or kwargs["math_fp32"])
    full = xlnet_block_bytes(cfg, seq, b, M, t, **sizes)
    kept = 0.0
    for layers in stages:
        if not layers:
            continue
        holds_last = cfg.n_layers - 1 in layers
        kept += (len(layers) - holds_last) * full + xlnet_shared_bytes(cfg, seq, b, v, len(layers) > holds_last)
        if holds_last:
            kept += xlnet_block_bytes(cfg, seq, b, M, t, **sizes, content_used=False)
    kept += xlnet_end_bytes(cfg, seq, b, M, v, kwargs["mask_bytes"], first, last, t)
    transient = block_gradient_bytes(cfg, seq * b, t, 1, v)  # as stage_activation_bytes: one block's gradients
    if first:
        transient = max(transient, embedding_gradient_bytes(cfg, t, v))
    if layout.recompute != "none":  # and the forward it reruns
        transient += xlnet_block_bytes(cfg, seq, b, M, t, **{**sizes, "recompute": "none"}) - full
    if last:
        transient = max(transient, M * b * cfg.padded_vocab_size(t) / t * (v + 4))
    return kept, transient
