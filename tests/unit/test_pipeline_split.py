"""Stage split without process groups: plans, parameter ownership, and the stages chained in one process
reproduce the whole model's outputs exactly."""

import pytest
import torch

from scaletrain.configs.schema import ParallelConfig, TrainerConfig
from scaletrain.configs.store import compose_config
from scaletrain.data.objectives import synthetic_plm_batch
from scaletrain.errors import ConfigError
from scaletrain.models.registry import build_model, load_model_config
from scaletrain.parallel.pipeline import n_microbatches, validate_schedule
from scaletrain.parallel.pipeline_split import balanced_boundaries, local_stage_indices, stage_plans
from scaletrain.parallel.pipeline_stages import build_stage_module
from scaletrain.train.main import validate

MODELS = ["gpt_tiny", "bert_tiny", "t5_tiny", "bart_tiny", "transformer_tiny", "xlnet_tiny"]


def test_balanced_boundaries_minimize_the_largest_stage():
    assert balanced_boundaries([1] * 8, 4) == [2, 4, 6]
    # a heavy head on the last stage pushes layers to the earlier stages: [4 layers | 2 layers + head 2]
    assert balanced_boundaries([1] * 6, 2, last_extra=2) == [4]
    # uneven layers: the optimum max cost is 5 ([3, 2] | [1, 1, 1, 1, 1] would be 5 too; the first wins)
    boundaries = balanced_boundaries([3, 2, 1, 1, 1, 1, 1], 2)
    costs = [sum([3, 2, 1, 1, 1, 1, 1][a:b]) for a, b in zip([0] + boundaries, boundaries + [7])]
    assert max(costs) == 5
    assert balanced_boundaries([5, 1, 1, 1], 4) == [1, 2, 3]  # every stage gets a layer


def test_encoder_decoder_plans_put_encoder_stages_first():
    cfg = load_model_config("t5_tiny", {"n_layers": 3, "n_decoder_layers": 3})
    plans = stage_plans(cfg, ParallelConfig(pp=2, pp_virtual=2, pp_schedule="interleaved_1f1b", pp_split=[2, 3, 5]))
    assert [(p.start, p.end) for p in plans] == [(0, 2), (2, 3), (3, 5), (5, 6)]
    assert plans[1].layer_keys("encdec") == {"encoder": ["2"], "decoder": []}
    assert plans[2].layer_keys("encdec") == {"encoder": [], "decoder": ["0", "1"]}
    assert plans[1].encoder_done_after and not plans[1].encoder_done_before and plans[2].encoder_done_before


def test_balanced_split_weighs_decoder_blocks_and_the_head():
    # decoder blocks carry cross-attention (16 D^2 vs 12 D^2 with d_ff = 4D), so the encoder side gets more layers
    cfg = load_model_config("t5_tiny", {"n_layers": 6, "n_decoder_layers": 6, "d_ff": 128, "vocab_size": 8})
    plans = stage_plans(cfg, ParallelConfig(pp=2))
    assert (plans[0].start, plans[0].end) == (0, 7)


@pytest.mark.parametrize("split,message", [([5], "strictly increasing"), ([2, 1], "1 strictly"),
                                           ([0], "in \\(0, "), ([4], "in \\(0, 4\\)")])
def test_bad_explicit_split_is_a_config_error(split, message):
    cfg = load_model_config("gpt_tiny", {"n_layers": 4})
    with pytest.raises(ConfigError, match=message):
        stage_plans(cfg, ParallelConfig(pp=2, pp_split=split))


def test_v_schedules_place_first_and_last_stage_on_rank_zero():
    parallel = ParallelConfig(pp=4, pp_virtual=2, pp_schedule="zbv")
    assert local_stage_indices(0, parallel) == [0, 7]
    assert local_stage_indices(3, parallel) == [3, 4]
    assert local_stage_indices(1, ParallelConfig(pp=4, pp_virtual=2, pp_schedule="interleaved_1f1b")) == [1, 5]


