"""XLNet in the planner (models/xlnet.py): what its two streams keep for backward (its parameter tensors are
in plan/memory.py's inventory).

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

from scaletrain.configs.schema import ModelConfig
from scaletrain.data.objectives import PLM


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
