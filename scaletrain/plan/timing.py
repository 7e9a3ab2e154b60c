"""Step time of a training layout: FLOPs over an efficiency-scaled peak, plus the communication on the
critical path and the pipeline bubble.

  * FLOPs per iteration: 72·B·s·l·h²·(1 + s/(6h) + V/(16·l·h)) without recompute and 96·... with full
    recompute (Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters Using
    Megatron-LM", sec. 5.1 / appendix). `layer_forward_flops` is the same count per layer, generalized to
    other FFN widths, gated MLPs and cross-attention; it reduces to the paper's formula for a GPT.
  * Tensor parallelism: 2 all-reduces per layer in forward and 2 in backward (+2 in the recomputed forward),
    each of b·s·h values, on the intra-node link (Shoeybi et al. 2019, sec. 3). Sequence parallelism turns
    each into an all-gather + reduce-scatter of the same volume (Korthikanti et al. 2022, sec. 4.2.2).
  * Pipeline parallelism: (pp-1)/v bubble micro-batch slots, and a send/receive of b·s·h/t values per
    micro-batch per chunk boundary (Narayanan et al. 2021, sec. 2.2 and 4.1 scatter/gather).
  * Element-wise kernels are memory bound: the bytes the layer keeps (Korthikanti's count) moved
    ELEMENTWISE_PASSES times over HBM bandwidth.
  * Data parallelism: a ring all-reduce of the gradients, 2(d-1)/d of their bytes per device, partly
    overlapped with the last micro-batch's backward. Ranks are ordered tp (fastest), dp, pp, so dp crosses
    nodes once tp·dp exceeds a node. ZeRO-2/3 (FSDP) reduce-scatter once per step, pp or not, and add the
    parameter all-gathers that recur per micro-batch (see step_time).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from scaletrain.configs.schema import ClusterConfig, ModelConfig
from scaletrain.plan.memory import Layout, activation_kwargs, layer_activation_bytes, stage_parameters, total_layers


@dataclass(frozen=True)
class HardwareEfficiency:
    """Per-accelerator constants of the time model (never per-model or per-row corrections).

    gemm_efficiency: the fraction of the datasheet peak that the dense matmuls of a transformer layer reach.
    hbm_gbps: device memory bandwidth, which bounds the element-wise work (norms, softmax, GeLU, dropout,
    residual adds): each activation byte a layer keeps is written and read about ELEMENTWISE_PASSES times."""

    gemm_efficiency: float
    hbm_gbps: float


# A100-80GB: cuBLAS bf16 GEMMs of transformer shapes (M = b*s in the thousands, K and N >= 1536) run at
# ~60% of the 312 TFLOP/s peak (NVIDIA, "Matrix Multiplication Background User's Guide", A100 figures;
# Narayanan et al. 2021 fig. 8 sweep). HBM2e 2,039 GB/s (A100 datasheet).
# V100-SXM2-32GB: 0.36, from Shoeybi et al. 2019 (Megatron-LM, sec. 5.1): a 1.2B GPT (40 x 1536, 16 heads,
# seq 1024, activation checkpointing) on one DGX-1 V100 sustained 39 TFLOP/s, 30% of the 125 fp16 peak;
# this time model reproduces that figure with 0.36 (benchmarks/plan_vs_published.py prints it). HBM2 900 GB/s.
# H100-SXM: ~60% of the 989 dense bf16 TFLOP/s for cuBLAS transformer GEMMs (NVIDIA H100 Tensor Core GPU
# architecture whitepaper, and the same guide); HBM3 3,350 GB/s (datasheet).
# CPU: PyTorch's fp32 GEMMs reach roughly half the AVX2 peak given in cpu_local.yaml; DDR4 ~20 GB/s.
EFFICIENCY = {
    "a100_80g": HardwareEfficiency(gemm_efficiency=0.60, hbm_gbps=2039.0),
    "v100_dgx1": HardwareEfficiency(gemm_efficiency=0.36, hbm_gbps=900.0),
    "h100": HardwareEfficiency(gemm_efficiency=0.60, hbm_gbps=3350.0),
    "cpu_local": HardwareEfficiency(gemm_efficiency=0.5, hbm_gbps=20.0),
}
DEFAULT_EFFICIENCY = HardwareEfficiency(gemm_efficiency=0.6, hbm_gbps=2000.0)
# Each kept activation byte: written in forward, read by the next forward op, read in backward, and its
# gradient written; the element-wise kernels are memory bound, so their time is bytes / bandwidth.
ELEMENTWISE_PASSES = 4
# Implementations that bucket the gradient reduce behind backward (DDP, FSDP2) hide part of it; Megatron-LM
# 2021 reduced after backward (0.0).
DEFAULT_DP_OVERLAP = 0.5


def efficiency_for(cluster: ClusterConfig) -> HardwareEfficiency:
    return EFFICIENCY.get(cluster.name, DEFAULT_EFFICIENCY)


def layer_forward_flops(cfg: ModelConfig, tokens: int, seq: int, cross_attention: bool = False) -> float:
    """Forward FLOPs of one layer over `tokens` tokens of sequences of length `seq`: 2 FLOPs per MAC in
    Q, K, V, out (8·h·inner), the MLP (4·h·ffn, 6 when gated) and the attention scores and context
    (4·s·inner). For h = inner, ffn = 4h this is 24·h² + 4·s·h per token: Narayanan et al.'s 72/3."""
    h, inner, ffn = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.ffn_dim
    per_token = 8 * h * inner + (6 if cfg.activation.startswith("gated") else 4) * h * ffn + 4 * seq * inner
    if cross_attention:
        per_token += 8 * h * inner + 4 * seq * inner
    return tokens * per_token