def _inputs(cfg):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, cfg.vocab_size, (2, 9), generator=generator)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, -3:] = 0
    if cfg.family == "gpt":
        return (ids,), {}
    if cfg.family == "bert":
        return (ids,), {"attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    if cfg.family == "xlnet":  # both streams travel: content (B, T, D) and query (B, M, D)
        batch = synthetic_plm_batch(2, 12, cfg.vocab_size, seed=0)
        batch["attention_mask"][0, :2] = 0  # XLNet pads on the left
        return (batch.pop("input_ids"),), {k: v for k, v in batch.items() if k != "labels"}
    return (ids,), {"attention_mask": mask, "decoder_input_ids": torch.randint(3, cfg.vocab_size, (2, 7),
                                                                               generator=generator)}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("n_stages", [2, 3, 5])
def test_stages_in_sequence_equal_the_whole_model(name, n_stages):
    single_stack = any(family in name for family in ("gpt", "bert", "xlnet"))
    cfg = load_model_config(name, {"n_layers": 5} if single_stack else {"n_layers": 3, "n_decoder_layers": 2})
    model = build_model(cfg, "cpu")
    model.init_weights(3)
    args, kwargs = _inputs(cfg)
    expected = model(*args, **kwargs)
    stages = [build_stage_module(model, plan) for plan in stage_plans(cfg, ParallelConfig(pp=n_stages))]
    owned = [name for stage in stages for name in stage.state_dict()]
    full = model.state_dict()
    assert set(owned) == set(full), "every parameter and buffer lives on some stage"
    assert len(owned) == len(set(owned)), "no name lives on two stages (the tied head is its own name)"
    stream = args
    for stage in stages:
        stream = stage(*stream, **kwargs)
        stream = stream if isinstance(stream, tuple) and not stage.plan.is_last else (stream,)
    outputs = stream[0]
    if cfg.family == "bert":
        torch.testing.assert_close(outputs[0], expected[0], rtol=0, atol=0)
        torch.testing.assert_close(outputs[1], expected[1], rtol=0, atol=0)
    else:
        torch.testing.assert_close(outputs, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["bart_tiny", "xlnet_tiny"])
def test_stage_init_equals_the_whole_models_init(name):
    cfg = load_model_config(name, {"n_layers": 3})
    model = build_model(cfg, "cpu")
    model.init_weights(11)
    for plan in stage_plans(cfg, ParallelConfig(pp=3)):
        stage = build_stage_module(build_model(cfg, "meta"), plan)
        stage.to_empty(device="cpu")
        stage.init_weights(11)
        for key, value in stage.state_dict().items():
            torch.testing.assert_close(value, model.state_dict()[key], rtol=0, atol=0, msg=key)


def test_classification_models_are_refused():
    cfg = load_model_config("gpt_tiny", {"num_labels": 3})
    plan = stage_plans(cfg, ParallelConfig(pp=2))[0]
    with pytest.raises(ConfigError, match="num_labels"):
        build_stage_module(build_model(cfg, "meta"), plan)


def test_xlnet_pipeline_with_segment_memory_is_refused_in_one_line():
    overrides = ["model=xlnet_tiny", "data=xlnet_plm", "parallel.pp=2", "launcher.nproc_per_node=2",
                 "trainer.global_batch=4", "trainer.micro_batch=1"]
    validate(compose_config(overrides))  # memory off: accepted
    with pytest.raises(ConfigError, match="^model.mem_len=8: pipeline stages carry no segment memory") as error:
        validate(compose_config(overrides + ["model.mem_len=8"]))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("fields,n_micro,message", [
    (dict(pp=2, pp_virtual=2, pp_schedule="1f1b"), 4, "one stage per rank"),
    (dict(pp=2, pp_virtual=1, pp_schedule="zbv"), 4, "exactly 2 virtual stages"),
    (dict(pp=4, pp_schedule="1f1b"), 3, "at least parallel.pp=4 micro-batches"),
    (dict(pp=2, pp_virtual=2, pp_schedule="dualpipev"), 3, "at least as many micro-batches as stages \\(4\\)"),
    (dict(pp=2, pp_virtual=2, pp_schedule="interleaved_1f1b"), 5, "multiple of its 2 rounds"),
])
def test_schedule_rules_are_config_errors(fields, n_micro, message):
    with pytest.raises(ConfigError, match=message):
        validate_schedule(ParallelConfig(**fields), n_micro)


def test_schedule_rules_accept_valid_layouts():
    validate_schedule(ParallelConfig(pp=2, pp_virtual=2, pp_schedule="dualpipev"), 4)
    validate_schedule(ParallelConfig(pp=2, pp_virtual=2, pp_schedule="interleaved_1f1b"), 6)
    validate_schedule(ParallelConfig(pp=4, pp_schedule="gpipe"), 1)


def test_microbatches_come_from_the_batch_config():
    assert n_microbatches(TrainerConfig(global_batch=32, micro_batch=2), dp_size=4) == 4
    with pytest.raises(ConfigError, match="global_batch"):
        n_microbatches(TrainerConfig(global_batch=32, micro_batch=3), dp_size=2)


def test_pipeline_model_keeps_the_whole_models_names_over_virtual_stages():
    from scaletrain.parallel.pipeline import PipelineModel, split_model

    cfg = load_model_config("bart_tiny")
    parallel = ParallelConfig(pp=2, pp_virtual=2, pp_schedule="zbv")  # rank 0: stages 0 and 3 (first, last)
    model = build_model(cfg, "cpu")
    model.init_weights(5)
    view = PipelineModel(split_model(build_model(cfg, "meta"), cfg, parallel, pp_rank=0))
    view.to_empty(device="cpu")
    view.init_weights(5)
    view.to(torch.float64)
    reference = model.state_dict()
    assert set(view.state_dict()) <= set(reference)
    assert {"tok_embeddings.weight", "lm_head.weight", "final_logits_bias", "encoder.layers.0.attn.q_proj.weight",
            "decoder.layers.1.mlp.fc_out.weight"} <= set(view.state_dict())
    for key, value in view.state_dict().items():
        torch.testing.assert_close(value, reference[key].double(), rtol=0, atol=0, msg=key)
    last = view.stages[1]
    # the root buffer moved by to_empty()/to() on the view is the one the last stage's forward reads
    assert last.final_logits_bias is view.final_logits_bias and last.final_logits_bias.dtype == torch.float64
    with pytest.raises(RuntimeError, match="schedule"):
        view(torch.zeros(1, 1, dtype=torch.long))
