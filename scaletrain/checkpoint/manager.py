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
manifest and the checksums of the newest folder and falls back to older ones with a warning.

Lineage: every manifest names its `run_id` (a fresh id for a run started from scratch, inherited on resume)
and its `parent` (the checkpoint this state grew from). Retention only ever deletes verified checkpoints of
the current run id that are older than the one just written; damaged folders, other runs' checkpoints and
newer ones are never touched, so the newest verified checkpoint always survives."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import pickle
import platform
import random
import shutil
import time
import uuid
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from scaletrain.configs.schema import CheckpointConfig, ModelConfig, missing_resume_message
from scaletrain.checkpoint.reshard import load_model_and_optimizer, model_and_optimizer_state, quiet_single_process
from scaletrain.durable import fsync_dir
from scaletrain.errors import DISK_ERRNOS, CheckpointError

MANIFEST = "scaletrain.json"
TRAINER_STATE = "trainer_state.pt"
STEP_PREFIX = "step-"
TMP_PREFIX = ".tmp-"
REPLACED_SUFFIX = ".replaced-"
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


def _manifest_or_none(path: Path) -> Optional[dict[str, Any]]:
    try:
        manifest = read_manifest(path)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _disk_error_in(error: BaseException) -> Optional[OSError]:
    """The OSError with a disk errno in `error`, its causes, or DCP's per-rank failures, if any."""
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, OSError) and error.errno in DISK_ERRNOS:
            return error
        for failure in getattr(error, "failures", {}).values():  # dcp's CheckpointException: (error, trace)
            inner = _disk_error_in(failure[0] if isinstance(failure, tuple) else failure)
            if inner is not None:
                return inner
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None


