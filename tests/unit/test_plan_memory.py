"""The planner's memory model against its references: Korthikanti et al.'s printed formulas, the real
models' parameter tensors, the dry run's measured DTensor shards, and activation bytes measured on CPU."""

import dataclasses

import pytest

from scaletrain.configs import available
from scaletrain.configs.store import compose_config
from scaletrain.models.registry import build_model, count_parameters as model_count, load_model_config
from scaletrain.parallel.multiprocess import run_on_ranks
from scaletrain.plan.measure import layer_bytes, layer_bytes_on_rank
from scaletrain.plan.memory import (Layout, activation_kwargs, count_parameters, in_flight_microbatches,
                                    layer_activation_bytes, model_state_bytes, parameter_inventory,
                                    rank_state_elements, stage_parameters)


@pytest.mark.parametrize("s,b,h,a,t", [(2048, 1, 12288, 96, 8), (1024, 4, 2304, 24, 2), (512, 2, 768, 12, 1)])
def test_activation_formula_is_korthikanti_equations(s, b, h, a, t):
    """Korthikanti et al. 2022, eqs. (1)-(5), 16-bit activations, dropout, scores materialized."""
    no_parallel = layer_activation_bytes(s, b, h, a)
    assert no_parallel == pytest.approx(s * b * h * (34 + 5 * a * s / h))
    tp = layer_activation_bytes(s, b, h, a, tp=t)
    assert tp == pytest.approx(s * b * h * (10 + 24 / t + 5 * a * s / (h * t)))
    tp_sp = layer_activation_bytes(s, b, h, a, tp=t, sequence_parallel=True)
    assert tp_sp == pytest.approx(s * b * h / t * (34 + 5 * a * s / h))
    selective = layer_activation_bytes(s, b, h, a, tp=t, sequence_parallel=True, recompute="selective")
    assert selective == pytest.approx(34 * s * b * h / t)
    assert layer_activation_bytes(s, b, h, a, tp=t, recompute="full") == 2 * s * b * h


def test_first_stage_holds_pp_microbatches_and_interleaving_adds_its_factor():
    assert in_flight_microbatches(Layout(pp=8), microbatches=64) == 8
    assert in_flight_microbatches(Layout(pp=8), microbatches=3) == 3
    assert in_flight_microbatches(Layout(pp=4, pp_virtual=2), 64) == pytest.approx(4 * (1 + 3 / 8))


@pytest.mark.parametrize("name", available("model"))
def test_inventory_is_the_real_models_parameters(name):
    cfg = load_model_config(name)
    padded = dataclasses.replace(cfg, vocab_size=cfg.padded_vocab_size(1), pad_vocab_multiple=1)
    real = {n: tuple(p.shape) for n, p in build_model(padded, "meta").named_parameters()}
    assert {t.name: t.shape for t in parameter_inventory(cfg)} == real
    assert count_parameters(cfg) == model_count(build_model(cfg, "meta"))


# (model, tp, dp, zero, precision, rank): ranks are laid out tp fastest, as ParallelDims builds the mesh
DRY_RUN_CASES = [("gpt_tiny", 1, 4, 0, "fp32", 2), ("gpt_tiny", 2, 4, 1, "bf16", 3), ("gpt_tiny", 2, 4, 2, "bf16", 7),
                 ("gpt_tiny", 2, 3, 3, "bf16", 5), ("gpt_tiny", 4, 2, 3, "fp32", 6), ("bert_tiny", 2, 3, 3, "bf16", 4),
                 ("t5_tiny", 2, 2, 2, "fp32", 1), ("bart_tiny", 2, 3, 1, "bf16", 5)]


