"""Per-device memory of a training layout, from the model config alone (no torch, no model build).

Three parts, each from a paper:
  * model states: parameters, gradients and Adam state split by ZeRO stage as in Rajbhandari et al. 2020
    ("ZeRO", sec. 3.1): 2Ψ + 2Ψ + KΨ bytes with K = 12 under mixed precision;
  * activations: per layer from Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
    Transformer Models", sec. 4): sbh(34 + 5as/h) bytes without parallelism, sbh(10 + 24/t + 5as/(ht))
    with tensor parallelism, /t on all of it with sequence parallelism; selective recompute drops the
    5as/h term and full recompute keeps only the layer input, 2sbh;
  * the pipeline: under 1F1B the first stage holds pp micro-batches in flight, and the interleaved
    schedule multiplies that by (1 + (pp-1)/(pp*v)) (Korthikanti et al. 2022, sec. 4.2.3); the other
    schedules and later ranks in in_flight_on_rank.

The parameter inventory lists every tensor with its shape and the dimension tensor parallelism shards, so the
per-rank counts are exact (they are checked against the dry run's real DTensor shards)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import List, Optional

from scaletrain.configs.schema import ModelConfig
from scaletrain.plan.memory_buffers import (accumulation_bytes, block_gradient_bytes, embedding_gradient_bytes,
                                             fsdp_gather_bytes, head_gradient_bytes)

GIB = 1024**3


@dataclass(frozen=True)
class Layout:
    """One candidate way to run: the degrees, ZeRO stage, micro batch and recompute mode."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    pp_virtual: int = 1
    zero: int = 0
    micro_batch: int = 1
    recompute: str = "none"  # none | selective | full
    sequence_parallel: bool = False
    pp_schedule: str = "1f1b"  # which ranks hold which stages (loop, or V for zbv / dualpipev)
    dp_replicate: int = 1  # HSDP: dp = dp_replicate x dp_shard; FSDP shards over dp_shard only
    pp_split: Optional[tuple] = None  # parallel.pp_split: explicit stage boundaries

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def schedule(self) -> str:
        """pp_schedule, or interleaved 1F1B when virtual stages ask for more than one stage per rank."""
        single = self.pp_schedule in ("gpipe", "1f1b")
        return "interleaved_1f1b" if single and self.pp_virtual > 1 else self.pp_schedule

    @property
    def shard_degree(self) -> int:
        """Ranks one tensor's ZeRO shards spread over: every dp rank for ZeRO-1 (its optimizer slices),
        dp_shard for ZeRO 2/3 (FSDP; HSDP replicates over dp_replicate), none for ZeRO-0."""
        if self.zero == 1:
            return self.dp
        return self.dp // self.dp_replicate if self.zero >= 2 else 1


@dataclass(frozen=True)
class ParamTensor:
    name: str
    shape: tuple
    tp_dim: Optional[int]  # dimension tensor parallelism shards; None: replicated on every TP rank
    part: str  # "embed" (first stage) | "layer" | "head" (last stage)
    layer: int = -1

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


# ---------------------------------------------------------------------------------------------------------
# Parameter inventory
# ---------------------------------------------------------------------------------------------------------


def norm_params(prefix: str, width: int, cfg: ModelConfig, part: str, layer: int = -1) -> List[ParamTensor]:
    out = [ParamTensor(f"{prefix}.weight", (width,), None, part, layer)]
    if cfg.norm == "layernorm":
        out.append(ParamTensor(f"{prefix}.bias", (width,), None, part, layer))
    return out


def linear_params(prefix: str, fan_out: int, fan_in: int, style: str, cfg: ModelConfig, part: str,
                  layer: int = -1, bias: Optional[bool] = None) -> List[ParamTensor]:
    """style 'col' shards the output features (and bias), 'row' the input features (bias replicated).
    bias: None follows model.bias."""
    weight_dim = {"col": 0, "row": 1, "none": None}[style]
    out = [ParamTensor(f"{prefix}.weight", (fan_out, fan_in), weight_dim, part, layer)]
    if cfg.bias if bias is None else bias:
        out.append(ParamTensor(f"{prefix}.bias", (fan_out,), 0 if style == "col" else None, part, layer))
    return out