def refuse_fresh_start(run_dir: str | os.PathLike) -> None:
    """resume=none must not start a second run among another run's checkpoints: a later resume=auto would
    pick whichever is newest. Called before anything is written to the run folder."""
    directory = Path(run_dir) / "checkpoints"
    steps = sorted(steps_on_disk(directory)) if directory.is_dir() else []
    if steps:
        raise CheckpointError(f"resume=none but {directory} holds checkpoints of another run (newest "
                              f"{step_dir_name(steps[-1])}); use a new folder (hydra.run.dir=...) or resume=auto")


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
        table = tensors["tok_embeddings.weight"]  # a tensor, or its shape
        saved["vocab_size"] = int(table.shape[0] if hasattr(table, "shape") else table[0])
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
        # Lineage (rank 0 writes every manifest): a new run id unless load() continues an existing one.
        self.run_id = uuid.uuid4().hex
        self.parent: Optional[dict[str, Any]] = None
        self._known_good: set[str] = set()  # checkpoint ids verified (or written) by this process
        problem = self._prepare_directory() if self.rank == 0 else None
        problem = self._broadcast_from_rank0(problem)
        if problem is not None:
            raise CheckpointError(problem)
        self.barrier()

    def _prepare_directory(self) -> Optional[str]:
        """Creates the checkpoint folder; the reason it cannot be used, or None."""
        if self.directory.exists() and not self.directory.is_dir():
            return (f"{self.directory} is a file, not a folder, so no checkpoint can be written; move it away "
                    f"or use another run folder (hydra.run.dir=...)")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            return (f"cannot create the checkpoint folder {self.directory}: {error.strerror}; use a writable run "
                    f"folder (hydra.run.dir=...)")
        for stale in self.directory.glob(f"{TMP_PREFIX}*"):  # left by a crash mid-save
            shutil.rmtree(stale, ignore_errors=True)
        return None

    # ---- collectives on the checkpoint group ------------------------------------------------------
    def barrier(self) -> None:
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
        manifest = {"step": step, **metadata, "run_id": self.run_id, "checkpoint_id": uuid.uuid4().hex,
                    "parent": self.parent, "world_size": self.world_size, "versions": _versions()}
        with self._disk_errors_reported(step, tmp):
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            self.barrier()
            # Small state is written synchronously: it is captured now, at the step being saved.
            if self.rank == 0:
                payload = {name: obj.state_dict() for name, obj in stateful.items()}
                _write_durably(tmp / TRAINER_STATE, pickle.dumps(payload))
                for name, content in (files or {}).items():
                    _write_durably(tmp / name, content)
            _write_durably(tmp / rng_file(self.rank), pickle.dumps(rng_state()))
            state = model_and_optimizer_state(model, optimizer)
            if self._executor is None:
                with quiet_single_process():
                    dcp.save(state, checkpoint_id=str(tmp), process_group=self.group,
                             no_dist=not self.distributed)
                self._finalize(tmp, final, manifest)
                return
            # async_save copies the state to CPU memory before returning, so training may change it.
            upload = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self.group,
                                    no_dist=not self.distributed)
        self._pending = self._executor.submit(self._finish_async, upload, tmp, final, manifest)

    def _finish_async(self, upload: Future, tmp: Path, final: Path, manifest: dict) -> None:
        with self._disk_errors_reported(manifest["step"], tmp):
            upload.result()
            self._finalize(tmp, final, manifest)

    @contextlib.contextmanager
    def _disk_errors_reported(self, step: int, tmp: Path):
        """A write failing for the disk's reasons (full, quota, read-only, permissions) drops the partial
        folder and names the checkpoint that is still the newest complete one; other errors pass through."""
        try:
            yield
        except BaseException as error:  # DCP wraps a failed write's OSError in CheckpointException (a BaseException)
            disk_error = _disk_error_in(error)
            if disk_error is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            previous = self.parent["path"] if self.parent else "(none yet)"
            raise CheckpointError(
                f"could not write checkpoint {step_dir_name(step)} in {self.directory}: {disk_error.strerror}; "
                f"the previous checkpoint {previous} is intact; free space (or fix the permissions) and rerun "
                f"with resume=auto") from None

    def _finalize(self, tmp: Path, final: Path, manifest: dict) -> None:
        # The next checkpoint grows from this one (its manifest names this as its parent).
        written = {"path": str(final.resolve()), "step": manifest["step"], "checkpoint_id": manifest["checkpoint_id"]}
        self.barrier()  # every rank's shards and RNG file are on disk
        if self.rank == 0:
            files = sorted(p for p in tmp.rglob("*") if p.is_file())
            for file in files:  # DCP does not fsync its shards; the manifest must not outlive them
                with open(file, "rb+") as handle:
                    os.fsync(handle.fileno())
            manifest["files"] = {str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": _sha256(p)}
                                 for p in files}
            manifest["complete"] = True
            _write_durably(tmp / MANIFEST, json.dumps(manifest, indent=2, default=str).encode())
            fsync_dir(tmp)
            if final.exists():  # the same step from another run, or damaged: set aside, never deleted
                self._set_aside(final)
            os.replace(tmp, final)
            self.parent = written  # at once: an interrupt from here on reports this one as the newest
            fsync_dir(self.directory)
            self._known_good.add(manifest["checkpoint_id"])
            self._apply_retention(manifest["step"])
        self.barrier()
        self.parent = written

    def wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self) -> None:
        self.wait()
        if self._executor is not None:
            self._executor.shutdown()

    def _apply_retention(self, written_step: int) -> None:
        """Of this run's verified checkpoints older than the one just written, keep the newest keep - 1
        (the new one is the keep-th), every step divisible by keep_every and the one whose manifest records the
        best keep_best metric; delete the others. Damaged
        folders, other runs' checkpoints and anything newer are not candidates at all."""
        ours = sorted(step for step in steps_on_disk(self.directory)
                      if step < written_step and self._is_ours_and_verified(self.directory / step_dir_name(step)))
        keep = set(ours[len(ours) - (self.cfg.keep - 1):]) if self.cfg.keep > 1 else set()
        if self.cfg.keep_every > 0:
            keep |= {s for s in ours if s % self.cfg.keep_every == 0}
        if self.cfg.keep_best:
            keep.add(self._best_step(ours + [written_step]))
        for step in ours:
            if step not in keep:
                self._delete(self.directory / step_dir_name(step))

    def _best_step(self, steps: list[int]) -> Optional[int]:
        """The step whose evaluation (manifest "metrics") was best: lowest val_loss, else highest; the earliest
        on a tie; None when no checkpoint recorded the metric."""
        name, sign = self.cfg.keep_best, -1.0 if self.cfg.keep_best == "val_loss" else 1.0
        scored = []
        for step in steps:
            value = (_manifest_or_none(self.directory / step_dir_name(step)) or {}).get("metrics", {}).get(name)
            if isinstance(value, (int, float)) and math.isfinite(value):
                scored.append((sign * value, -step))
        return -max(scored)[1] if scored else None

    def _is_ours_and_verified(self, path: Path) -> bool:
        manifest = _manifest_or_none(path)
        if manifest is None or manifest.get("run_id") != self.run_id:
            return False
        checkpoint_id = manifest.get("checkpoint_id")
        if checkpoint_id in self._known_good:  # hashed once per process, not at every save
            return True
        if verify(path) is not None:
            return False
        self._known_good.add(checkpoint_id)
        return True

    def _set_aside(self, path: Path) -> None:
        aside = path.with_name(f"{path.name}{REPLACED_SUFFIX}{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}")
        os.replace(path, aside)
        warnings.warn(f"{path} already existed (another run's or a damaged checkpoint of the same step); it was "
                      f"moved to {aside}, delete it when you no longer need it", stacklevel=2)

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
            if path is not None:
                found = str(path)
                self._known_good.add(read_manifest(path).get("checkpoint_id"))
        found = self._broadcast_from_rank0(found)
        return Path(found) if found else None

    def resolve_resume(self, resume: str) -> Optional[Path]:
        """resume = auto (latest complete here, if any) | none | a checkpoint folder or a run folder."""
        if resume == "none":
            return None
        if resume == "auto":
            return self.latest_complete()
        path = Path(resume).expanduser()
        if not path.exists():
            raise CheckpointError(missing_resume_message(resume))
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
        manifest = read_manifest(path)
        # The lineage continues: the next save names this checkpoint as its parent. A checkpoint written
        # before lineages were recorded starts a new run id (its folder's old checkpoints are then foreign).
        self.run_id = manifest.get("run_id") or self.run_id
        self.parent = {"path": str(path.resolve()), "step": manifest["step"],
                       "checkpoint_id": manifest.get("checkpoint_id")}
        rng_path = path / rng_file(self.rank)
        if rng_path.is_file():
            set_rng_state(pickle.loads(rng_path.read_bytes()))
        elif self.rank == 0:
            # A larger world than the one that saved: new ranks keep their seeded streams.
            warnings.warn(f"{path} has no RNG state for rank {self.rank}; using the seeded one", stacklevel=2)
        return manifest



def _versions() -> dict[str, str]:
    import scaletrain

    return {"torch": torch.__version__, "python": platform.python_version(),
            "scaletrain": getattr(scaletrain, "__version__", "0.1.0"), "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
