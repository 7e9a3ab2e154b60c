"""The dry run: one rank's shard of a table model under a fake process group, its per-rank memory
measured from the DTensor shards against the ZeRO paper's formulas (within 2%), and its activations,
measured on CPU, against the planner's (within 10%)."""

import subprocess
import sys

import pytest

from scaletrain.configs.schema import DryRunConfig, OptimConfig, ParallelConfig, TrainConfig
from scaletrain.configs.store import compose_config
from scaletrain.models.registry import load_model_config
from scaletrain.parallel.dryrun import dry_run as dry_run_of, dry_run_report, zero_formula


def dry_run(model: str, tp: int, dp: int, zero: int, precision: str = "bf16", rank: int = 5):
    cfg = TrainConfig(model=load_model_config(model), parallel=ParallelConfig(tp=tp, dp_shard=dp, zero=zero),
                      optim=OptimConfig(name="adamw"), precision=precision,
                      dry_run=DryRunConfig(world_size=tp * dp, rank=rank))
    return dry_run_report(cfg)


def assert_within_2_percent(measured, formula, parts=("params", "grads", "optimizer", "total")):
    for part in parts:
        m, f = getattr(measured, part), getattr(formula, part)
        assert abs(m / f - 1) < 0.02, f"{part}: measured {m:.4g} vs formula {f:.4g}"


@pytest.mark.parametrize("model, tp, dp, zeros", [
    ("gpt3_175b", 8, 128, (1, 3)),
    ("megatron_8_3b", 8, 64, (0, 1, 2, 3)),
    ("bert_large", 1, 16, (0, 1, 2, 3)),
])
def test_dry_run_matches_zero_formulas(model, tp, dp, zeros):
    for zero in zeros:
        measured, formula, text = dry_run(model, tp, dp, zero)
        assert_within_2_percent(measured, formula)
        assert f"zero={zero}" in text and "ratio" in text


def test_stage_3_is_16_psi_over_nd_for_mixed_precision_adam():
    measured, formula, _ = dry_run("gpt3_175b", 8, 128, 3)
    psi = 174.6e9
    assert formula.total == pytest.approx(16 * psi / (8 * 128), rel=1e-3)
    assert measured.total / 2**30 == pytest.approx(2.54, abs=0.01)  # GiB per rank


def test_formulas_follow_the_paper():
    # ZeRO paper, Fig. 1: Psi = 7.5B, N_d = 64, K = 12 -> 120 GB, 31.4 GB, 16.6 GB, 1.9 GB
    totals = [zero_formula(7.5e9, zero, 64, 1, (2, 2, 12)).total / 1e9 for zero in range(4)]
    assert totals == pytest.approx([120, 31.4, 16.6, 1.875], abs=0.05)


