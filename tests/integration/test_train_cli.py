"""`scaletrain train` end to end in subprocesses: outputs of a run, config errors, stop signals."""

import json
import signal
import subprocess
import time

import pytest

from scaletrain.checkpoint.manager import read_manifest, verify
from scaletrain.cli import main
from scaletrain.errors import REQUEUE_EXIT_CODE, USER_ERROR_EXIT_CODE
from train_utils import cli_command, cli_env, run_cli, tiny_overrides

METRIC_KEYS = {"loss", "ppl", "lr", "grad_norm", "loss_scale", "tokens_per_s", "tflops", "mfu", "peak_memory_gb",
               "skipped_steps", "tokens"}


def test_a_run_leaves_metrics_checkpoint_config_sample_and_wandb_files(tmp_path):
    overrides = tiny_overrides("gpt", "trainer.max_steps=30", "trainer.eval_every=15", "trainer.sample_tokens=8",
                               "checkpoint.every=15", "logger=wandb", "optim.lr=1e-2")
    result = run_cli(tmp_path, overrides, WANDB_MODE="offline")
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 31)) and METRIC_KEYS <= set(steps[-1])
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.5  # it learns
    evals = [r for r in records if "val_ppl" in r]
    assert [r["step"] for r in evals] == [15, 30] and evals[1]["val_loss"] < evals[0]["val_loss"]
    final = json.loads((tmp_path / "final_metrics.json").read_text())
    assert final["step"] == 30 and final["val_ppl"] == evals[1]["val_ppl"]
    assert verify(tmp_path / "checkpoints" / "step-000030") is None
    assert read_manifest(tmp_path / "checkpoints" / "step-000030")["tokens"] == 30 * 4 * 32
    assert "model:" in (tmp_path / "config.yaml").read_text() and "gpt_tiny" in (tmp_path / "config.yaml").read_text()
    assert "sample: " in result.stdout + result.stderr
    assert list((tmp_path / "wandb").glob("offline-run-*"))


@pytest.mark.parametrize("args,message", [
    (["trainer.global_batch=5"], "trainer.global_batch=5 is not divisible by trainer.micro_batch x dp"),
    (["model=no_such_model"], "available model presets"),
    (["trainer.no_such_field=1"], "no_such_field"),
    (["optim.schedule=cubic"], "optim.schedule='cubic' is not one of"),
    (["data.objective=mlm"], "data.objective=mlm does not train a gpt model"),
    (["-m", "optim.lr=1e-3,-1"], "optim.lr=-1.0 must be positive (sweep point"),
])
def test_config_errors_are_one_line_before_any_work(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    assert main(["train", *tiny_overrides("gpt"), *args]) == USER_ERROR_EXIT_CODE
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err
    assert not list(tmp_path.iterdir())  # no run folder: nothing started


def test_the_real_command_exits_2_with_one_line():
    result = subprocess.run(["scaletrain", "train", "trainer.seq_len=0"], capture_output=True, text=True,
                            timeout=120, env=cli_env())
    assert result.returncode == USER_ERROR_EXIT_CODE
    assert result.stderr.strip().count("\n") == 0 and "trainer.seq_len=0 must be positive" in result.stderr


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM])
def test_stop_signal_finishes_the_step_saves_and_asks_for_requeue(tmp_path, signum):
    overrides = tiny_overrides("gpt", "trainer.max_steps=100000", "checkpoint.every=0")
    process = subprocess.Popen(cli_command(tmp_path, overrides), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=cli_env())
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not metrics.exists() or metrics.read_text().count("\n") < 3):
        time.sleep(0.2)
    process.send_signal(signum)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == REQUEUE_EXIT_CODE, output[-3000:]
    last_step = json.loads(metrics.read_text().splitlines()[-1])["step"]
    checkpoints = list((tmp_path / "checkpoints").iterdir())
    assert [p.name for p in checkpoints] == [f"step-{last_step:06d}"] and verify(checkpoints[0]) is None
    assert f"stopped by {signum.name} at step {last_step}" in output


def test_paths_are_relative_to_where_the_command_was_typed_not_to_the_run_folder(tmp_path, monkeypatch):
    from scaletrain.train.main import absolute_paths

    assert absolute_paths(["data.corpus=texts", "data.corpus=builtin", "model.init_from=/abs/run", "-m",
                           "data.prepared=a,/b", "+data.tokenizer=tok.json", "resume=step-000010", "seed=3"], "/w") == [
        "data.corpus=/w/texts", "data.corpus=builtin", "model.init_from=/abs/run", "-m", "data.prepared=/w/a,/b",
        "+data.tokenizer=/w/tok.json", "resume=step-000010", "seed=3"]
    assert absolute_paths(["parallel.deepspeed_config=ds.json", "parallel.offload_dir=nvme/swap"], "/w") == [
        "parallel.deepspeed_config=/w/ds.json", "parallel.offload_dir=/w/nvme/swap"]
    # end to end: Hydra runs the job inside the run folder, where "texts" does not exist
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("\n\n".join(f"document {i} about streams and shards" for i in range(40)))
    monkeypatch.chdir(tmp_path)
    overrides = [o for o in tiny_overrides("gpt", "trainer.max_steps=1") if not o.startswith("data.corpus")]
    assert main(["train", *overrides, "data.corpus=texts", "data.cache_dir=cache", "hydra.run.dir=run"]) == 0
    assert (tmp_path / "run" / "checkpoints" / "step-000001").is_dir() and (tmp_path / "cache").is_dir()
    assert not (tmp_path / "run" / "cache").exists()
