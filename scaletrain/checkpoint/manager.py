"""Checkpoints on torch.distributed.checkpoint (DCP): atomic, verified, resumable on another layout.

On disk:
    <run_dir>/checkpoints/step-000500/
        __*_*.distcp, .metadata   DCP shards of {"model": ..., "optim": ...}; any layout can load them
        trainer_state.pt          rank 0: schedule, grad scaler, loader, progress (all global state)
        rng-rank-00003.pt         one per rank: python, numpy, torch (+cuda) RNG states
        tokenizer.json            the tokenizer the run trained with (export, generate and init_from use it)
        scaletrain.json           step, tokens, config, layout, world size, versions, file sizes and
                                  sha256 checksums, "complete": true; written last

Every rank writes into `.tmp-step-000500`; after a barrier rank 0 hashes the files, writes scaletrain.json
(fsynced) and renames the folder. A `step-*` folder therefore always has a manifest, and a kill -9 at
any moment leaves either the previous checkpoints or the new complete one. Resuming verifies the
manifest and the checksums of the newest folder and falls back to older ones with a warning."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import platform
import random
import shutil
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from scaletrain.configs.schema import CheckpointConfig, ModelConfig
from scaletrain.checkpoint.reshard import load_model_and_optimizer, model_and_optimizer_state, quiet_single_process
from scaletrain.errors import CheckpointError

MANIFEST = "scaletrain.json"
TRAINER_STATE = "trainer_state.pt"
STEP_PREFIX = "step-"
TMP_PREFIX = ".tmp-"
TOKENIZER = "tokenizer.json"  # the run's tokenizer, so a step folder is usable on its own


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:06d}"


def rng_file(rank: int) -> str:
    return f"rng-rank-{rank:05d}.pt"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, payload: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def verify(path: Path) -> Optional[str]:
    """None when `path` is a complete checkpoint whose files match the manifest, else the reason."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as error:
        return f"unreadable {MANIFEST} ({error.__class__.__name__})"
    if not manifest.get("complete"):
        return "the manifest does not say complete"
    for name, expected in manifest.get("files", {}).items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != expected["size"]:
            return f"{name} has {file.stat().st_size} bytes, the manifest says {expected['size']}"
        if _sha256(file) != expected["sha256"]:
            return f"{name} fails its sha256 checksum"
    return None


def steps_on_disk(directory: Path) -> list[int]:
    steps = []
    for path in Path(directory).glob(f"{STEP_PREFIX}*"):
        suffix = path.name[len(STEP_PREFIX):]
        if path.is_dir() and suffix.isdigit():
            steps.append(int(suffix))
    return steps


def read_manifest(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / MANIFEST).read_text())


def latest_verified(directory: Path) -> Optional[Path]:
    """The newest step-* folder under `directory` that verifies; older ones are tried with a warning each."""
    for step in sorted(steps_on_disk(directory), reverse=True):
        path = Path(directory) / step_dir_name(step)
        problem = verify(path)
        if problem is None:
            return path
        warnings.warn(f"skipping checkpoint {path}: {problem}", stacklevel=2)
    return None


def find_checkpoint(path: str | os.PathLike, what: str = "the path") -> Path:
    """A run folder -> its latest complete verified checkpoint; a step-* folder -> itself, once verified.
    `what` names the argument in the one-line error (e.g. "model.init_from=...")."""
    location = Path(path).expanduser()
    if not location.exists():
        raise CheckpointError(f"{what} {path} does not exist; pass a run folder or a checkpoint step-* folder")
    if (location / "checkpoints").is_dir():
        found = latest_verified(location / "checkpoints")
        if found is None:
            raise CheckpointError(f"{what} {path}: no complete checkpoint under {location / 'checkpoints'}; "
                                  f"pass a step-* folder, or train until a checkpoint is saved")
        return found
    if not (location / MANIFEST).is_file():
        raise CheckpointError(f"{what} {path} is neither a run folder (with checkpoints/) nor a checkpoint "
                              f"step-* folder (with {MANIFEST})")
    problem = verify(location)
    if problem is not None:
        raise CheckpointError(f"{what} {path} is not a usable checkpoint: {problem}; pass a complete step-* "
                              f"folder or its run folder")
    return location


