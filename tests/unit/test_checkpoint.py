import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from scaletrain.checkpoint.manager import MANIFEST, CheckpointManager, verify
from scaletrain.configs.schema import CheckpointConfig
from scaletrain.errors import CheckpointError
from scaletrain.parallel.multiprocess import run_on_ranks


class Counter:
    def __init__(self, value=0):
        self.value = value

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


def _model(width=8, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(width, width), nn.LayerNorm(width), nn.Linear(width, 3))


def _trained(width=8, seed=0, steps=2):
    model = _model(width, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        model(torch.randn(4, width)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_round_trip_restores_model_optimizer_state_and_rng(tmp_path):
    model, optimizer = _trained()
    manager = CheckpointManager(CheckpointConfig(), tmp_path)
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    manager.save(7, model, optimizer, {"counter": Counter(41)}, {"tokens": 1000})
    expected_draws = (random.random(), np.random.rand(), torch.rand(1).item())
    expected_params, expected_optim = _params(model), optimizer.state_dict()

    fresh, fresh_optimizer = _trained(seed=1, steps=1)
    counter = Counter()
    path = manager.latest_complete()
    assert path.name == "step-000007" and not list((tmp_path / "checkpoints").glob(".tmp-*"))
    manifest = manager.load(path, fresh, fresh_optimizer, {"counter": counter})
    assert manifest["step"] == 7 and manifest["tokens"] == 1000 and manifest["complete"]
    assert counter.value == 41
    for key, value in _params(fresh).items():
        assert torch.equal(value, expected_params[key]), key
    loaded_optim = fresh_optimizer.state_dict()
    for index, state in expected_optim["state"].items():
        for name, tensor in state.items():
            assert torch.equal(loaded_optim["state"][index][name], tensor)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected_draws


def test_manifest_lists_every_file_with_size_and_checksum(tmp_path):
    model, optimizer = _trained()
    manager = CheckpointManager(CheckpointConfig(), tmp_path)
    manager.save(1, model, optimizer, {}, {"tokens": 0})
    folder = tmp_path / "checkpoints" / "step-000001"
    files = json.loads((folder / MANIFEST).read_text())["files"]
    on_disk = {p.name for p in folder.iterdir() if p.name != MANIFEST}
    assert set(files) == on_disk and ".metadata" in files and "rng-rank-00000.pt" in files
    assert all(len(entry["sha256"]) == 64 and entry["size"] > 0 for entry in files.values())


@pytest.mark.parametrize("damage", ["truncate", "flip", "drop_manifest", "incomplete"])
def test_latest_skips_damaged_checkpoints_with_a_warning(tmp_path, damage):
    model, optimizer = _trained()
    manager = CheckpointManager(CheckpointConfig(keep=5), tmp_path)
    manager.save(1, model, optimizer, {}, {})
    manager.save(2, model, optimizer, {}, {})
    newest = tmp_path / "checkpoints" / "step-000002"
    shard = next(newest.glob("*.distcp"))
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-10])
    elif damage == "flip":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif damage == "drop_manifest":
        (newest / MANIFEST).unlink()
    else:
        manifest = json.loads((newest / MANIFEST).read_text())
        manifest["complete"] = False
        (newest / MANIFEST).write_text(json.dumps(manifest))
    assert verify(newest) is not None
    with pytest.warns(UserWarning, match="skipping checkpoint .*step-000002"):
        assert manager.latest_complete().name == "step-000001"


def test_retention_keeps_the_last_k_plus_every_mth(tmp_path):
    model, optimizer = _trained()
    manager = CheckpointManager(CheckpointConfig(keep=2, keep_every=4), tmp_path)
    for step in range(1, 10):
        manager.save(step, model, optimizer, {}, {})
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["step-000004", "step-000008", "step-000009"]


def test_async_save_snapshots_the_state_at_the_save_call(tmp_path):
    model, optimizer = _trained(width=64)
    manager = CheckpointManager(CheckpointConfig(async_save=True), tmp_path)
    expected = _params(model)
    manager.save(3, model, optimizer, {"counter": Counter(3)}, {})
    with torch.no_grad():  # the loop goes on while the write is in flight
        for param in model.parameters():
            param.add_(1.0)
    manager.close()
    fresh, fresh_optimizer = _trained(width=64, seed=2)
    manager.load(manager.latest_complete(), fresh, fresh_optimizer, {"counter": Counter()})
    for key, value in _params(fresh).items():
        assert torch.equal(value, expected[key]), key


