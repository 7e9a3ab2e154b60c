"""Model + optimizer state on DCP, readable by any layout: another dp / tp / pp split, or one process.

DCP already reshards tensors by their global shape; three things about our layouts it does not know:
  - a pipeline stage's optimizer holds only its own parameters, so hyperparameters are stored per parameter
    name ("optim.param_groups.<fqn>.lr"), never as a layout-specific list of groups;
  - the last stage's head is its own copy of the tied token table, which a checkpoint saved without
    pipeline stages holds (weights and optimizer state) only under tok_embeddings.weight: `aliases`;
  - how the optimizer steps (foreach, fused) is chosen for the live layout, so it is never restored.
Mismatches are found before any tensor is read, agreed on by every rank, and reported in one line."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from scaletrain.errors import CheckpointError

STATE_DICT_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
IMPLEMENTATION_OPTIONS = ("foreach", "fused", "capturable", "differentiable")
MAX_LISTED_MISMATCHES = 8
# One process without a process group is a supported layout here, not an accident worth a warning.
_SINGLE_PROCESS_WARNING = "torch.distributed is disabled, unavailable or uninitialized"
warnings.filterwarnings("ignore", message=_SINGLE_PROCESS_WARNING)


@contextlib.contextmanager
def quiet_single_process():
    with warnings.catch_warnings():  # main thread only: catch_warnings is not thread-safe
        warnings.filterwarnings("ignore", message=_SINGLE_PROCESS_WARNING)
        yield


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def model_and_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict]:
    """{"model": {fqn: tensor}, "optim": {"state.<fqn>.<name>" | "param_groups.<fqn>.<option>": value}}.
    An optimizer that is a whole engine (parallel/deepspeed.py) gives this state itself."""
    if hasattr(optimizer, "layout_free_state"):
        return optimizer.layout_free_state()
    model_state, optim_state = get_state_dict(model, optimizer, options=STATE_DICT_OPTIONS)
    return {"model": model_state, "optim": optim_state}


def save_model_and_optimizer(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                             group=None) -> None:
    with quiet_single_process():
        dcp.save(model_and_optimizer_state(model, optimizer), checkpoint_id=str(path), process_group=group,
                 no_dist=not _distributed())


def load_model_and_optimizer(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                             group=None) -> None:
    """Every rank calls this. Raises CheckpointError, on every rank, when the checkpoint does not fit."""
    state = model_and_optimizer_state(model, optimizer)
    metadata = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    optim_state = state["optim"]
    live_options = {key: optim_state.pop(key) for key in list(optim_state)
                    if key.startswith("param_groups.") and key.rsplit(".", 1)[-1] in IMPLEMENTATION_OPTIONS}
    put_back = _read_aliases_from(state, set(metadata), getattr(model, "checkpoint_aliases", dict)())
    all_model_keys = _union_over_ranks(set(state["model"]), group)
    problem = architecture_problem(metadata, state["model"], all_model_keys) or optimizer_problem(metadata, optim_state)
    problem = _first_over_ranks(problem, group)
    if problem is not None:
        put_back()
        raise CheckpointError(f"checkpoint {path} does not fit this run -- {problem}")
    with quiet_single_process():
        dcp.load(state, checkpoint_id=str(path), process_group=group, no_dist=not _distributed())
    put_back()
    optim_state.update(live_options)
    if hasattr(optimizer, "load_layout_free_state"):
        optimizer.load_layout_free_state(state)
        return
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=optim_state,
                   options=STATE_DICT_OPTIONS)


def _gather(value: Any, group) -> list[Any]:
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, value, group=group)
    return gathered


def _union_over_ranks(keys: set[str], group) -> set[str]:
    return set().union(*_gather(sorted(keys), group)) if _distributed() else keys


def _first_over_ranks(problem: Optional[str], group) -> Optional[str]:
    """The lowest rank's problem, on every rank: raising on some ranks only would hang the others in dcp.load."""
    if not _distributed():
        return problem
    return next((p for p in _gather(problem, group) if p is not None), None)


def _read_aliases_from(state: dict[str, dict], saved_keys: set[str], aliases: Mapping[str, str]) -> Callable[[], None]:
    """Entries the checkpoint lacks but holds under an alias: renamed to the alias for the load, or, when
    this rank requests the alias too (a V schedule puts both tied copies on one rank), set aside and
    copied from it afterwards. Returns the function that puts them back."""
    renamed: list[tuple[dict, str, str]] = []
    set_aside: list[tuple[dict, str, str, Any]] = []
    for top, entries in state.items():
        for key in list(entries):
            if f"{top}.{key}" in saved_keys:
                continue
            for name, source in aliases.items():
                if f".{name}." not in f".{key}.":
                    continue
                alias = f".{key}.".replace(f".{name}.", f".{source}.", 1)[1:-1]
                if f"{top}.{alias}" not in saved_keys:
                    continue
                if alias in entries:
                    set_aside.append((entries, key, alias, entries.pop(key)))
                else:
                    entries[alias] = entries.pop(key)
                    renamed.append((entries, key, alias))

    def put_back() -> None:
        for entries, key, alias in renamed:
            entries[key] = entries.pop(alias)
        for entries, key, alias, value in set_aside:
            if isinstance(value, torch.Tensor):
                value.copy_(entries[alias])
                entries[key] = value
            else:
                entries[key] = entries[alias]
    return put_back


def _listing(label: str, items: list[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED_MISMATCHES])
    more = f" (+{len(items) - MAX_LISTED_MISMATCHES} more)" if len(items) > MAX_LISTED_MISMATCHES else ""
    return f"{label}: {shown}{more}"


def architecture_problem(metadata: Mapping[str, Any], model_state: Mapping[str, Any],
                         all_model_keys: set[str]) -> Optional[str]:
    """Missing, unexpected (against every rank's keys: a pipeline stage holds part of the model) and
    mis-shaped parameters (global shapes), or None."""
    saved = {key[len("model."):]: meta for key, meta in metadata.items() if key.startswith("model.")}
    missing = sorted(set(model_state) - set(saved))
    unexpected = sorted(set(saved) - all_model_keys)
    shapes = []
    for key in sorted(set(saved) & set(model_state)):
        want, have = tuple(model_state[key].shape), tuple(getattr(saved[key], "size", ()))
        if want != have:
            shapes.append(f"{key} {list(have)} in the checkpoint vs {list(want)} in the model")
    parts = [_listing(label, items) for label, items in
             (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)) if items]
    if not parts:
        return None
    return (f"it holds a different architecture ({'; '.join(parts)}); resume with the model config it was "
            f"saved with, or start fresh with resume=none")


def optimizer_problem(metadata: Mapping[str, Any], optim_state: Mapping[str, Any]) -> Optional[str]:
    missing = sorted(key for key in optim_state if f"optim.{key}" not in metadata)
    if not missing:
        return None
    missing.sort(key=lambda key: not key.startswith("state."))  # per-element state says most
    return (f"it lacks optimizer state this run needs ({_listing('missing', missing)}); resume with the "
            f"optimizer it was saved with, or start fresh with resume=none")
