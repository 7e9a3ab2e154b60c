"""parallel.engine=deepspeed config (issue 19, item 1): DeepSpeed's config is built from ours, a user's
ds.json is merged in, and anything that contradicts our config, or that the engine cannot run, is one line."""

import json
import subprocess
import sys

import pytest
import torch

from scaletrain.configs.store import compose_config
from scaletrain.errors import ConfigError
from scaletrain.parallel.deepspeed import deepspeed_config, size_nvme_buffers
from scaletrain.train.main import validate

BASE = ["parallel.engine=deepspeed", "parallel.zero=2", "trainer.global_batch=16", "trainer.micro_batch=2",
        "trainer.grad_clip=0.7"]


def _error(overrides) -> str:
    with pytest.raises(ConfigError) as error:
        validate(compose_config(overrides))
    assert "\n" not in str(error.value)
    return str(error.value)


def _ds_json(tmp_path, content) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(content))
    return f"parallel.deepspeed_config={path}"


def test_built_from_our_config_with_accumulation_for_the_dp_size():
    config = deepspeed_config(compose_config(BASE), dp_size=2)
    assert config["train_batch_size"] == 16 and config["train_micro_batch_size_per_gpu"] == 2
    assert config["gradient_accumulation_steps"] == 4  # 16 / (2 x 2)
    assert config["gradient_clipping"] == 0.7
    assert config["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "none"}}
    assert config["fp16"] == {"enabled": False} and config["bf16"] == {"enabled": False}
    assert "scheduler" not in config and "optimizer" not in config  # ours drive both engines


def test_no_clipping_is_zero_for_deepspeed():
    config = deepspeed_config(compose_config(BASE + ["trainer.grad_clip=0"]), dp_size=1)
    assert config["gradient_clipping"] == 0.0


def test_a_users_file_is_merged_and_auto_takes_ours(tmp_path):
    user = {"train_batch_size": "auto", "gradient_clipping": 0.7, "communication_data_type": "fp32",
            "zero_optimization": {"stage": 2, "overlap_comm": False, "reduce_bucket_size": 1000}}
    cfg = compose_config(BASE + [_ds_json(tmp_path, user)])
    validate(cfg)
    config = deepspeed_config(cfg, dp_size=1)
    assert config["train_batch_size"] == 16 and config["communication_data_type"] == "fp32"
    assert config["zero_optimization"]["overlap_comm"] is False
    assert config["zero_optimization"]["reduce_bucket_size"] == 1000 and config["zero_optimization"]["stage"] == 2


@pytest.mark.parametrize("user, named", [
    ({"zero_optimization": {"stage": 3}}, ["zero_optimization.stage=3", "parallel.zero", "gives 2"]),
    ({"gradient_clipping": 1.0}, ["gradient_clipping=1.0", "trainer.grad_clip", "gives 0.7"]),
    ({"train_micro_batch_size_per_gpu": 4}, ["train_micro_batch_size_per_gpu=4", "trainer.micro_batch", "gives 2"]),
    ({"bf16": {"enabled": True}}, ["bf16.enabled=true", "precision", "gives false"]),
    ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}},
     ["offload_optimizer.device=\"cpu\"", "parallel.offload", "gives \"none\""]),
    ({"scheduler": {"type": "WarmupLR"}}, ["\"scheduler\"", "optim.schedule"]),
    ({"optimizer": {"type": "Adam"}}, ["\"optimizer\"", "optim.*"]),
])
def test_a_contradicting_key_is_one_line_naming_both_values(tmp_path, user, named):
    message = _error(BASE + [_ds_json(tmp_path, user)])
    for part in named:
        assert part in message


def test_unreadable_user_file(tmp_path):
    (tmp_path / "ds.json").write_text("{not json")
    assert "cannot be read as JSON" in _error(BASE + [f"parallel.deepspeed_config={tmp_path / 'ds.json'}"])
    assert "is not a file" in _error(BASE + [f"parallel.deepspeed_config={tmp_path / 'missing.json'}"])


