"""The layout search and `scaletrain plan`: published Megatron-LM throughput, infeasible requests with their
reason, and emitted plans that compose, validate and train."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from scaletrain import cli
from scaletrain.configs.schema import ModelConfig
from scaletrain.configs.store import compose_config
from scaletrain.plan.memory import GIB
from scaletrain.plan.search import InfeasiblePlanError, PlanRequest, search
from scaletrain.plan.timing import narayanan_flops, training_flops

REPO = Path(__file__).resolve().parents[2]


def _benchmark():
    spec = importlib.util.spec_from_file_location("plan_vs_published", REPO / "benchmarks" / "plan_vs_published.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_flops_reduce_to_narayanan_formula():
    cfg = ModelConfig(name="m", vocab_size=51200, d_model=2304, n_layers=24, n_heads=24, max_seq_len=2048)
    assert training_flops(cfg, 512, 2048, "none") == pytest.approx(narayanan_flops(512, 2048, 24, 2304, 51200, False))
    full = training_flops(cfg, 512, 2048, "full")
    assert full == pytest.approx(96 * 512 * 2048 * 24 * 2304**2 * (1 + 2048 / (6 * 2304) + 51200 / (16 * 24 * 2304)))


@pytest.mark.parametrize("row", range(3))
def test_time_model_within_15_percent_of_megatron_table_1(row):
    bench = _benchmark()
    _, tflops, published = bench.estimate(bench.PUBLISHED[row], bench.a100_cluster())
    assert tflops == pytest.approx(published, rel=0.15)


def test_gpt3_175b_on_128_a100_nodes_fits_with_model_parallelism():
    cfg = compose_config(["model=gpt3_175b", "cluster=a100_80g", "launcher.nodes=128", "trainer.global_batch=1536",
                          "trainer.seq_len=2048"])
    from scaletrain.plan.cli import request_from_config

    plans = search(request_from_config(cfg), top=3)
    best = plans[0]
    assert best.layout.tp * best.layout.pp > 1 and best.layout.world_size == 1024
    assert best.memory.total <= 80 * GIB and 0.3 < best.mfu < 0.65
    assert [p.time.step_s for p in plans] == sorted(p.time.step_s for p in plans)


def test_too_few_gpus_for_the_optimizer_state_says_how_many():
    with pytest.raises(InfeasiblePlanError, match=r"needs at least 36 A100-SXM4-80GB .* optimizer state alone"):
        from scaletrain.plan.cli import request_from_config

        search(request_from_config(compose_config(["model=gpt3_175b", "cluster=a100_80g", "launcher.nodes=4"])))


def test_indivisible_batch_and_oversized_activations_are_explained(tmp_path):
    odd = ModelConfig(name="odd", vocab_size=1000, d_model=40, n_layers=5, n_heads=5, max_seq_len=64)
    cluster = compose_config(["cluster=a100_80g"]).cluster
    with pytest.raises(InfeasiblePlanError, match="global_batch=3"):
        search(PlanRequest(odd, cluster, nodes=1, devices_per_node=8, global_batch=3, seq_len=64))
    big = compose_config(["model=gpt2_124m"]).model
    v100 = compose_config(["cluster=v100_dgx1"]).cluster
    with pytest.raises(InfeasiblePlanError, match="no layout fits"):
        search(PlanRequest(big, v100, nodes=1, devices_per_node=1, global_batch=1, seq_len=131072, precision="fp16"))


def test_cli_infeasible_is_one_line_exit_2(capsys, tmp_path):
    code = cli.main(["plan", "model=gpt3_175b", "cluster=a100_80g", "launcher.nodes=2", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "needs at least" in err and "launcher.nodes=" in err


def test_emitted_plan_composes_and_validates_for_a_cluster(tmp_path, capsys):
    from scaletrain.train.main import validate

    assert cli.main(["plan", "model=gpt3_13b", "cluster=v100_dgx1", "launcher.nodes=16", "trainer.global_batch=512",
                     "trainer.seq_len=2048", "--tokens", "300e9", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "days" in out and "GPU-hours" in out
    preset = next((tmp_path / "experiment").glob("*.yaml"))
    cfg = compose_config([f"hydra.searchpath=[file://{tmp_path}]", f"experiment={preset.stem}", "model=gpt3_13b",
                          "cluster=v100_dgx1", "launcher.nodes=16", "launcher.nproc_per_node=8"])
    validate(cfg)  # the trainer's own pre-launch checks, world size 128
    assert cfg.trainer.global_batch == 512 and cfg.precision == "fp16"
    assert cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.dp_shard == 128


def test_a_tiny_two_process_plan_trains_with_scaletrain_train(tmp_path):
    """The printed command, run as is (plus a step limit), on 2 local workers. tp is pinned to 1 because the
    trainer's tensor-parallel path does not train yet (Adam's foreach gets mixed Tensor/DTensor lists)."""
    overrides = ["model=gpt_tiny", "model.vocab_size=512", "data.tokenizer_vocab=512", "launcher.nproc_per_node=2",
                 "trainer.global_batch=8", "trainer.seq_len=32"]
    plan = subprocess.run([sys.executable, "-m", "scaletrain.cli", "plan", *overrides, "--fix", "tp=1",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert plan.returncode == 0, plan.stderr
    command = next(line for line in plan.stdout.splitlines() if line.startswith("run it: "))[len("run it: "):]
    assert "parallel.dp_shard=2" in command
    argv = command.split()[2:] + ["trainer.max_steps=3", "trainer.eval_every=3", "trainer.progress_bar=false",
                                  "checkpoint.save_final=false", "trainer.sample_tokens=0", "data.num_workers=0"]
    train = subprocess.run([sys.executable, "-m", "scaletrain.cli", "train", *argv], capture_output=True, text=True,
                           timeout=300, cwd=tmp_path)
    assert train.returncode == 0, train.stderr[-3000:]
    final = json.loads(next(tmp_path.rglob("final_metrics.json")).read_text())
    assert final["step"] == 3 and math.isfinite(final["val_loss"])


def test_table_gets_planned_layout_and_time_columns(capsys):
    assert cli.main(["table", "gpt2_124m", "bert_base", "--cluster", "v100_dgx1", "--tokens", "1e10",
                     "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    for row in rows:
        plan = row["plan"]
        assert plan["nodes"] == 1 and plan["gpus"] == 8 and plan["layout"].startswith("tp")
        # days = tokens / (tokens per second): recompute it from MFU, FLOPs per token and the V100 peak
        cfg = compose_config([f"model={row['name']}"]).model
        flops_per_token = training_flops(cfg, 1, plan["seq_len"]) / plan["seq_len"]
        seconds = 1e10 * flops_per_token / (plan["mfu"] * 125e12 * 8)
        assert plan["days"] == pytest.approx(seconds / 86400, rel=1e-6)


def test_xlnet_layouts_include_pipelines_but_not_sequence_parallelism():
    from scaletrain.plan.cli import request_from_config
    from scaletrain.plan.search import enumerate_layouts, evaluate
    from scaletrain.train.main import validate

    cfg = compose_config(["model=xlnet_large", "data=xlnet_plm", "cluster=a100_80g", "launcher.nodes=2",
                          "trainer.global_batch=64", "trainer.seq_len=512"])
    request = request_from_config(cfg)
    layouts = list(enumerate_layouts(request))
    assert any(layout.pp > 1 for layout in layouts) and not any(layout.sequence_parallel for layout in layouts)
    pipelined = next(layout for layout in layouts if (layout.pp, layout.tp, layout.recompute) == (2, 2, "none"))
    same = (1, 2, "none", pipelined.micro_batch, pipelined.zero)
    single = next(layout for layout in layouts
                  if (layout.pp, layout.tp, layout.recompute, layout.micro_batch, layout.zero) == same)
    # the first stage holds half the layers (and the embeddings) but 2 micro-batches of them in flight (1F1B);
    # without pp the last block's content stream and the head come on top of the other half
    staged, whole = evaluate(request, pipelined).memory, evaluate(request, single).memory
    assert staged.params < 0.6 * whole.params
    assert staged.activations == pytest.approx(whole.activations, rel=0.15)
    validate(compose_config(["model=xlnet_large", "data=xlnet_plm", "parallel.pp=2", "parallel.tp=2",
                             "parallel.dp_shard=2", "launcher.nproc_per_node=8", "trainer.global_batch=64",
                             "trainer.micro_batch=2"]))
