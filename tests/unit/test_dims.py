"""ParallelDims, the tensor-parallel plans and the parallel presets, without any process group."""

import pytest
import torch.nn as nn
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

from scaletrain.cli import main as cli_main
from scaletrain.configs.schema import ParallelConfig
from scaletrain.errors import ConfigError
from scaletrain.models.registry import build_model, load_model_config
from scaletrain.parallel import ParallelDims, padded_model_config
from scaletrain.parallel.dims import MESH_ORDER
from scaletrain.parallel.tensor import HeadShardedTable, tensor_parallel_plan


def test_degrees_resolve_and_multiply_to_the_world_size():
    dims = ParallelDims.from_config(ParallelConfig(dp_replicate=2, dp_shard=-1, tp=4), 32)
    assert (dims.dp_replicate, dims.dp_shard, dims.tp, dims.dp_size) == (2, 4, 4, 8)
    assert dims.enabled_dims() == ["dp_replicate", "dp_shard", "tp"]
    assert dims.tp_enabled and dims.dp_enabled and not dims.pp_enabled
    assert ParallelDims.from_config(ParallelConfig(dp_shard=1), 1).build_mesh() is None


@pytest.mark.parametrize("fields, world, message", [
    (dict(dp_shard=2, tp=2), 8, "= 4 but the world size is 8"),
    (dict(dp_shard=-1, tp=3), 8, "not divisible by dp_replicate x tp x pp x cp = 3"),
])
def test_degree_mismatch_is_one_line_config_error(fields, world, message):
    with pytest.raises(ConfigError, match=message) as error:
        ParallelDims.from_config(ParallelConfig(**fields), world)
    assert "\n" not in str(error.value)


def test_fsdp_only_shards_at_zero_2_and_3():
    for zero, sharded in ((0, False), (1, False), (2, True), (3, True)):
        assert ParallelDims.from_config(ParallelConfig(dp_shard=4, zero=zero), 4).fsdp_enabled == sharded


def test_vocab_is_padded_to_128_times_tp_and_logged(caplog):
    cfg = load_model_config("gpt3_175b")
    with caplog.at_level("INFO"):
        padded = padded_model_config(cfg, 8)
    assert padded.vocab_size == 51200 and padded.vocab_size % (128 * 8) == 0
    assert "50257 to 51200" in caplog.text
    assert padded_model_config(padded, 8).vocab_size == 51200  # padding twice changes nothing


@pytest.mark.parametrize("name", ["gpt_tiny", "bert_tiny", "t5_tiny", "bart_tiny", "transformer_tiny"])
@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_plan_covers_every_projection_of_every_family(name, sequence_parallel):
    model = build_model(load_model_config(name), "meta")
    plan = tensor_parallel_plan(model, 2, sequence_parallel)
    for key in plan:  # every key names a real module (parallelize_module would skip it silently)
        model.get_submodule(key)
    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
                    and any(n.endswith(s) for s in ("q_proj", "k_proj", "v_proj", "fc_in", "fc_gate"))]
    assert linear_names and all(isinstance(plan[n], ColwiseParallel) for n in linear_names)
    rows = [n for n, _ in model.named_modules() if n.endswith(("out_proj", "fc_out"))]
    assert all(isinstance(plan[n], RowwiseParallel) for n in rows)
    assert isinstance(plan["tok_embeddings"], RowwiseParallel)  # vocab-parallel
    head = "mlm_head.decoder" if name == "bert_tiny" else "lm_head"
    assert isinstance(plan[head], ColwiseParallel)
    norms = [n for n, _ in model.named_modules() if n.endswith(("attn_norm", "mlp_norm"))]
    assert all(isinstance(plan.get(n), SequenceParallel) == sequence_parallel for n in norms)
    if name == "t5_tiny":
        assert isinstance(plan["encoder.relative_bias"], HeadShardedTable)
        assert isinstance(plan["decoder.relative_bias"], HeadShardedTable)
    if name == "bert_tiny":
        assert "type_embeddings" in plan  # 2 token types divide tp=2
        assert "type_embeddings" not in tensor_parallel_plan(model, 4)  # ...but not 4: replicated


def test_mesh_order_puts_tp_innermost():
    assert MESH_ORDER[-1] == "tp" and MESH_ORDER[0] == "pp"


@pytest.mark.parametrize("overrides, message", [
    (["parallel=no_such_preset"], "Could not find 'parallel/no_such_preset'"),
    (["model=gpt_tiny", "parallel.tp=2", "parallel.dp_shard=3", "dry_run.world_size=4"], "= 6 but the world size is 4"),
    (["model=gpt_tiny", "parallel.tp=3", "parallel.dp_shard=1", "dry_run.world_size=3"], "n_heads=4 is not divisible"),
    (["model=gpt_tiny", "parallel.tp=8", "parallel.dp_shard=1", "dry_run.world_size=8"], "larger than model.n_heads=4"),
    (["model=gpt_tiny", "parallel=tp2_sp", "trainer.seq_len=63", "dry_run.world_size=2"], "seq_len=63 is not divisible"),
])
def test_bad_parallel_input_fails_before_spawning_with_one_line(overrides, message, capsys):
    assert cli_main(["train", *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_every_parallel_preset_composes_and_validates():
    from scaletrain.configs import available
    from scaletrain.configs.schema import data_parallel_degree
    from scaletrain.configs.store import compose_config

    presets = available("parallel")
    assert {"single", "ddp", "zero1", "zero2", "zero3", "hsdp", "tp2", "tp8", "tp2_zero3", "tp2_sp"} <= set(presets)
    for preset in presets:
        cfg = compose_config([f"parallel={preset}"])
        world = 1 if preset == "single" else 16
        dims = ParallelDims.from_config(cfg.parallel, world)
        assert dims.dp_size == data_parallel_degree(cfg.parallel, world) == world // dims.tp