@pytest.mark.parametrize("model,tp,dp,zero,precision,rank", DRY_RUN_CASES)
def test_model_states_equal_the_dry_runs_measured_shards(model, tp, dp, zero, precision, rank):
    from scaletrain.parallel.dryrun import dry_run_report

    cfg = compose_config([f"model={model}", f"parallel.tp={tp}", f"parallel.dp_shard={dp}", f"parallel.zero={zero}",
                          f"precision={precision}", f"dry_run.world_size={tp * dp}", f"dry_run.rank={rank}",
                          f"trainer.global_batch={4 * dp}", "trainer.micro_batch=1", "trainer.seq_len=32"])
    measured, _, _ = dry_run_report(cfg)
    layout = Layout(tp=tp, dp=dp, zero=zero)
    elements = rank_state_elements(cfg.model, layout, stage=0, tp_rank=rank % tp, dp_rank=rank // tp)
    assert model_state_bytes(elements, precision) == (measured.params, measured.grads, measured.optimizer)


def test_zero_stages_follow_the_zero_paper_split():
    cfg = load_model_config("gpt2_124m")
    psi = stage_parameters(cfg, Layout(), 0)
    for zero, expected in [(0, 16 * psi), (1, 4 * psi + 12 * psi / 64), (2, 2 * psi + 14 * psi / 64), (3, 16 * psi / 64)]:
        elements = rank_state_elements(cfg, Layout(dp=64, zero=zero))
        assert sum(model_state_bytes(elements, "bf16")) == pytest.approx(expected, rel=2e-3)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("mode", ["none", "selective", "full"])
def test_activation_formula_within_10_percent_of_measured_on_cpu(mode, dropout):
    """tp 1, fp32. With dropout the CPU SDPA takes the math path (s x s scores kept); without it, the fused
    CPU flash kernel (log-sum-exp only)."""
    cfg = dataclasses.replace(load_model_config("gpt_tiny"), d_model=64, n_heads=4, max_seq_len=64, dropout=dropout,
                              attn_dropout=dropout, kernels="torch")
    measured = layer_bytes(cfg, mode, batch=4, seq=64)
    predicted = layer_activation_bytes(64, 4, cfg.d_model, cfg.n_heads, 1, False, mode,
                                       **activation_kwargs(cfg, "fp32", scores_stored=dropout > 0, device="cpu"))
    assert predicted == pytest.approx(measured, rel=0.10)


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_activation_formula_within_10_percent_of_measured_at_tp2(sequence_parallel):
    """Each of 2 ranks measures its own shard, for no recompute, selective and full."""
    cfg = dataclasses.replace(load_model_config("gpt_tiny"), d_model=64, n_heads=4, max_seq_len=64, dropout=0.0,
                              attn_dropout=0.0, kernels="torch")
    for mode in ("none", "selective", "full"):
        measured = run_on_ranks(layer_bytes_on_rank, 2, cfg, mode, 4, 64, sequence_parallel)
        predicted = layer_activation_bytes(64, 4, cfg.d_model, cfg.n_heads, 2, sequence_parallel, mode,
                                           **activation_kwargs(cfg, "fp32", scores_stored=False, device="cpu"))
        assert measured == [pytest.approx(predicted, rel=0.10)] * 2, mode


@pytest.mark.parametrize("activation", ["relu", "gated_gelu"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_t5_style_layer_formula_within_10_percent_of_measured_on_cpu(activation, dropout):
    """The torch RMSNorm keeps an fp32 copy and the normalized value, not its input; ReLU keeps only its
    output, the torch gated GELU four (B, T, ffn) tensors."""
    cfg = dataclasses.replace(load_model_config("gpt_tiny"), d_model=64, n_heads=4, max_seq_len=64, dropout=dropout,
                              attn_dropout=dropout, kernels="torch", norm="rmsnorm", bias=False,
                              activation=activation)
    measured = layer_bytes(cfg, "none", batch=4, seq=64)
    predicted = layer_activation_bytes(64, 4, cfg.d_model, cfg.n_heads, 1, False, "none",
                                       **activation_kwargs(cfg, "fp32", scores_stored=dropout > 0, device="cpu"))
    assert predicted == pytest.approx(measured, rel=0.10)
