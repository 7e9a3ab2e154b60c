"""Launch decisions that need no cluster: who trains, the Slurm -> standard variable mapping, time limits,
the rendered sbatch script, the torchrun command and the cluster presets."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from scaletrain.configs import CONFIG_DIR, available
from scaletrain.configs.schema import ClusterConfig, LaunchConfig, TrainConfig
from scaletrain.configs.store import compose_config
from scaletrain.errors import ConfigError
from scaletrain.launch import env, maybe_launch, planned_world_size
from scaletrain.launch.command import train_argv
from scaletrain.launch.local import torchrun_command
from scaletrain.launch.slurm import check_request, parse_time_limit, render_sbatch

SLURM_TASK = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_NTASKS": "16",
              "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_STEP_NODELIST": "gpu[07-08]"}


@pytest.fixture
def clean_environ(monkeypatch):
    """A private copy of the environment without launch variables: maybe_launch writes RANK etc. into it,
    and none of that may leak into later tests (or the processes they start)."""
    launch_variables = {*env.STANDARD_VARIABLES, *SLURM_TASK}
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k not in launch_variables})
    return monkeypatch


def test_slurm_task_maps_onto_the_standard_variables():
    first_of = {}
    mapped = env.torch_env_from_slurm(SLURM_TASK, resolve_first_host=lambda nodes: first_of.setdefault(nodes, "gpu07"))
    assert mapped == {"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07",
                      "MASTER_PORT": str(15000 + 4242 % 15000)}
    assert first_of == {"gpu[07-08]": "gpu07"}
    # the port follows the job id (stable across a requeue) and stays below the ephemeral range
    ports = {env.master_port_for_job(str(job)) for job in range(100000, 100500)}
    assert len(ports) == 500 and max(ports) < 32768


def test_inside_an_srun_task_this_process_trains_as_its_rank(clean_environ):
    clean_environ.setattr(env, "first_hostname", lambda nodes: "gpu07")
    for name, value in SLURM_TASK.items():
        clean_environ.setenv(name, value)
    # whatever the launcher says, a task of a multi-task step is one rank (submitit's multirun jobs included)
    assert maybe_launch(TrainConfig(launcher=LaunchConfig(name="local", nproc_per_node=8)), []) is None
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["MASTER_ADDR"]) == ("5", "16", "gpu07")


def test_planned_world_size_is_known_before_any_mapping(clean_environ):
    two_gpu_nodes = TrainConfig(launcher=LaunchConfig(name="slurm", nodes=2, gpus_per_node=8))
    assert planned_world_size(two_gpu_nodes) == 16
    assert planned_world_size(TrainConfig(launcher=LaunchConfig(nproc_per_node=4))) == 4
    for name, value in SLURM_TASK.items():  # a task of a 16-task submitit job, before maybe_launch maps it
        clean_environ.setenv(name, value)
    assert planned_world_size(TrainConfig()) == 16


def test_a_worker_started_by_a_launcher_never_launches_again(clean_environ):
    clean_environ.setenv("RANK", "1")
    clean_environ.setenv("WORLD_SIZE", "4")
    for name in ("local", "torchrun", "slurm"):
        assert maybe_launch(TrainConfig(launcher=LaunchConfig(name=name, nproc_per_node=4)), []) is None


def test_a_single_process_run_trains_here(clean_environ):
    assert maybe_launch(TrainConfig(), ["trainer.max_steps=3"]) is None
    assert "RANK" not in os.environ


def test_local_world_size_is_checked_before_any_worker_starts(clean_environ):
    cfg = TrainConfig(launcher=LaunchConfig(nproc_per_node=3))  # global_batch 16 / (micro 8 x dp 3)
    with pytest.raises(ConfigError, match="trainer.global_batch=16 is not divisible"):
        maybe_launch(cfg, [])


@pytest.mark.parametrize("text, seconds", [("45", 2700), ("45:30", 2730), ("01:00:00", 3600), ("2-0", 172800),
                                           ("1-02:03", 93780), ("1-02:03:04", 93784)])
def test_slurm_time_formats(text, seconds):
    assert parse_time_limit(text) == seconds


def test_rendered_script_for_gpu_nodes_is_valid_bash(tmp_path):
    launcher = LaunchConfig(name="slurm", nodes=2, gpus_per_node=8, cpus_per_task=10, partition="gpu",
                            account="lm", time="2-00:00:00", signal_grace_s=300,
                            extra_sbatch=["--qos=high", "--exclusive"])
    script = render_sbatch(launcher, train_argv(["model=gpt3_xl", "data.corpus=/data/my corpus"], "/runs/x"), "/runs/x")
    lines = script.splitlines()
    for directive in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=10",
                      "--partition=gpu", "--account=lm", "--time=2-00:00:00", "--signal=USR1@300", "--requeue",
                      "--output=/runs/x/slurm/%j.out", "--qos=high", "--exclusive"):
        assert f"#SBATCH {directive}" in lines
    srun = next(line for line in lines if line.startswith("srun "))
    assert shlex.split(srun)[-4:] == ["data.corpus=/data/my corpus", "hydra.run.dir=/runs/x",
                                      "hydra.output_subdir=null", "&"]
    (tmp_path / "job.sbatch").write_text(script)
    subprocess.run(["bash", "-n", str(tmp_path / "job.sbatch")], check=True)


def test_without_requeue_the_script_never_requeues():
    script = render_sbatch(LaunchConfig(name="slurm", requeue=False), ["true"], "/runs/x")
    assert "#SBATCH --no-requeue" in script and "scontrol requeue" not in script


def test_torchrun_command_starts_the_same_workers():
    one_node = torchrun_command(LaunchConfig(name="torchrun", nproc_per_node=4, max_restarts=2),
                                ["trainer.max_steps=5", "-m"], "/runs/x")
    assert shlex.split(one_node) == ["torchrun", "--standalone", "--nproc-per-node=4", "--max-restarts=2", "-m",
                                     "scaletrain.cli", "train", "trainer.max_steps=5", "hydra.run.dir=/runs/x",
                                     "hydra.output_subdir=null"]
    two_nodes = torchrun_command(LaunchConfig(name="torchrun", nodes=2, nproc_per_node=8), [], "/runs/x")
    assert "--nnodes=2" in two_nodes and "--rdzv-endpoint=$MASTER_ADDR:29500" in two_nodes


def load_cluster(name: str) -> ClusterConfig:
    preset = OmegaConf.load(CONFIG_DIR / "cluster" / f"{name}.yaml")
    merged = OmegaConf.merge(OmegaConf.structured(ClusterConfig), preset)
    return OmegaConf.to_object(merged)


def test_cluster_presets_carry_the_data_sheet_peaks():
    assert {"cpu_local", "v100_dgx1", "a100_80g", "h100"} <= set(available("cluster"))
    v100, a100, h100 = load_cluster("v100_dgx1"), load_cluster("a100_80g"), load_cluster("h100")
    assert (v100.gpus_per_node, v100.memory_gb, v100.default_precision) == (8, 32, "fp16")
    assert v100.peak_tflops("fp16") == 125.0 and v100.peak_tflops("bf16") == 0.0  # V100 has no bf16
    assert a100.peak_tflops("bf16") == 312.0 and a100.memory_gb == 80
    assert h100.peak_tflops("bf16") == 989.0 and h100.default_precision == "bf16"
    for preset in (v100, a100, h100):
        assert preset.device == "cuda" and preset.intra_node_gbps > preset.inter_node_gbps > 0
        assert preset.peak_tflops(preset.default_precision) > preset.peak_tflops("fp32")
    assert load_cluster("cpu_local").peak_tflops("fp32") > 0


def test_a_preset_whose_default_precision_has_no_peak_is_refused():
    with pytest.raises(ConfigError, match="default_precision=bf16 has no peak FLOP/s"):
        ClusterConfig(name="v100_bad", device="cuda", peak_tflops_fp16=125.0, default_precision="bf16")


def test_the_readme_gpt3_xl_submission_passes_every_config_check():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = next(b for b in readme.split("```bash")[1:] if "model=gpt3_xl" in b).split("```")[0]
    argv = shlex.split(block.replace("\\\n", " "))
    cfg = compose_config(argv[argv.index("train") + 1:])
    check_request(cfg)  # world size, batch divisibility, time limit vs checkpoint interval
    script = render_sbatch(cfg.launcher, ["true"], "/runs/x").splitlines()
    assert "#SBATCH --nodes=2" in script and "#SBATCH --gpus-per-node=8" in script
    assert "#SBATCH --ntasks-per-node=8" in script and cfg.cluster.peak_tflops(cfg.precision) == 312.0