@pytest.mark.parametrize("overrides, named", [
    (["parallel.zero=0"], "parallel.zero=1|2|3"),
    (["parallel.tp=2"], "parallel.tp=1"),
    (["parallel.pp=2"], "parallel.pp=1"),
    (["parallel.dp_replicate=2"], "parallel.dp_replicate=1"),
    (["parallel.offload=nvme", "parallel.zero=3"], "parallel.offload_dir"),
    (["parallel.offload=nvme", "parallel.offload_dir=/tmp"], "needs ZeRO-3"),
    (["model=xlnet_tiny"], "family xlnet"),
    (["trainer.activation_checkpointing=full"], "activation_checkpointing=full"),
    (["dry_run.world_size=8", "parallel.dp_shard=8"], "dry-run with parallel.engine=native"),
])
def test_what_the_engine_does_not_run_is_refused(overrides, named):
    assert named in _error(BASE + overrides)


@pytest.mark.parametrize("overrides, named", [
    (["parallel.offload=nvme"], "parallel.engine=deepspeed"),
    (["parallel.offload_dir=/tmp"], "offload_dir"),
    (["parallel.deepspeed_config=ds.json"], "parallel.engine=deepspeed"),
    (["parallel.engine=megatron"], "parallel.engine='megatron' is not one of native, deepspeed"),
])
def test_deepspeed_options_under_the_native_engine_are_refused(overrides, named):
    assert named in _error(overrides)


def test_without_deepspeed_installed_one_line_names_the_extra(tmp_path):
    # sys.modules[name] = None is how Python marks a module as absent: find_spec gives None, import fails
    code = ("import sys; sys.modules['deepspeed'] = None; from scaletrain.cli import main; "
            f"sys.exit(main(['train', 'parallel.engine=deepspeed', 'parallel.zero=2', 'hydra.run.dir={tmp_path}']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "pip install -e '.[deepspeed]'" in lines[0], result.stderr


def test_nvme_offload_without_libaio_is_one_line(monkeypatch, tmp_path):
    # the probe compiles against libaio; a machine without it (no libaio-dev) answers False
    from deepspeed.ops.op_builder import AsyncIOBuilder

    monkeypatch.setattr(AsyncIOBuilder, "is_compatible", lambda self, verbose=False: False)
    message = _error(BASE + ["parallel.offload=nvme", "parallel.zero=3", f"parallel.offload_dir={tmp_path}"])
    assert "apt-get install libaio-dev" in message and "parallel.offload=cpu" in message


class _TwoBigWeights(torch.nn.Module):
    """A module that fetches two swapped parameters at once (each above DeepSpeed's persistence threshold of
    1e5 elements) and a small one that stays whole in memory."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Parameter(torch.zeros(400, 300)), torch.nn.Parameter(torch.zeros(100, 1001))
        self.small = torch.nn.Parameter(torch.zeros(1000))
        self.proj = torch.nn.Linear(50, 200)  # 10_000 elements: persistent


def test_nvme_buffers_are_sized_to_the_largest_partition_and_one_modules_fetch():
    config = {"zero_optimization": {"offload_param": {}}}
    size_nvme_buffers(config, _TwoBigWeights(), dp_size=2)
    zero = config["zero_optimization"]
    assert zero["offload_param"] == {"buffer_size": 120_000 // 2 + 4096, "buffer_count": 2 + 1, "max_in_cpu": 0}
    assert zero["reduce_bucket_size"] == 120_000 // 2 + 4096 and zero["sub_group_size"] == 2**18
    assert zero["stage3_prefetch_bucket_size"] == zero["stage3_max_reuse_distance"] == 0


def test_a_users_nvme_buffer_settings_win():
    config = {"zero_optimization": {"offload_param": {"buffer_count": 7}, "stage3_param_persistence_threshold": 10**6,
                                    "sub_group_size": 10**9}}
    size_nvme_buffers(config, _TwoBigWeights(), dp_size=2)
    zero = config["zero_optimization"]
    assert zero["offload_param"]["buffer_count"] == 7 and zero["sub_group_size"] == 10**9
    # a higher persistence threshold keeps both weights whole in memory: one buffer is left
    config = {"zero_optimization": {"offload_param": {}, "stage3_param_persistence_threshold": 10**6}}
    size_nvme_buffers(config, _TwoBigWeights(), dp_size=2)
    assert config["zero_optimization"]["offload_param"]["buffer_count"] == 1