def test_a_different_architecture_names_the_mismatched_keys_and_shapes(tmp_path):
    model, optimizer = _trained(width=8)
    manager = CheckpointManager(CheckpointConfig(), tmp_path)
    manager.save(1, model, optimizer, {}, {})
    wider = nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16), nn.Linear(16, 3), nn.Linear(3, 3))
    with pytest.raises(CheckpointError) as error:
        manager.load(manager.latest_complete(), wider, torch.optim.AdamW(wider.parameters()), {})
    message = str(error.value)
    assert "unexpected" not in message and "missing: 3.bias, 3.weight" in message
    assert "0.weight [8, 8] in the checkpoint vs [16, 16] in the model" in message


def test_state_of_another_optimizer_is_named_instead_of_a_dcp_key_error(tmp_path):
    model, optimizer = _trained(width=8)
    manager = CheckpointManager(CheckpointConfig(), tmp_path)
    manager.save(1, model, optimizer, {}, {})
    fresh = _model(8, 1)
    with pytest.raises(CheckpointError) as error:  # AdamW saved, SGD with momentum resumes
        manager.load(manager.latest_complete(), fresh, torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9), {})
    message = str(error.value)
    assert "lacks optimizer state" in message and "state.0.weight.momentum_buffer" in message
    assert "resume=none" in message


def test_optimizer_implementation_is_the_live_one_not_the_saved_one(tmp_path):
    model, optimizer = _trained(width=8)  # AdamW, foreach chosen by default on CPU
    manager = CheckpointManager(CheckpointConfig(), tmp_path)
    manager.save(1, model, optimizer, {}, {})
    fresh = _model(8, 1)
    for_loop = torch.optim.AdamW(fresh.parameters(), lr=1e-2, foreach=False)
    manager.load(manager.latest_complete(), fresh, for_loop, {})
    assert all(group["foreach"] is False for group in for_loop.param_groups)
    saved = optimizer.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(for_loop.state_dict()["state"][0]["exp_avg"], saved)


def test_resume_modes(tmp_path):
    model, optimizer = _trained()
    manager = CheckpointManager(CheckpointConfig(), tmp_path)
    assert manager.resolve_resume("auto") is None
    manager.save(2, model, optimizer, {}, {})
    assert manager.resolve_resume("none") is None
    assert manager.resolve_resume("auto").name == "step-000002"
    assert manager.resolve_resume(str(tmp_path)).name == "step-000002"  # a run folder
    with pytest.raises(CheckpointError, match="does not exist"):
        manager.resolve_resume(str(tmp_path / "nowhere"))


def _save_sharded(rank, world_size, run_dir):
    from torch.distributed.fsdp import fully_shard

    model = _model(width=16)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(100 + rank)
    model(torch.randn(4, 16)).square().mean().backward()
    optimizer.step()
    manager = CheckpointManager(CheckpointConfig(), run_dir, rank, world_size)
    manager.save(1, model, optimizer, {"counter": Counter(9)}, {})
    manager.close()
    return {k: v.full_tensor() for k, v in model.state_dict().items()}