def model_forward_flops(cfg: ModelConfig, tokens: int, seq: int) -> float:
    """Forward FLOPs of the whole model, the output projection (2·h·V per token) included. XLNet: its two
    streams and relative positions, as MFU counts them (train/metrics.py), on PLM batches."""
    if cfg.family == "xlnet":
        from scaletrain.plan.memory_xlnet import plm_num_predict
        from scaletrain.train.metrics import forward_flops

        return float(forward_flops(cfg, tokens // seq, seq, plm_num_predict(seq)))
    flops = cfg.n_layers * layer_forward_flops(cfg, tokens, seq)
    if cfg.family == "encdec":
        flops += cfg.decoder_layers * layer_forward_flops(cfg, tokens, seq, cross_attention=True)
    return flops + 2 * tokens * cfg.d_model * cfg.vocab_size


def narayanan_flops(batch: int, seq: int, layers: int, hidden: int, vocab: int, recompute: bool) -> float:
    """Narayanan et al. 2021, eq. (3): 96·B·s·l·h²·(1 + s/(6h) + V/(16·l·h)) with full recompute. Without
    recompute the layers cost 72/96 of that but the logit layer still costs 6·B·s·h·V (it is never
    recomputed), so 72·B·s·l·h²·(1 + s/(6h)) + 6·B·s·h·V rather than 72·(... + V/(16lh))."""
    layer_part = (96 if recompute else 72) * batch * seq * layers * hidden**2 * (1 + seq / (6 * hidden))
    return layer_part + 6 * batch * seq * hidden * vocab


def training_flops(cfg: ModelConfig, batch: int, seq: int, recompute: str = "none") -> float:
    """Hardware FLOPs of one iteration: forward + backward (2x forward) + the recomputed forward when any."""
    tokens = batch * seq
    forward = model_forward_flops(cfg, tokens, seq)
    if recompute == "full":
        return 4 * forward - 2 * tokens * cfg.d_model * cfg.vocab_size  # the output layer is not recomputed
    if recompute == "selective":  # only the attention scores/context are recomputed (4·s·inner per token)
        return 3 * forward + total_layers(cfg) * tokens * 4 * seq * cfg.n_heads * cfg.head_dim
    return 3 * forward


def ring_allreduce_s(nbytes: float, ranks: int, gbps: float) -> float:
    return 0.0 if ranks <= 1 else 2 * (ranks - 1) / ranks * nbytes / (gbps * 1e9)


@dataclass
class TimeEstimate:
    compute_s: float  # all micro-batches of one stage, no bubble
    tp_comm_s: float
    pp_comm_s: float
    bubble_s: float
    dp_comm_s: float  # exposed part only
    model_flops: float  # per iteration, no recompute (for MFU)
    hardware_flops: float  # per iteration, recompute included

    @property
    def step_s(self) -> float:
        return self.compute_s + self.tp_comm_s + self.pp_comm_s + self.bubble_s + self.dp_comm_s


def step_time(cfg: ModelConfig, layout: Layout, cluster: ClusterConfig, global_batch: int, seq: int,
              precision: str = "bf16", grad_reduce_bytes: int = 4, scores_stored: bool = False,
              dp_overlap: float = DEFAULT_DP_OVERLAP, first_stage_params: Optional[int] = None) -> TimeEstimate:
    """One optimizer step. scores_stored: attention materializes its s x s scores (no fused kernel)."""
    hw = efficiency_for(cluster)
    peak = cluster.peak_tflops(precision) * 1e12
    value_bytes = 4 if precision == "fp32" else 2
    t, pp, dp, v, b = layout.tp, layout.pp, layout.dp, layout.pp_virtual, layout.micro_batch
    microbatches = global_batch // (dp * b)
    gpus_per_node = max(cluster.gpus_per_node, 1)
    hardware_flops = training_flops(cfg, global_batch, seq, layout.recompute)
    model_flops = training_flops(cfg, global_batch, seq, "none")
    layers_per_stage = total_layers(cfg) / pp
    gemm_s = hardware_flops / (microbatches * dp) / (t * pp) / (peak * hw.gemm_efficiency)
    kept = layer_activation_bytes(seq, b, cfg.d_model, cfg.n_heads, t, layout.sequence_parallel, "none",
                                  **activation_kwargs(cfg, precision, scores_stored))
    passes = ELEMENTWISE_PASSES * (1.5 if layout.recompute == "full" else 1.0)
    elementwise_s = passes * kept * layers_per_stage / (hw.hbm_gbps * 1e9)
    per_microbatch_compute = gemm_s + elementwise_s

    activation_bytes = b * seq * cfg.d_model * value_bytes
    collectives_per_layer = 4 + (2 if layout.recompute == "full" else 0)
    tp_per_microbatch = layers_per_stage * collectives_per_layer * ring_allreduce_s(
        activation_bytes, t, cluster.intra_node_gbps)
    # Neighbouring stages are tp*dp ranks apart: same node only when both fit in a node.
    p2p_gbps = cluster.intra_node_gbps if t * dp * 2 <= gpus_per_node else cluster.inter_node_gbps
    pp_per_microbatch = 0.0 if pp == 1 else 2 * v * activation_bytes / t / (p2p_gbps * 1e9)
    slot = per_microbatch_compute + tp_per_microbatch + pp_per_microbatch
    bubble = (pp - 1) / v * slot

    if first_stage_params is None:
        first_stage_params = stage_parameters(cfg, layout, 0)
    grads = first_stage_params * grad_reduce_bytes
    dp_gbps = cluster.intra_node_gbps if t * dp <= gpus_per_node else cluster.inter_node_gbps
    dp_comm = ring_allreduce_s(grads, dp, dp_gbps)
    overlappable = per_microbatch_compute * 2 / 3  # the last micro-batch's backward
    if layout.zero >= 2:
        # FSDP reduce-scatters the gradients once per step, with or without pp: the trainer, and torch's
        # schedules through their REDUCE_GRAD action, turn gradient sync off until the last micro-batch, so
        # no micro-batch reduces on its own. The ring term above is that reduce-scatter plus one all-gather of
        # the parameters. The 16-bit all-gathers recur: without pp FSDP reshards after every backward, so
        # ZeRO-2 regathers in each forward and ZeRO-3 (resharded after forward too) in each forward and
        # backward; under pp the schedules keep the parameters unsharded after each backward
        # (reshard_after_backward=False), so ZeRO-2 gathers once per step and ZeRO-3 once in the first
        # forward and once per micro-batch's backward.
        if layout.zero == 3:
            gathers = microbatches + 1 if pp > 1 else 2 * microbatches
        else:
            gathers = 1 if pp > 1 else microbatches
        gather = ring_allreduce_s(grads * value_bytes / grad_reduce_bytes, dp, dp_gbps) / 2
        dp_comm += (gathers - 1) * gather
        if gathers > 1:  # prefetched behind the previous layer's compute
            overlappable = per_microbatch_compute * microbatches
    exposed = dp_comm - min(dp_overlap * dp_comm, overlappable)
    return TimeEstimate(compute_s=microbatches * per_microbatch_compute,
                        tp_comm_s=microbatches * tp_per_microbatch, pp_comm_s=microbatches * pp_per_microbatch,
                        bubble_s=bubble, dp_comm_s=exposed, model_flops=model_flops, hardware_flops=hardware_flops)