def _attention(prefix: str, cfg: ModelConfig, layer: int) -> List[ParamTensor]:
    inner = cfg.n_heads * cfg.head_dim
    out: List[ParamTensor] = []
    for proj in ("q_proj", "k_proj", "v_proj"):
        out += linear_params(f"{prefix}.{proj}", inner, cfg.d_model, "col", cfg, "layer", layer)
    return out + linear_params(f"{prefix}.out_proj", cfg.d_model, inner, "row", cfg, "layer", layer)


def _block(prefix: str, cfg: ModelConfig, layer: int, cross: bool) -> List[ParamTensor]:
    out = norm_params(f"{prefix}.attn_norm", cfg.d_model, cfg, "layer", layer)
    out += _attention(f"{prefix}.attn", cfg, layer)
    if cross:
        out += norm_params(f"{prefix}.cross_attn_norm", cfg.d_model, cfg, "layer", layer)
        out += _attention(f"{prefix}.cross_attn", cfg, layer)
    out += norm_params(f"{prefix}.mlp_norm", cfg.d_model, cfg, "layer", layer)
    out += linear_params(f"{prefix}.mlp.fc_in", cfg.ffn_dim, cfg.d_model, "col", cfg, "layer", layer)
    if cfg.activation.startswith("gated"):
        out += linear_params(f"{prefix}.mlp.fc_gate", cfg.ffn_dim, cfg.d_model, "col", cfg, "layer", layer)
    return out + linear_params(f"{prefix}.mlp.fc_out", cfg.d_model, cfg.ffn_dim, "row", cfg, "layer", layer)


def _stack_embeddings(prefix: str, cfg: ModelConfig, part: str, layer: int) -> List[ParamTensor]:
    d, out = cfg.d_model, []
    if cfg.position == "learned":
        out.append(ParamTensor(f"{prefix}pos_embeddings.weight", (cfg.max_seq_len + cfg.position_offset, d), 0,
                               part, layer))
    if cfg.position == "relative":
        out.append(ParamTensor(f"{prefix}relative_bias.weight", (cfg.relative_buckets, cfg.n_heads), 1, part, layer))
    if cfg.type_vocab_size:
        out.append(ParamTensor(f"{prefix}type_embeddings.weight", (cfg.type_vocab_size, d), 0, part, layer))
    if cfg.embedding_norm:
        out += norm_params(f"{prefix}embedding_norm", d, cfg, part, layer)
    return out


def parameter_inventory(cfg: ModelConfig, tp: int = 1) -> List[ParamTensor]:
    """Every parameter tensor of the model, in layer order. Layer ids run over the encoder then the decoder
    for encoder-decoder models, which is how the pipeline split counts them. The vocabulary is padded to a
    multiple of pad_vocab_multiple x tp, as the trainer does."""
    vocab, d = cfg.padded_vocab_size(tp), cfg.d_model
    out = [ParamTensor("tok_embeddings.weight", (vocab, d), 0, "embed")]
    if cfg.family == "xlnet":
        from scaletrain.plan.memory_xlnet import xlnet_tensors  # it builds on this module's pieces

        return out + xlnet_tensors(cfg, vocab)
    if cfg.family != "encdec":
        out += _stack_embeddings("", cfg, "embed", -1)
        for i in range(cfg.n_layers):
            out += _block(f"layers.{i}", cfg, i, cross=False)
        if cfg.final_norm:
            out += norm_params("final_norm", d, cfg, "head")
        return out + _heads(cfg, vocab)
    # Encoder-decoder: each stack has its own positions / embedding norm / relative bias, all on the first
    # pipeline stage, which embeds both streams.
    out += _stack_embeddings("encoder.", cfg, "embed", -1)
    for i in range(cfg.n_layers):
        out += _block(f"encoder.layers.{i}", cfg, i, cross=False)
    if cfg.final_norm:
        out += norm_params("encoder.final_norm", d, cfg, "layer", cfg.n_layers - 1)
    out += _stack_embeddings("decoder.", cfg, "embed", -1)  # the first stage embeds both streams
    for j in range(cfg.decoder_layers):
        out += _block(f"decoder.layers.{j}", cfg, cfg.n_layers + j, cross=True)
    if cfg.final_norm:
        out += norm_params("decoder.final_norm", d, cfg, "head")
    return out + _heads(cfg, vocab)


