"""parallel.engine=deepspeed with bf16 / fp16 (DeepSpeed's dynamic loss scaler) and with ZeRO-Offload to the
host (offload=cpu, DeepSpeed's CPU Adam) or ZeRO-Infinity to NVMe (offload=nvme, offload_dir), on 2 gloo
ranks: each against the native engine at the same ZeRO stage and precision, and their checkpoints resumed
by the native engine (the fp16 loss scale included)."""

import pytest

from scaletrain.errors import REQUEUE_EXIT_CODE
from scaletrain.parallel.multiprocess import run_on_ranks
from train_utils import make_trainer, stop_after, tiny_overrides

EXTRA = ["trainer.max_steps=4", "trainer.micro_batch=1", "parallel.dp_shard=2", "checkpoint.save_final=false"]


def _run(run_dir, overrides, stop=None):
    trainer = make_trainer(run_dir, tiny_overrides("gpt", *EXTRA, *overrides))
    if stop:
        stop_after(trainer, stop)
    code = trainer.train()
    return {"losses": trainer.losses, "skipped": trainer.state.skipped_steps, "code": code,
            "loss_scale": trainer.last_record["loss_scale"], "step": trainer.state.step}


def _pairs(rank, world_size, tmp_path, cases):
    results = {}
    for name, overrides in cases.items():
        results[name] = _run(tmp_path / name, overrides)
        # what ZeRO-Infinity swapped out, listed while that engine still holds its files
        results[name]["swapped"] = sorted(p.name for p in (tmp_path / "nvme").rglob("*") if p.is_file())
    return results


def test_bf16_fp16_and_offload_match_the_native_engine(tmp_path):
    nvme = f"parallel.offload_dir={tmp_path / 'nvme'}"
    pairs = {  # name: (DeepSpeed overrides, native overrides)
        "bf16_zero2": (["parallel.zero=2", "precision=bf16"], ["parallel.zero=2", "precision=bf16"]),
        "fp16_zero3": (["parallel.zero=3", "precision=fp16"], ["parallel.zero=3", "precision=fp16"]),
        "cpu_zero2": (["parallel.zero=2", "parallel.offload=cpu"], ["parallel.zero=2", "parallel.offload=cpu"]),
        "cpu_zero3": (["parallel.zero=3", "parallel.offload=cpu"], ["parallel.zero=3", "parallel.offload=cpu"]),
        # DeepSpeed swaps only tensors of >= 1 MiB: a 16384 x 32 token table, 1 MiB per rank's partition
        "nvme_zero3": (["parallel.zero=3", "parallel.offload=nvme", nvme, "model.vocab_size=16384"],
                       ["parallel.zero=3", "model.vocab_size=16384"]),
    }
    cases = {}
    for name, (ours, native) in pairs.items():
        cases[f"ds_{name}"] = ["parallel.engine=deepspeed", *ours]
        cases[f"native_{name}"] = native
    results = run_on_ranks(_pairs, 2, tmp_path, cases)[0]
    assert results["ds_nvme_zero3"]["swapped"], "nothing was swapped to parallel.offload_dir"
    for name in pairs:
        ds, native = results[f"ds_{name}"], results[f"native_{name}"]
        # AdamW normalises each update (the default optimizer here): the native AdamW layout bound; bf16/fp16
        # round differently (DeepSpeed computes in half-precision weights, native autocasts fp32 ones)
        tolerance = 1e-4 if name.startswith(("cpu", "nvme")) else 2e-3
        assert ds["losses"] == pytest.approx(native["losses"], rel=tolerance), name
        assert ds["skipped"] == native["skipped"] == 0, name
    assert results["ds_fp16_zero3"]["loss_scale"] == results["native_fp16_zero3"]["loss_scale"] == 2.0**16


def _overflow_then_resume(rank, world_size, tmp_path):
    """fp16 from a scale so high that the first updates overflow: DeepSpeed skips them and halves the scale;
    stopped at step 3 and resumed, the scale and the losses continue as in the run that never stopped."""
    fp16 = ["parallel.engine=deepspeed", "parallel.zero=2", "precision=fp16", f"trainer.loss_scale_init={2 ** 40}"]
    straight = _run(tmp_path / "straight", fp16)
    stopped = _run(tmp_path / "stopped", fp16, stop=3)
    checkpoint = tmp_path / "stopped" / "checkpoints" / "step-000003"
    resumed = _run(tmp_path / "resumed", fp16 + [f"resume={checkpoint}"])
    native = _run(tmp_path / "native", ["parallel.zero=2", "precision=fp16", f"resume={checkpoint}"])
    return straight, stopped, resumed, native


def test_fp16_overflows_skip_updates_and_the_loss_scale_resumes(tmp_path):
    straight, stopped, resumed, native = run_on_ranks(_overflow_then_resume, 2, tmp_path)[0]
    assert straight["skipped"] > 0 and straight["loss_scale"] == 2.0 ** (40 - straight["skipped"])
    assert stopped["code"] == REQUEUE_EXIT_CODE and resumed["step"] == 4
    assert resumed["losses"] == pytest.approx(straight["losses"][3:], rel=1e-6)
    assert resumed["loss_scale"] == straight["loss_scale"]
    assert native["loss_scale"] <= stopped["loss_scale"]  # the native scaler read DeepSpeed's scale


def _offloaded_checkpoints(rank, world_size, tmp_path):
    big = ["model.vocab_size=16384"]  # NVMe swaps tensors of >= 1 MiB only
    nvme = ["parallel.engine=deepspeed", "parallel.zero=3", "parallel.offload=nvme",
            f"parallel.offload_dir={tmp_path / 'nvme'}", *big]
    cpu_adam = ["parallel.engine=deepspeed", "parallel.zero=2", "parallel.offload=cpu", *big]
    native = ["parallel.zero=3", *big]
    straight = _run(tmp_path / "straight", native)
    runs = {}
    for name, overrides in (("nvme", nvme), ("cpu_adam", cpu_adam), ("native", native)):
        assert _run(tmp_path / name, overrides, stop=2)["code"] == REQUEUE_EXIT_CODE
    step = "checkpoints/step-000002"
    runs["nvme->native"] = _run(tmp_path / "a", native + [f"resume={tmp_path / 'nvme' / step}"])
    runs["cpu_adam->native"] = _run(tmp_path / "b", native + [f"resume={tmp_path / 'cpu_adam' / step}"])
    runs["native->nvme"] = _run(tmp_path / "c", nvme + [f"resume={tmp_path / 'native' / step}"])
    return straight, runs




def test_offloaded_deepspeed_checkpoints_resume_natively_and_back(tmp_path):
    straight, runs = run_on_ranks(_offloaded_checkpoints, 2, tmp_path)[0]
    for what, run in runs.items():
        assert run["step"] == 4, what
        assert run["losses"] == pytest.approx(straight["losses"][2:], rel=1e-4), what