def test_a_sharded_two_rank_checkpoint_loads_in_one_process(tmp_path):
    full = run_on_ranks(_save_sharded, 2, str(tmp_path))[0]
    model, optimizer = _trained(width=16, seed=3)
    manager = CheckpointManager(CheckpointConfig(), tmp_path)
    counter = Counter()
    manifest = manager.load(manager.latest_complete(), model, optimizer, {"counter": counter})
    assert manifest["world_size"] == 2 and counter.value == 9
    for key, value in _params(model).items():
        assert torch.equal(value, full[key]), key
    assert set(optimizer.state_dict()["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}


def _flip_a_byte(folder):
    shard = next(folder.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))


def _step_folders(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if not p.name.startswith(".tmp-"))


def test_retention_leaves_another_runs_and_damaged_checkpoints_alone(tmp_path):
    model, optimizer = _trained()
    old = CheckpointManager(CheckpointConfig(keep=10), tmp_path)
    for step in (20, 40, 60):
        old.save(step, model, optimizer, {}, {})
    for step in (40, 60):  # the old run's newest checkpoints are damaged
        _flip_a_byte(tmp_path / "checkpoints" / f"step-{step:06d}")
    fresh = CheckpointManager(CheckpointConfig(keep=2), tmp_path)  # a new lineage (nothing resumed)
    for step in range(1, 9):
        fresh.save(step, model, optimizer, {}, {})
    # The old run's verified 20 and damaged 40 and 60 survive; of the new lineage the newest two are kept.
    assert _step_folders(tmp_path) == ["step-000007", "step-000008", "step-000020", "step-000040", "step-000060"]
    assert verify(tmp_path / "checkpoints" / "step-000020") is None
    with pytest.warns(UserWarning, match="step-000040 already existed"):
        fresh.save(40, model, optimizer, {}, {})  # the damaged folder of that step is set aside, not deleted
    folders = _step_folders(tmp_path)
    assert [f for f in folders if "replaced" not in f] == ["step-000008", "step-000020", "step-000040", "step-000060"]
    assert sum(f.startswith("step-000040.replaced-") for f in folders) == 1
    assert fresh.latest_complete().name == "step-000040"


def test_retention_keeps_damaged_and_newer_checkpoints_of_its_own_lineage(tmp_path):
    model, optimizer = _trained()
    first = CheckpointManager(CheckpointConfig(keep=10), tmp_path)
    for step in range(1, 5):
        first.save(step, model, optimizer, {}, {})
    _flip_a_byte(tmp_path / "checkpoints" / "step-000002")
    # Another process continues the lineage from step 3 (resume=<path>): step 4 is newer, never a candidate.
    second = CheckpointManager(CheckpointConfig(keep=1), tmp_path)
    second.load(tmp_path / "checkpoints" / "step-000003", model, optimizer, {})
    with pytest.warns(UserWarning, match="already existed"):
        second.save(4, model, optimizer, {}, {})  # the old step 4 is set aside, not overwritten
    second.save(5, model, optimizer, {}, {})
    folders = _step_folders(tmp_path)
    assert [f for f in folders if "replaced" not in f] == ["step-000002", "step-000005"]  # 2 is damaged: kept
    assert any(f.startswith("step-000004.replaced-") for f in folders)
    manifests = [json.loads((tmp_path / "checkpoints" / f"step-{s:06d}" / MANIFEST).read_text()) for s in (5,)]
    first_manifest = json.loads((tmp_path / "checkpoints" / "step-000002" / MANIFEST).read_text())
    assert manifests[0]["run_id"] == first_manifest["run_id"] == first.run_id
    assert manifests[0]["parent"]["step"] == 4 and manifests[0]["parent"]["path"].endswith("step-000004")


def test_retention_never_deletes_a_checkpoint_newer_than_the_one_written(tmp_path):
    model, optimizer = _trained()
    first = CheckpointManager(CheckpointConfig(keep=10), tmp_path)
    for step in (5, 6):
        first.save(step, model, optimizer, {}, {})
    rewound = CheckpointManager(CheckpointConfig(keep=1), tmp_path)
    rewound.load(tmp_path / "checkpoints" / "step-000005", model, optimizer, {})
    rewound.save(3, model, optimizer, {}, {})  # a run rewound to an earlier step number
    assert _step_folders(tmp_path) == ["step-000003", "step-000005", "step-000006"]


def test_a_full_disk_mid_save_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch):
    import errno

    from torch.distributed.checkpoint import FileSystemWriter

    model, optimizer = _trained()
    manager = CheckpointManager(CheckpointConfig(keep=1), tmp_path)
    manager.save(1, model, optimizer, {}, {})
    original = FileSystemWriter.write_data

    def full_disk(self, plan, planner):
        original(self, plan, planner).wait()  # some shards are written, then the disk fills up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(FileSystemWriter, "write_data", full_disk)
    with pytest.raises(CheckpointError, match=r"could not write checkpoint step-000002 .*No space left on device; "
                                              r"the previous checkpoint \S*step-000001 is intact"):
        manager.save(2, model, optimizer, {}, {})
    assert _step_folders(tmp_path) == ["step-000001"] and verify(tmp_path / "checkpoints" / "step-000001") is None
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