def _heads(cfg: ModelConfig, vocab: int) -> List[ParamTensor]:
    d = cfg.d_model
    out: List[ParamTensor] = []
    if cfg.family == "bert":
        out += linear_params("mlm_head.dense", d, d, "none", cfg, "head") + norm_params("mlm_head.norm", d, cfg, "head")
        out.append(ParamTensor("mlm_head.decoder.bias", (vocab,), 0, "head"))
        if cfg.pooler:
            out += linear_params("pooler.dense", d, d, "none", cfg, "head")
        if cfg.nsp_head:
            out += linear_params("nsp_head", 2, d, "none", cfg, "head")
    if not cfg.tie_embeddings:
        out.append(ParamTensor("lm_head.weight", (vocab, d), 0, "head"))
    if cfg.num_labels > 0:
        out += linear_params("classifier", cfg.num_labels, d, "none", cfg, "head")
    return out


def total_layers(cfg: ModelConfig) -> int:
    return cfg.n_layers + (cfg.decoder_layers if cfg.family == "encdec" else 0)


def count_parameters(cfg: ModelConfig) -> int:
    """Total parameters (tied embeddings counted once), unpadded vocabulary."""
    padded = cfg.padded_vocab_size(1)
    unpadded = cfg.vocab_size
    total = 0
    for tensor in parameter_inventory(cfg):
        shape = list(tensor.shape)
        if tensor.tp_dim == 0 and shape[0] == padded and tensor.name.split(".")[0] in ("tok_embeddings", "lm_head",
                                                                                     "mlm_head"):
            shape[0] = unpadded
        total += math.prod(shape)
    return total


def non_embedding_parameters(cfg: ModelConfig) -> int:
    """Kaplan et al. 2020's N: everything except token and position embeddings."""
    embedding = sum(t.numel for t in parameter_inventory(cfg) if t.name.endswith("pos_embeddings.weight"))
    tied_vocab = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    return count_parameters(cfg) - embedding - tied_vocab


_SPLITS: dict = {}


def stage_split(cfg: ModelConfig, layout: Layout) -> tuple:
    """(the StagePlans of every stage, the stage indices each pp rank holds): the runtime's own split
    (parallel/pipeline_split.py, balanced by parameter count on the tp-padded vocab) and placement."""
    from scaletrain.configs.schema import ParallelConfig
    from scaletrain.parallel.pipeline_split import local_stage_indices, stage_plans

    key = (repr(cfg), layout.tp, layout.pp, layout.pp_virtual, layout.schedule, layout.pp_split)
    if key not in _SPLITS:
        parallel = ParallelConfig(pp=layout.pp, pp_virtual=layout.pp_virtual, pp_schedule=layout.schedule,
                                  pp_split=list(layout.pp_split) if layout.pp_split else None)
        padded = dataclasses.replace(cfg, vocab_size=cfg.padded_vocab_size(layout.tp), pad_vocab_multiple=1)
        plans = stage_plans(padded, parallel) if layout.pp > 1 else []
        _SPLITS[key] = (plans, [local_stage_indices(r, parallel) for r in range(layout.pp)] if plans else [[]])
    return _SPLITS[key]


def rank_layers(cfg: ModelConfig, layout: Layout, stage: int) -> tuple:
    """(encoder-or-only-stack layers, decoder layers) pp rank `stage` holds, over all its virtual stages."""
    if layout.pp == 1:
        return (cfg.n_layers, cfg.decoder_layers if cfg.family == "encdec" else 0)
    plans, owned = stage_split(cfg, layout)
    n_encoder = cfg.n_layers if cfg.family == "encdec" else total_layers(cfg)
    held = [i for s in owned[stage] for i in range(plans[s].start, plans[s].end)]
    return sum(i < n_encoder for i in held), sum(i >= n_encoder for i in held)