def read_model_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The full model tensors of a checkpoint saved at any layout, read in this process without the
    optimizer state (DCP reassembles every shard by its global shape): {fqn: tensor}."""
    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    state = {key: torch.empty(meta.size, dtype=meta.properties.dtype)
             for key, meta in metadata.items() if key.startswith("model.") and hasattr(meta, "size")}
    with quiet_single_process():
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
    return {key[len("model."):]: tensor for key, tensor in state.items()}


def checkpoint_model_config(path: Path, tensors: Mapping[str, torch.Tensor]) -> ModelConfig:
    """The model config a checkpoint was trained with, its vocab the (padded) size its tensors have."""
    saved = dict(read_manifest(path).get("config", {}).get("model", {}))
    if not saved:
        raise CheckpointError(f"{path}/{MANIFEST} records no model config; it was not written by the trainer")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(saved) - known)
    if unknown:
        raise CheckpointError(f"{path} was saved with model fields this scaletrain does not know "
                              f"({', '.join(unknown)}); use the scaletrain version that saved it")
    saved.update(init_from=None, pad_vocab_multiple=1)  # the rows are final; init_from is done
    if "tok_embeddings.weight" in tensors:
        saved["vocab_size"] = int(tensors["tok_embeddings.weight"].shape[0])
    return ModelConfig(**saved)


def checkpoint_tokenizer_path(path: Path) -> Path:
    """The tokenizer a checkpoint trained with: its own tokenizer.json, else the one its config names."""
    path = Path(path)
    if (path / TOKENIZER).is_file():
        return path / TOKENIZER
    data = read_manifest(path).get("config", {}).get("data", {})
    candidates = [Path(data["prepared"]).expanduser() / TOKENIZER] if data.get("prepared") else []
    if data.get("tokenizer", "train") != "train":
        candidates.append(Path(data["tokenizer"]).expanduser())
    for candidate in candidates:
        if candidate.exists():
            return candidate
    raise CheckpointError(f"checkpoint {path} holds no {TOKENIZER} (saved by an older scaletrain) and its config "
                          f"names none that exists; set data.tokenizer to the tokenizer the run trained with")


class CheckpointManager:
    """Saves and restores {model, optimizer, named stateful objects, RNG}. Every rank calls every method."""

    def __init__(self, cfg: CheckpointConfig, run_dir: str | os.PathLike, rank: int = 0, world_size: int = 1):
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.directory = Path(run_dir) / "checkpoints"
        self.distributed = dist.is_available() and dist.is_initialized()
        # A gloo group of its own: async saves run collectives from a background thread, which must never
        # interleave with the training collectives on the default group.
        self.group = dist.new_group(backend="gloo") if self.distributed else None
        self._executor = ThreadPoolExecutor(max_workers=1) if cfg.async_save else None
        self._pending: Optional[Future] = None
        if self.rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            for stale in self.directory.glob(f"{TMP_PREFIX}*"):  # left by a crash mid-save
                shutil.rmtree(stale, ignore_errors=True)
        self._barrier()

    # ---- collectives on the checkpoint group ------------------------------------------------------
    def _barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.group)

    def _broadcast_from_rank0(self, value: Any) -> Any:
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0), group=self.group)
        return box[0]

    # ---- save ------------------------------------------------------------------------------------
    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             stateful: Mapping[str, Any], metadata: Mapping[str, Any],
             files: Optional[Mapping[str, bytes]] = None) -> None:
        """Write checkpoint `step`; `files` are small extra files rank 0 writes into it (the tokenizer), listed
        and checksummed in the manifest like the rest. With async_save the DCP write, the manifest and the
        rename happen in the background; the next save, `wait()` or `close()` waits for them."""
        self.wait()
        final = self.directory / step_dir_name(step)
        tmp = self.directory / f"{TMP_PREFIX}{step_dir_name(step)}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        # Small state is written synchronously: it is captured now, at the step being saved.
        if self.rank == 0:
            payload = {name: obj.state_dict() for name, obj in stateful.items()}
            _write_durably(tmp / TRAINER_STATE, pickle.dumps(payload))
            for name, content in (files or {}).items():
                _write_durably(tmp / name, content)
        _write_durably(tmp / rng_file(self.rank), pickle.dumps(rng_state()))
        state = model_and_optimizer_state(model, optimizer)
        manifest = {"step": step, **metadata, "world_size": self.world_size, "versions": _versions()}
        if self._executor is None:
            with quiet_single_process():
                dcp.save(state, checkpoint_id=str(tmp), process_group=self.group, no_dist=not self.distributed)
            self._finalize(tmp, final, manifest)
        else:
            # async_save copies the state to CPU memory before returning, so training may change it.
            upload = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self.group,
                                    no_dist=not self.distributed)
            self._pending = self._executor.submit(self._finish_async, upload, tmp, final, manifest)

    def _finish_async(self, upload: Future, tmp: Path, final: Path, manifest: dict) -> None:
        upload.result()
        self._finalize(tmp, final, manifest)

    def _finalize(self, tmp: Path, final: Path, manifest: dict) -> None:
        self._barrier()  # every rank's shards and RNG file are on disk
        if self.rank == 0:
            files = sorted(p for p in tmp.rglob("*") if p.is_file())
            for file in files:  # DCP does not fsync its shards; the manifest must not outlive them
                with open(file, "rb+") as handle:
                    os.fsync(handle.fileno())
            manifest["files"] = {str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": _sha256(p)}
                                 for p in files}
            manifest["complete"] = True
            _write_durably(tmp / MANIFEST, json.dumps(manifest, indent=2, default=str).encode())
            _fsync_dir(tmp)
            if final.exists():  # a corrupted checkpoint of the same step, skipped on resume
                self._delete(final)
            os.replace(tmp, final)
            _fsync_dir(self.directory)
            self._apply_retention()
        self._barrier()

    def wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self) -> None:
        self.wait()
        if self._executor is not None:
            self._executor.shutdown()

    def _apply_retention(self) -> None:
        """Keep the newest `keep` checkpoints, plus every step divisible by keep_every."""
        steps = sorted(steps_on_disk(self.directory))
        keep = set(steps[-self.cfg.keep:])
        if self.cfg.keep_every > 0:
            keep |= {s for s in steps if s % self.cfg.keep_every == 0}
        for step in steps:
            if step not in keep:
                self._delete(self.directory / step_dir_name(step))

    def _delete(self, path: Path) -> None:
        """Rename out of the step-* namespace first, so a kill mid-delete never leaves a half checkpoint
        under a resumable name; the `.tmp-` leftovers are removed at the next start."""
        doomed = self.directory / f"{TMP_PREFIX}delete-{path.name}"
        shutil.rmtree(doomed, ignore_errors=True)
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    # ---- find --------------------------------------------------------------------------------------
    def latest_complete(self, directory: Optional[Path] = None) -> Optional[Path]:
        """The newest checkpoint that verifies; rank 0 checks and tells the others."""
        directory = directory or self.directory
        found = None
        if self.rank == 0:
            path = latest_verified(directory)
            found = str(path) if path is not None else None
        found = self._broadcast_from_rank0(found)
        return Path(found) if found else None

    def resolve_resume(self, resume: str) -> Optional[Path]:
        """resume = auto (latest complete here, if any) | none | a checkpoint folder or a run folder."""
        if resume == "none":
            return None
        if resume == "auto":
            return self.latest_complete()
        path = Path(resume).expanduser()
        if (path / "checkpoints").is_dir():
            found = self.latest_complete(path / "checkpoints")
            if found is None:
                raise CheckpointError(f"resume={resume}: no complete checkpoint under {path / 'checkpoints'}; "
                                      f"pass a step-* folder or resume=none")
            return found
        problem = verify(path) if self.rank == 0 else None
        problem = self._broadcast_from_rank0(problem)
        if problem is not None:
            raise CheckpointError(f"resume={resume} is not a usable checkpoint: {problem}; pass a complete "
                                  f"step-* folder, resume=auto or resume=none")
        return path

    # ---- load --------------------------------------------------------------------------------------
    def load(self, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             stateful: Mapping[str, Any]) -> dict[str, Any]:
        """Restore everything saved at `path` into the live objects; returns the manifest."""
        path = Path(path)
        load_model_and_optimizer(path, model, optimizer, self.group)
        saved = pickle.loads((path / TRAINER_STATE).read_bytes())
        for name, obj in stateful.items():
            if name not in saved:
                raise CheckpointError(f"checkpoint {path} has no '{name}' state; it was written by another "
                                      f"version of the trainer; start a fresh run with resume=none")
            obj.load_state_dict(saved[name])
        rng_path = path / rng_file(self.rank)
        if rng_path.is_file():
            set_rng_state(pickle.loads(rng_path.read_bytes()))
        elif self.rank == 0:
            # A larger world than the one that saved: new ranks keep their seeded streams.
            warnings.warn(f"{path} has no RNG state for rank {self.rank}; using the seeded one", stacklevel=2)
        return read_manifest(path)



def _versions() -> dict[str, str]:
    import scaletrain

    return {"torch": torch.__version__, "python": platform.python_version(),
            "scaletrain": getattr(scaletrain, "__version__", "0.1.0"), "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