def test_cli_dry_run_of_gpt3_at_1024_ranks(tmp_path):
    command = [sys.executable, "-m", "scaletrain.cli", "train", "model=gpt3_175b", "parallel.tp=8",
               "parallel.dp_shard=128", "parallel.zero=3", "precision=bf16", "dry_run.world_size=1024",
               "dry_run.rank=5", f"hydra.run.dir={tmp_path}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "rank 5 of 1024" in done.stdout and "{'dp_shard': 0, 'tp': 5}" in done.stdout
    total = next(line for line in done.stdout.splitlines() if line.strip().startswith("model states"))
    assert float(total.split()[-1]) == pytest.approx(1.0, abs=0.02)


OBJECTIVES = {"gpt": "clm", "bert": "mlm", "t5": "t5_span", "bart": "bart_denoise", "xlnet": "plm"}
# (model, tp, pp, dp_replicate, dp_shard, zero, rank, overrides): pp, HSDP, 3D and ZeRO 0-3 for the three
# families, world sizes 4 to 1,024; models big enough for the closed form where the world is large
LAYOUTS = [
    ("gpt2_355m", 8, 8, 1, 16, 1, 5, ["parallel.sequence_parallel=true"]),  # 3D, 1,024 ranks, first stage
    ("gpt2_355m", 8, 8, 1, 16, 1, 1023, ["parallel.sequence_parallel=true"]),  # last stage
    ("bert_large", 2, 2, 8, 32, 3, 700, []),  # HSDP x pp x tp, 1,024
    ("t5_large", 4, 4, 1, 64, 2, 517, []),  # 1,024
    ("bart_base", 2, 4, 4, 8, 3, 100, ["trainer.activation_checkpointing=selective"]),  # HSDP 3D, 256
    ("gpt_tiny", 1, 2, 1, 2, 3, 1, ["model.n_layers=8", "parallel.pp_virtual=2",
                                    "parallel.pp_schedule=interleaved_1f1b"]),
    ("gpt_tiny", 2, 2, 1, 2, 2, 6, ["model.n_layers=8", "parallel.pp_virtual=2", "parallel.pp_schedule=zbv"]),
    ("gpt_tiny", 2, 2, 1, 2, 0, 3, ["parallel.sequence_parallel=true", "trainer.activation_checkpointing=selective"]),
    ("bert_tiny", 2, 1, 1, 4, 2, 3, []),
    ("t5_tiny", 2, 2, 1, 2, 1, 5, []),
    ("bart_tiny", 1, 2, 2, 2, 2, 6, []),
    ("t5_v1_1_tiny", 1, 2, 1, 4, 3, 7, ["trainer.activation_checkpointing=full"]),
    # the math attention path under selective recompute keeps fp32 scores and context on CPU (measured 1.24x)
    ("gpt_tiny", 2, 2, 1, 2, 1, 5, ["model.dropout=0.1", "model.attn_dropout=0.1",
                                    "trainer.activation_checkpointing=selective"]),
]


def layout_config(model, tp, pp, replicate, shard, zero, rank, overrides, seq=64, micro_batch=2):
    objective = next(o for prefix, o in OBJECTIVES.items() if model.startswith(prefix))
    return compose_config([
        f"model={model}", f"data.objective={objective}", f"parallel.tp={tp}", f"parallel.pp={pp}",
        f"parallel.dp_replicate={replicate}", f"parallel.dp_shard={shard}", f"parallel.zero={zero}", "precision=bf16",
        f"trainer.seq_len={seq}", f"trainer.micro_batch={micro_batch}",
        f"trainer.global_batch={8 * replicate * shard * micro_batch}", f"dry_run.world_size={tp * pp * replicate * shard}",
        f"dry_run.rank={rank}", *overrides])


@pytest.mark.parametrize("model,tp,pp,replicate,shard,zero,rank,overrides", LAYOUTS)
def test_every_layout_measures_the_formulas_model_states_and_the_planners_activations(
        model, tp, pp, replicate, shard, zero, rank, overrides):
    result = dry_run_of(layout_config(model, tp, pp, replicate, shard, zero, rank, overrides))
    measured, planner = result.measured, result.planner
    # the planner's per-tensor cut (ceil-sized dim-0 shards of each tp-local tensor) to the byte
    assert (measured.params, measured.grads, measured.optimizer) == (planner.params, planner.grads, planner.optimizer)
    if not model.endswith("_tiny"):  # the closed form takes Psi/tp for every tensor; tiny models' norms are not
        assert_within_2_percent(measured, result.formula)
    assert result.activations.kept_peak == pytest.approx(planner.activations, rel=0.10)
    if not model.endswith("_tiny"):  # the backward's transients (tiny models': KiB of small tensors)
        assert result.activations.transient + result.fsdp_buffers == pytest.approx(planner.buffers, rel=0.15)


# GPT-3 XL on 8 ranks, one micro-batch of 64 (the whole model on each rank, a tied 50304 x 2048 table):
# ZeRO-3 accumulating over two micro-batches, and DDP in bf16
GPT3_LAYOUTS = [(3, "fp32", 16), (0, "bf16", 8)]


@pytest.mark.parametrize("zero,precision,global_batch", GPT3_LAYOUTS)
def test_gpt3_planner_transients_and_fsdp_buffers_are_the_dry_runs(zero, precision, global_batch):
    """The backward's transients the CPU measured (a block's widest weight gradient; at the head the tied
    table's two gradients and their sum, 3 x 50304 x 2048 values) plus FSDP's buffers, against the planner's:
    before the weight gradients were counted the planner had 0.018 GiB of the measured 0.569 (bf16 DDP)."""
    cfg = compose_config(["model=gpt3_xl", "parallel.dp_shard=8", f"parallel.zero={zero}", f"precision={precision}",
                          "trainer.seq_len=64", "trainer.micro_batch=1", f"trainer.global_batch={global_batch}",
                          "dry_run.world_size=8", "dry_run.rank=0"])
    result = dry_run_of(cfg)
    table = 50304 * 2048 * (4 if precision == "fp32" else 2)
    assert result.activations.transient > 2.5 * table  # the three tables, less the head's freed activations
    assert result.activations.transient + result.fsdp_buffers == pytest.approx(result.planner.buffers, rel=0.10)
    assert result.peak == pytest.approx(result.planner.total, rel=0.10)


# XLNet (tiny, dropout on): (tp, pp, dp_shard, zero, rank, overrides); micro-batch 1 and 3 (a batch of one
# turns the batch broadcasts of the position keys, segment terms and target_mapping into views)
XLNET_LAYOUTS = [(1, 1, 1, 0, 0, ["precision=fp32", "trainer.micro_batch=3"]),
                 (2, 1, 2, 3, 3, ["trainer.micro_batch=1"]),
                 (1, 2, 1, 0, 0, ["precision=fp32"]),
                 (2, 2, 1, 1, 3, ["model.n_layers=3", "trainer.micro_batch=1"]),
                 (1, 1, 2, 2, 1, ["trainer.activation_checkpointing=full"])]


@pytest.mark.parametrize("tp,pp,shard,zero,rank,overrides", XLNET_LAYOUTS)
def test_xlnet_planner_activations_are_the_dry_runs_measured_bytes(tp, pp, shard, zero, rank, overrides):
    """Both streams' blocks, the model's last block without its content stream, the positions and masks once
    per stage, the embeddings and the head: the planner's bytes are what the CPU kept, to the byte."""
    cfg = layout_config("xlnet_tiny", tp, pp, 1, shard, zero, rank, ["model.dropout=0.1", "model.attn_dropout=0.1",
                                                                     *overrides], seq=40)
    result = dry_run_of(cfg)
    assert result.activations.kept_peak == result.planner.activations
    assert (result.measured.params, result.measured.optimizer) == (result.planner.params, result.planner.optimizer)


def test_gpt3_175b_3d_rank_holds_its_stage_under_zero_1():
    """tp8 x pp8 x dp16 on 1,024 ranks: rank 5 holds stage 0 (12 of 96 layers and the embeddings), Psi_s =
    12 (12h^2 + 13h) + (51200 + 2048) h parameters; ZeRO-1 keeps (2 + 2) Psi_s / tp + 12 Psi_s / (tp dp)."""
    cfg = layout_config("gpt3_175b", 8, 8, 1, 16, 1, 5, [], seq=2048, micro_batch=1)
    result = dry_run_of(cfg, activations=False)
    h = 12288
    psi_stage = 12 * (12 * h**2 + 13 * h) + (51200 + 2048) * h
    assert result.psi_rank == psi_stage
    assert result.measured.total == pytest.approx((4 + 12 / 16) * psi_stage / 8, rel=1e-3)
    assert "holds stage 0 of 8 (layers 0-11, embeddings)" in result.text


@pytest.mark.parametrize("schedule,virtual", [("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2),
                                              ("looped_bfs", 2), ("interleaved_zb", 2), ("zbv", 2),
                                              ("dualpipev", 2)])
def test_planner_micro_batches_in_flight_follow_the_schedules_action_lists(schedule, virtual):
    """The dry run replays torch's own pipeline order (one unit of activations per stage forward, freed by its
    backward): the planner's in-flight count for every pp rank of every schedule."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from scaletrain.parallel.dims import ParallelDims
    from scaletrain.parallel.dryrun import rank_layout
    from scaletrain.parallel.dryrun_activations import schedule_peak
    from scaletrain.parallel.pipeline_split import local_stage_indices
    from scaletrain.plan.memory import in_flight_on_rank

    pp, microbatches = 4, 16
    for rank in range(pp):
        cfg = compose_config(["model=gpt_tiny", f"parallel.pp={pp}", f"parallel.pp_virtual={virtual}",
                              f"parallel.pp_schedule={schedule}", f"trainer.global_batch={microbatches}",
                              "trainer.micro_batch=1", f"dry_run.world_size={pp}", f"dry_run.rank={rank}"])
        dims = ParallelDims.from_config(cfg.parallel, pp)
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=pp)
        try:
            dims.build_mesh("cpu")
            stages = local_stage_indices(rank, cfg.parallel)
            peak, _ = schedule_peak(cfg, dims, {s: 1.0 for s in stages}, {s: 0.0 for s in stages}, microbatches)
            assert peak / len(stages) == in_flight_on_rank(rank_layout(cfg, dims), rank, microbatches), rank
        finally:
            dist.destroy_process_group()
