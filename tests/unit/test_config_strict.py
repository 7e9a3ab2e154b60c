"""Strict configs (issue 16, items 7, 8, 13, 14): unknown keys anywhere are errors naming the nearest valid
key, every numeric field is range-checked, config-only rules fire before anything starts, and a preset
picked on the command line wins over an experiment file."""

import dataclasses
import typing

import pytest

from scaletrain.configs import CONFIG_DIR, schema
from scaletrain.configs.store import compose_config
from scaletrain.errors import ConfigError
from scaletrain.train.main import validate


def _error(overrides) -> str:
    with pytest.raises(ConfigError) as error:
        validate(compose_config(overrides))
    message = str(error.value)
    assert "\n" not in message
    return message


def _config_classes():
    seen, todo = [], [schema.TrainConfig]
    while todo:
        cls = todo.pop()
        seen.append(cls)
        todo += [t for t in typing.get_type_hints(cls).values() if dataclasses.is_dataclass(t) and t not in seen]
    return seen


@pytest.mark.parametrize("cls", _config_classes(), ids=lambda c: c.__name__)
def test_every_numeric_field_declares_its_range(cls):
    hints = typing.get_type_hints(cls)
    numeric = {f.name for f in dataclasses.fields(cls)
               if {int, float} & set(typing.get_args(hints[f.name]) or (hints[f.name],))
               and hints[f.name] is not bool and typing.get_origin(hints[f.name]) not in (dict, list)}
    assert numeric <= set(cls.RANGES), f"{cls.__name__}: add {sorted(numeric - set(cls.RANGES))} to RANGES"
    assert set(cls.RANGES) <= {f.name for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("overrides, message", [
    (["+init_from=foo"], "unknown config key 'init_from'"),  # accepted silently before: a stray attribute
    (["+model.vocab=300"], "unknown config key 'model.vocab'; did you mean model.vocab_size?"),
    (["+log_every=1"], "did you mean trainer.log_every?"),
    (["trainer.log_evry=3"], "unknown config key 'trainer.log_evry'; did you mean trainer.log_every?"),
    (["++trainer.eval_batch=3"], "did you mean trainer.eval_batches?"),
])
def test_unknown_keys_are_errors_naming_the_nearest_key(overrides, message):
    assert message in _error(overrides)


def test_unknown_keys_inside_experiment_and_preset_files(tmp_path):
    files = [CONFIG_DIR / "experiment" / "zz_test_typo.yaml", CONFIG_DIR / "model" / "zz_test_typo.yaml"]
    files[0].write_text("# @package _global_\ntrainer:\n  log_evry: 3\n")
    files[1].write_text("name: zz_test_typo\nfamily: gpt\nn_head: 4\n")
    try:
        assert _error(["experiment=zz_test_typo"]) == ("configs/experiment/zz_test_typo.yaml: unknown config key "
                                                       "'trainer.log_evry'; did you mean trainer.log_every?")
        assert "'model.n_head'; did you mean model.n_heads?" in _error(["model=zz_test_typo"])
    finally:
        for path in files:
            path.unlink()


def test_free_form_fields_take_any_key():
    assert compose_config(["+model.extra.t5_version=1.1"]).model.extra == {"t5_version": 1.1}


@pytest.mark.parametrize("overrides, message", [
    (["trainer.log_every=0"], "trainer.log_every=0 must be positive"),  # was a ZeroDivisionError mid-run
    (["trainer.eval_batches=0"], "trainer.eval_batches=0 must be positive"),  # was NaN validation losses
    (["optim.lr=nan"], "optim.lr=nan must be positive"),
    (["model.dropout=1.0"], "model.dropout=1.0 must be in [0, 1)"),
    (["optim.beta2=1"], "optim.beta2=1.0 must be in [0, 1)"),
    (["trainer.grad_clip=-1"], "trainer.grad_clip=-1.0 must be >= 0"),
    (["seed=-1"], "seed=-1 must be in [0, 4294967295]"),
    (["launcher.signal_grace_s=70000"], "launcher.signal_grace_s=70000 must be in [0, 65535]"),
    (["cluster.inter_node_gbps=0"], "cluster.inter_node_gbps=0.0 must be positive"),
])
def test_numeric_fields_are_range_checked(overrides, message):
    assert message in _error(overrides)


def test_type_errors_keep_the_reason_and_malformed_overrides_are_one_line():
    assert _error(["trainer.log_every=abc"]) == ("bad override trainer.log_every=abc: Value 'abc' of type 'str' "
                                                 "could not be converted to Integer")
    assert "malformed override '=3' (no key before '=')" in _error(["=3"])  # was a ValueError traceback
    assert "malformed override 'foo' (missing EQUAL" in _error(["foo"])
    assert "model=3: model takes a preset name; available model presets: bart_base" in _error(["model=3"])


def test_config_only_rules_fire_before_anything_starts():
    # Found after two workers had launched (and printed twice) before.
    message = _error(["parallel.pp=2", "launcher.nproc_per_node=2", "parallel.pp_split=[5]"])
    assert "parallel.pp_split=[5] must list 1 strictly increasing first-layer indices in (0, 4)" in message
    # Found after ~25 s of tokenizer training before.
    assert "data.tokenizer_vocab=300 is too small for a byte_bpe tokenizer; use at least 512" in _error(
        ["data.tokenizer_vocab=300", "model.vocab_size=512"])
    compose_config(["data.tokenizer_vocab=300", "data.prepared=/somewhere"])  # no tokenizer is trained


def test_a_model_on_the_command_line_wins_over_the_experiment():
    # Trained BERT-tiny with the experiment's 256-wide sizes on top before.
    cfg = compose_config(["experiment=bert_pretrain", "model=bert_tiny"])
    assert dataclasses.asdict(cfg.model) == dataclasses.asdict(compose_config(["model=bert_tiny"]).model)
    assert cfg.data.objective == "mlm" and cfg.data.nsp and cfg.optim.lr == 5e-4  # the rest of the experiment
    assert compose_config(["experiment=bert_pretrain"]).model.d_model == 256


def test_a_group_the_experiment_also_sets_is_a_conflict_naming_both():
    message = _error(["experiment=bert_pretrain", "optim=sgd"])
    assert message.startswith("optim=sgd on the command line conflicts with experiment=bert_pretrain, which sets "
                              "optim.lr, optim.warmup_steps")
    assert compose_config(["experiment=bert_pretrain", "optim.lr=1e-3"]).optim.lr == 1e-3  # keys still win