def _chunk(size: int, parts: int, index: int) -> int:
    """Length of piece `index` when `size` is cut into `parts` pieces of ceil(size/parts) (torch.chunk,
    DTensor Shard and FSDP2 all cut this way; the last pieces may be short or empty)."""
    piece = -(-size // parts)
    return max(0, min(piece, size - index * piece))


def _tp_local_shape(tensor: ParamTensor, tp: int, tp_rank: int) -> tuple:
    """Shape on one TP rank. A table whose rows do not divide by tp stays replicated (parallel/tensor.py)."""
    shape = list(tensor.shape)
    if tensor.tp_dim is not None and tp > 1 and shape[tensor.tp_dim] % tp == 0:
        shape[tensor.tp_dim] = _chunk(shape[tensor.tp_dim], tp, tp_rank)
    return tuple(shape)


_INVENTORIES: dict = {}


def _cached_inventory(cfg: ModelConfig, tp: int) -> List[ParamTensor]:
    """The planner asks for the same model's inventory for thousands of layouts; key on the config's repr
    (ModelConfig is mutable, hence unhashable)."""
    key = (repr(cfg), tp)
    if key not in _INVENTORIES:
        if len(_INVENTORIES) > 64:
            _INVENTORIES.clear()
        _INVENTORIES[key] = parameter_inventory(cfg, tp)
    return _INVENTORIES[key]


def stage_tensors(cfg: ModelConfig, layout: Layout, stage: int) -> List[ParamTensor]:
    """The tensors pp rank `stage` holds (all of them without pp). The last pipeline stage keeps its own copy
    of a tied output embedding (it cannot share memory with the first stage); a V placement puts both copies
    on rank 0."""
    inventory = _cached_inventory(cfg, layout.tp)
    if layout.pp == 1:
        return list(inventory)
    plans, owned = stage_split(cfg, layout)
    mine = owned[stage]
    first, last = 0 in mine, len(plans) - 1 in mine
    layers = {i for s in mine for i in range(plans[s].start, plans[s].end)}
    held = [t for t in inventory
            if (first if t.part == "embed" else last if t.part == "head" else t.layer in layers)]
    if cfg.tie_embeddings and last:
        held.append(inventory[0])
    return held


def stage_parameters(cfg: ModelConfig, layout: Layout, stage: int, tp_rank: int = 0) -> int:
    """Parameters held by one (tp rank, pp stage) before ZeRO sharding."""
    return sum(math.prod(_tp_local_shape(t, layout.tp, tp_rank)) for t in stage_tensors(cfg, layout, stage))


def rank_state_elements(cfg: ModelConfig, layout: Layout, stage: int = 0, tp_rank: int = 0,
                        dp_rank: int = 0) -> tuple:
    """(parameter, gradient, optimizer-state) elements on one rank, cut the way parallel/data.py cuts them:
    ZeRO-1's optimizer state and ZeRO-2/3's (FSDP2) shards take dim 0 of each tensor (its TP-local shape) in
    ceil(rows/dp) pieces; ZeRO-2 keeps the gathered parameters through backward, so its parameter count is
    the unsharded one. Optimizer elements count one state tensor. dp_rank: this rank's index among the
    layout.shard_degree ranks its tensors are cut over."""
    dp = layout.shard_degree
    params = grads = states = 0
    for tensor in stage_tensors(cfg, layout, stage):
        shape = _tp_local_shape(tensor, layout.tp, tp_rank)
        full = math.prod(shape)
        rows = _chunk(shape[0], dp, dp_rank) * (full // shape[0]) if shape[0] else 0
        if dp == 1:
            p, g, o = full, full, full
        elif layout.zero == 1:
            p, g, o = full, full, rows
        elif layout.zero == 2:
            p, g, o = full, rows, rows
        else:
            p, g, o = rows, rows, rows
        params, grads, states = params + p, grads + g, states + o
    return params, grads, states


# ---------------------------------------------------------------------------------------------------------
# Model states (ZeRO) and activations (Korthikanti)
# ---------------------------------------------------------------------------------------------------------


def state_bytes_per_param(precision: str) -> tuple:
    """(parameter, gradient, optimizer) bytes per parameter. Mixed precision: 16-bit weights and grads, fp32
    master weights + Adam m and v = 12 bytes (ZeRO paper's K=12). fp32: 4 + 4 + 8 (m and v)."""
    return (4, 4, 8) if precision == "fp32" else (2, 2, 12)


def model_state_bytes(elements: tuple, precision: str) -> tuple:
    """(parameters, gradients, optimizer state) bytes from rank_state_elements' counts."""
    p_bytes, g_bytes, o_bytes = state_bytes_per_param(precision)
    return elements[0] * p_bytes, elements[1] * g_bytes, elements[2] * o_bytes


def layer_activation_bytes(seq: int, micro_batch: int, hidden: int, heads: int, tp: int = 1,
                           sequence_parallel: bool = False, recompute: str = "none", *, ffn: Optional[int] = None,
                           head_dim: Optional[int] = None, gated: bool = False, dropout: bool = True,
                           scores_stored: bool = True, value_bytes: int = 2, cross_attention: bool = False,
                           selective_policy: str = "korthikanti", mask_bytes: int = 1,
                           sp_keeps_gathered_inputs: bool = False, ffn_kept: Optional[int] = None,
                           norm_bytes: Optional[float] = None, math_fp32: bool = False) -> float:
    """Bytes one transformer layer keeps for backward, for one micro-batch (Korthikanti et al. 2022, sec. 4.1).

    With the defaults (ffn = 4h, dropout, attention scores materialized, 16-bit values) this is exactly
    sbh(34 + 5as/h) at t=1, sbh(10 + 24/t + 5as/(ht)) with TP and sbh(34 + 5as/h)/t with TP+SP. The keyword
    arguments generalize the same bookkeeping to other widths, gated MLPs, no dropout, fused attention that
    keeps only a log-sum-exp (scores_stored=False) and fp32 activations (value_bytes=4).

    Selective recompute: "korthikanti" recomputes the attention core only (drops the s x s terms);
    "matmul_outputs" is parallel/checkpointing.py's policy, which keeps only the block input and the outputs
    of the matmuls and attention kernels and recomputes every element-wise op.
    mask_bytes: 1 for CUDA's fused dropout (bool masks), value_bytes on CPU (a float mask times the input).
    sp_keeps_gathered_inputs: under SP, Megatron keeps only the sequence shard of the attention/MLP inputs and
    redoes the all-gather in backward (Korthikanti's /t); DTensor's ColwiseParallel keeps the gathered input.
    ffn_kept: (B, T, ffn) tensors the MLP keeps (ffn_tensors; default 2, 3 when gated). norm_bytes: bytes per
    element each norm keeps (default value_bytes: its input; see norm_kept_bytes). math_fp32: the CPU's math
    attention (scores_stored) upcasts 16-bit inputs, so it keeps Q, K, V, the scores and their dropout mask
    and output in fp32."""
    s, b, h, a, t = seq, micro_batch, hidden, heads, tp
    ffn = ffn or 4 * h
    inner = a * (head_dim or h // a)
    mask = mask_bytes if dropout else 0  # CUDA's fused dropout keeps bool masks; CPU keeps them in the value dtype
    norm = value_bytes if norm_bytes is None else norm_bytes
    sbh = s * b * h
    # Replicated on every TP rank unless SP shards them over the sequence: what the two norms keep (their
    # inputs), the attention input, the MLP input (each one value) and two dropout masks.
    replicated = sbh * (2 * norm + 2 * value_bytes + 2 * mask)
    # Split over heads / FFN columns: Q, K, V, the attention context, and the MLP's (B, T, ffn) tensors.
    ffn_kept = (3 if gated else 2) if ffn_kept is None else ffn_kept
    core = 4 if math_fp32 and scores_stored else value_bytes  # bytes of what the attention core keeps
    qkv_context = inner * (3 * core + value_bytes)  # per token; the context goes back to 16 bits for out_proj
    split = s * b * (qkv_context + ffn_kept * ffn * value_bytes) / t
    # Softmax output, plus with dropout its mask and its output (5as²b at 2 bytes); a fused kernel keeps
    # only an fp32 log-sum-exp per row.
    per_score = core + ((core if math_fp32 else mask) + core if dropout else 0)
    scores = (a * s * s * b * per_score if scores_stored else a * s * b * 4) / t
    if cross_attention:  # norm input, query, context, mask, plus K/V of the encoder states
        replicated += sbh * (norm + value_bytes + mask)
        split += s * b * qkv_context / t
        scores *= 2
    if sequence_parallel:
        gathered = 2 * sbh * value_bytes  # attention and MLP inputs after the all-gather
        replicated = (replicated - gathered) / t + (gathered if sp_keeps_gathered_inputs else gathered / t)
    if recompute == "full":
        return sbh * value_bytes / (t if sequence_parallel else 1)
    if recompute == "selective" and selective_policy == "matmul_outputs":
        return _matmul_outputs_bytes(s, b, h, a, t, sequence_parallel, ffn, inner, gated, scores_stored,
                                     value_bytes, cross_attention, core)
    if recompute == "selective":
        scores = 0.0
    return replicated + split + scores


def _matmul_outputs_bytes(s, b, h, a, t, sequence_parallel, ffn, inner, gated, scores_stored, value_bytes,
                          cross_attention, core) -> float:
    """Kept by the matmul-outputs policy: the block input (sharded under SP), Q, K, V (split over heads), the
    two row-parallel outputs (full-size partial sums before the reduce), the FFN matmul outputs (split), and
    what the attention kernel returns: the math path's two bmm outputs, the s x s scores and the context, in
    `core` bytes (fp32 on CPU under 16-bit: it upcasts Q, K, V), or a fused kernel's context and log-sum-exp."""
    sbh = s * b * h
    values = sbh * (1 / (t if sequence_parallel else 1) + 2) + s * b * (3 * inner + (2 if gated else 1) * ffn) / t
    kernel = s * b * inner / t * core + (a * s * s * b / t * core if scores_stored else a * s * b * 4 / t)
    if cross_attention:  # the residual entering cross-attention, its Q/K/V, its row-parallel output, its kernel
        values += sbh * 2 + s * b * 3 * inner / t
        kernel *= 2
    return values * value_bytes + kernel


@dataclass
class MemoryEstimate:
    params: float
    grads: float
    optimizer: float
    activations: float
    buffers: float

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations + self.buffers

    def as_gib(self) -> dict:
        return {k: getattr(self, k) / GIB for k in ("params", "grads", "optimizer", "activations", "buffers", "total")}


def in_flight_microbatches(layout: Layout, microbatches: int) -> float:
    """Micro-batches whose activations the first stage holds at its peak (in_flight_on_rank of rank 0)."""
    return in_flight_on_rank(layout, 0, microbatches)


def ffn_tensors(activation: str, fused: bool) -> int:
    """(B, T, ffn) tensors the MLP (models/blocks.py) keeps for backward: GELU its input and its output (fc_out's
    input); ReLU only its output, which its backward reads (no fused ReLU kernel, so on every device); gated:
    the gate, the up projection and their product, and on the torch path gelu(gate) too (the Triton
    gated_gelu recomputes it from the gate)."""
    if activation == "relu":
        return 1
    if activation == "gated_gelu" and not fused:
        return 4
    return 3 if activation.startswith("gated") else 2


def norm_kept_bytes(norm: str, value_bytes: int, fused: bool) -> float:
    """Bytes per element one norm keeps: LayerNorm and the fused RMSNorm keep their input; the torch RMSNorm
    (models/blocks.rms_norm) keeps an fp32 copy of its input and the normalized value instead."""
    return 4 + value_bytes if norm == "rmsnorm" and not fused else value_bytes


def activation_kwargs(cfg: ModelConfig, precision: str, scores_stored: bool, device: str = "cuda") -> dict:
    """device "cpu": the torch kernels (what the dry run measures); otherwise the fused (Triton) ones."""
    value_bytes, fused = 4 if precision == "fp32" else 2, device != "cpu"
    return dict(mask_bytes=value_bytes if device == "cpu" else 1, ffn=cfg.ffn_dim, head_dim=cfg.head_dim,
                gated=cfg.activation.startswith("gated"), dropout=cfg.dropout > 0 or cfg.attn_dropout > 0,
                scores_stored=scores_stored, value_bytes=value_bytes, selective_policy="matmul_outputs",
                sp_keeps_gathered_inputs=True, ffn_kept=ffn_tensors(cfg.activation, fused),
                norm_bytes=norm_kept_bytes(cfg.norm, value_bytes, fused), math_fp32=device == "cpu")


def in_flight_on_rank(layout: Layout, stage: int, microbatches: int) -> float:
    """Micro-batches of activations pp rank `stage` holds at its peak, in units of its whole share of layers,
    as torch's schedules order them (the dry run replays their action lists, tests/distributed/test_dryrun.py
    compares): GPipe and looped BFS run every forward before any backward; 1F1B holds pp - stage; interleaved
    1F1B Korthikanti's pp (1 + (pp-1)/(pp v)) on rank 0 (sec. 4.2.3) and 2/v fewer on each later rank; the
    zero-bubble schedules pp on every rank (interleaved_zb, ZB-V: Qi et al. 2024), DualPipeV pp + 1/2."""
    pp, v, schedule = layout.pp, layout.pp_virtual, layout.schedule
    if pp == 1:
        return 1.0
    if schedule in ("gpipe", "looped_bfs"):
        held = microbatches
    elif schedule == "1f1b":
        held = pp - stage
    elif schedule == "interleaved_1f1b":
        held = pp * (1 + (pp - 1) / (pp * v)) - 2 * stage / v
    else:
        held = pp + (0.5 if schedule == "dualpipev" else 0.0)
    return max(1.0, min(held, microbatches))


def stage_activation_bytes(cfg: ModelConfig, layout: Layout, seq: int, stage: int, precision: str,
                           scores_stored: bool, device: str, scored: float = 1.0,
                           num_predict: Optional[int] = None) -> tuple:
    """(kept activations of one micro-batch on pp rank `stage`, the largest transient in its backward):
    its layers (encoder and cross-attending decoder blocks apart), the embedding output when it holds the
    first stage, the logits and their fp32 copy for the loss when it holds the last. scored: the share of
    positions BERT's MLM head runs on (the labelled ones when the model sees the labels: no pp). num_predict:
    XLNet's query-stream rows (default: data.plm_k and plm_max_span's defaults at this seq)."""
    kwargs = activation_kwargs(cfg, precision, scores_stored, device)
    if cfg.family == "xlnet":
        from scaletrain.plan.memory_xlnet import xlnet_stage_bytes

        return xlnet_stage_bytes(cfg, layout, seq, stage, kwargs, num_predict)
    value_bytes = kwargs["value_bytes"]
    b, t, sp = layout.micro_batch, layout.tp, layout.sequence_parallel

    def layer(recompute: str, cross: bool) -> float:
        return layer_activation_bytes(seq, b, cfg.d_model, cfg.n_heads, t, sp, recompute, cross_attention=cross,
                                      **kwargs)

    encoder_layers, decoder_layers = rank_layers(cfg, layout, stage)
    kept = encoder_layers * layer(layout.recompute, False) + decoder_layers * layer(layout.recompute, True)
    sbh = seq * b * cfg.d_model
    # a block's backward holds the gradients of its widest activations (B, T, ffn/t) and of the residual
    # stream (B, T, D), its widest weight's gradient (ffn/t, D) before it joins .grad, and first reruns the
    # forward it did not keep
    transient = block_gradient_bytes(cfg, seq * b, t, t if sp else 1, value_bytes)
    if layout.recompute != "none":
        transient += layer("none", decoder_layers > 0) - layer(layout.recompute, decoder_layers > 0)
    plans, owned = stage_split(cfg, layout)
    first = layout.pp == 1 or 0 in owned[stage]
    last = layout.pp == 1 or len(plans) - 1 in owned[stage]
    mask = kwargs["mask_bytes"] if cfg.dropout > 0 else 0
    if first:  # embedding output (+ dropout mask, + the embedding norm's input) of each stream
        streams = 2 if cfg.family == "encdec" else 1
        kept += streams * sbh * (value_bytes + mask + (kwargs["norm_bytes"] if cfg.embedding_norm else 0))
        if cfg.position == "relative":  # per stack: T5's (1, H/t, T, T) bias, which every layer keeps, and
            kept += streams * seq * seq * (cfg.n_heads / t * value_bytes + 8)  # its int64 bucket ids
    if first:
        transient = max(transient, embedding_gradient_bytes(cfg, t, value_bytes))
    if last:
        # the head's input (an LM head's normed input; BERT's MLM transform keeps its input, the dense and
        # GELU outputs and the normed output, on the `scored` share of the positions) and the vocab-sharded
        # logits the loss keeps: the fused loss (tp 1) its 16-bit input, the vocab-parallel one (DTensor,
        # tp > 1) the fp32 log-softmax of its shard; in backward their gradient and the loss's fp32 copy
        rows = seq * b * (scored if cfg.family == "bert" else 1.0)
        logits = rows * cfg.padded_vocab_size(t) / t
        head_kept = rows * cfg.d_model * value_bytes * (4 if cfg.family == "bert" else 1)
        head_kept += logits * (4 if t > 1 else value_bytes)
        kept += head_kept
        if cfg.final_norm and cfg.norm == "rmsnorm" and device == "cpu":  # the torch RMSNorm's own tensors
            kept += sbh * kwargs["norm_bytes"]
        if cfg.position == "relative":  # T5 drops out after the final norm
            kept += sbh * mask
        transient = max(transient, head_gradient_bytes(cfg, logits, rows, t, value_bytes, first, head_kept))
    return kept, transient


def stage_memory(cfg: ModelConfig, layout: Layout, seq: int, global_batch: int, stage: int,
                 precision: str = "bf16", scores_stored: bool = False, elements: Optional[tuple] = None,
                 device: str = "cuda", scored: float = 1.0, num_predict: Optional[int] = None) -> MemoryEstimate:
    """Peak memory of the rank at dp/tp index 0 of pp rank `stage` (ceil-sized shards: the largest).
    scores_stored=False models a fused (flash) attention kernel, which keeps a log-sum-exp per row instead of
    the s x s scores. `elements` (rank_state_elements of this stage) may be passed in by callers that cache it."""
    elements = rank_state_elements(cfg, layout, stage) if elements is None else elements
    full = stage_parameters(cfg, layout, stage)
    p, g, o = model_state_bytes(elements, precision)
    microbatches = global_batch // (layout.dp * layout.micro_batch)
    kept, transient = stage_activation_bytes(cfg, layout, seq, stage, precision, scores_stored, device, scored,
                                             num_predict)
    activations = kept * in_flight_on_rank(layout, stage, microbatches)
    buffers = (transient + accumulation_bytes(layout, full, microbatches, precision)
               + fsdp_gather_bytes(layout, full, sum(rank_layers(cfg, layout, stage)), precision))
    return MemoryEstimate(p, g, o, activations, buffers)


def peak_memory(cfg: ModelConfig, layout: Layout, seq: int, global_batch: int, precision: str = "bf16",
                scores_stored: bool = False, stage_elements: Optional[dict] = None,
                device: str = "cuda") -> MemoryEstimate:
    """The worst stage: the first one holds the most activations, the last one the logits."""
    stage_elements = stage_elements or {}
    estimates = [stage_memory(cfg, layout, seq, global_batch, s, precision, scores_stored, stage_elements.get(s),
                              device)
                 for s in sorted({0, layout.pp - 1})]  # V placements hold the last stage on rank 0 too
    return max(estimates, key=lambda m: m.total)

