"""`model.init_from=<Hugging Face folder | run folder | step-* folder>`: start a run from those weights with a
fresh optimizer, schedule and data position.

Two moments:
  - composing the config (`take_source_config`, from configs/store.to_train_config): without `model=` the model config is the source's (with any
    `model.<field>=` overrides on top); with `model=` it must compute the same function, else one line names
    the fields. The tokenizer is the source's unless data.tokenizer names one.
  - after the trainer materializes the model (`load_init_weights`): every rank reads only the region of
    each tensor it holds (safetensors slices; DCP reads a DTensor's own chunks), so no rank holds the whole
    model. Heads the source lacks (classifier, pooler, NSP) keep their initialization and are logged; rows
    past the source's vocabulary too. Any other missing or unexpected tensor is an error."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import torch

from scaletrain.checkpoint import hf_io
from scaletrain.checkpoint.manager import (checkpoint_model_config, checkpoint_tokenizer_path, find_checkpoint,
                                           quiet_single_process)
from scaletrain.configs.schema import ModelConfig
from scaletrain.errors import CheckpointError, ConfigError
from scaletrain.models import hf
from scaletrain.models.init import TIED_TO_EMBEDDINGS

log = logging.getLogger(__name__)
NEW_HEADS = ("classifier.", "pooler.", "nsp_head.")  # may be absent from the source: initialized, logged
# a head may differ from the source's (it is then new or dropped); everything else must match
HEAD_FIELDS = ("pooler", "nsp_head", "num_labels")
VOCAB_TENSORS = ("tok_embeddings.weight", "lm_head.weight", "mlm_head.decoder.bias", "final_logits_bias")


# --------------------------------------------------------------------------------------------- sources

@dataclasses.dataclass
class Source:
    path: Path  # the HF folder or the step-* folder read
    model_cfg: ModelConfig
    tokenizer: str  # path of the source's tokenizer
    shapes: dict[str, tuple[int, ...]]  # our tensor name -> the source's global shape
    read: Callable[[str, tuple[slice, ...]], torch.Tensor]  # (our name, region) -> that region of the tensor
    read_many: Optional[Callable[[dict], None]] = None  # {our name: live tensor} of equal shapes, in place
    weights: Optional[hf_io.HFWeights] = None  # a Hugging Face source's reader (counts the bytes it read)


def open_source(path: str) -> Source:
    location = Path(path).expanduser()
    if hf_io.is_hf_folder(location):
        return _hf_source(location)
    return _checkpoint_source(find_checkpoint(location, what="model.init_from"))


def _hf_source(folder: Path) -> Source:
    source = hf_io.read_hf_folder(folder)
    cfg, weights = source.model_cfg, source.weights
    try:
        checked = hf.check_hf_keys(cfg, source.hf_class, weights.keys())
    except hf.UnsupportedHFModel as error:
        raise CheckpointError(f"model.init_from={folder}: {error}") from None
    links = {name: (link, index) for link in checked for index, name in enumerate(link.ours)}

    def our_shape(name: str) -> tuple[int, ...]:
        link, index = links[name]  # the adapter's own split, on a meta tensor of the stored shape
        return tuple(hf.split_hf_tensor(link, torch.empty(weights.shape(link.hf), device="meta"))[index].shape)

    def read(name: str, region: tuple[slice, ...]) -> torch.Tensor:
        """Only the region is read: our (out, in) region of a fused Conv1D maps to its (in, index*out+...).
        Per-head (D, H, Dh) tensors (XLNet) are read whole and reshaped by the adapter."""
        link, index = links[name]
        if link.heads:
            return hf.split_hf_tensor(link, weights.get(link.hf))[index][region]
        rows = our_shape(name)[0]
        first = slice(index * rows + region[0].start, index * rows + region[0].stop)
        hf_region = (first, *region[1:])
        if link.conv1d and len(region) == 2:
            return weights.get_slice(link.hf, (hf_region[1], hf_region[0])).t()
        return weights.get_slice(link.hf, hf_region)

    tokenizer = str(folder)
    return Source(folder, cfg, tokenizer, {name: our_shape(name) for name in links}, read, weights=weights)


def _checkpoint_source(step: Path) -> Source:
    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(str(step)).read_metadata().state_dict_metadata
    shapes = {key[len("model."):]: tuple(meta.size) for key, meta in metadata.items()
              if key.startswith("model.") and hasattr(meta, "size")}
    dtypes = {key[len("model."):]: meta.properties.dtype for key, meta in metadata.items() if key in
              {f"model.{name}" for name in shapes}}

    def read_many(targets: dict) -> None:
        """One DCP read of the live tensors: a DTensor gets only its own chunks from disk."""
        with quiet_single_process():
            dcp.load({f"model.{name}": tensor for name, tensor in targets.items()}, checkpoint_id=str(step),
                     no_dist=True)

    def read(name: str, region: tuple[slice, ...]) -> torch.Tensor:
        full = torch.empty(shapes[name], dtype=dtypes[name])
        read_many({name: full})
        return full[region]

    return Source(step, checkpoint_model_config(step, shapes), str(checkpoint_tokenizer_path(step)), shapes, read,
                  read_many)


# --------------------------------------------------------------------------------- config resolution

def _override_keys(overrides: Sequence[str]) -> set[str]:
    return {override.split("=", 1)[0].lstrip("+~") for override in overrides if "=" in override}


def architecture_mismatch(cfg: ModelConfig, source: ModelConfig) -> list[str]:
    """'field=ours (source: theirs)' for every field that changes the function, heads and vocab aside."""
    ours, theirs = hf.architecture_fields(cfg), hf.architecture_fields(source)
    skipped = set(HEAD_FIELDS) | {"vocab_size"}
    return [f"{name}={ours[name]!r} (source: {theirs[name]!r})" for name in ours
            if name not in skipped and ours[name] != theirs.get(name)]


def take_source_config(cfg, overrides: Sequence[str]) -> None:
    """Composing with model.init_from, on the DictConfig before it is validated (a `model.pooler=true` for
    a BERT source must not be judged against the default GPT preset). Changes `cfg` in place."""
    from omegaconf import OmegaConf

    path = cfg.model.init_from
    source = open_source(path)
    keys = _override_keys(overrides)
    if keys & {"model", "experiment"}:  # the user's own architecture: it must compute the same function
        mismatch = architecture_mismatch(OmegaConf.to_object(cfg.model), source.model_cfg)
        if mismatch:
            raise ConfigError(f"model.init_from={path} holds a different architecture than model {cfg.model.name}: "
                              f"{', '.join(mismatch)}; drop model= to take the source's config, or fix these fields")
    else:  # the source's architecture, with the user's model.<field>= overrides on top
        fields = dataclasses.asdict(source.model_cfg)
        fields.update({key[len("model."):]: cfg.model[key[len("model."):]]
                       for key in keys if key.startswith("model.") and key.count(".") == 1})
        fields["init_from"] = path
        for name, value in fields.items():  # field by field: the node stays a typed ModelConfig node
            cfg.model[name] = value
    if cfg.data.tokenizer == "train":
        cfg.data.tokenizer = source.tokenizer


# ------------------------------------------------------------------------------------- loading weights

def _local(tensor: torch.Tensor) -> tuple[Optional[torch.Tensor], tuple[int, ...]]:
    """(this rank's piece, its offset in the global tensor); (None, ...) when the rank holds none."""
    if hasattr(tensor, "device_mesh") and hasattr(tensor, "placements"):
        if tensor.device_mesh.get_coordinate() is None:
            return None, ()
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        _, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
        return tensor.to_local(), tuple(offset)
    return tensor, (0,) * tensor.dim()


def _source_name(name: str, cfg: ModelConfig, shapes: Mapping[str, tuple]) -> str:
    """A tied head (or a pipeline stage's copy of it) reads the token table."""
    if cfg.tie_embeddings and name in TIED_TO_EMBEDDINGS and name not in shapes:
        return "tok_embeddings.weight"
    return name


def _plan(cfg: ModelConfig, source: Source) -> tuple[dict[str, str], list[str]]:
    """For the whole model (every rank agrees): our name -> source name, and the new heads. Raises on any
    other missing, unexpected or mis-shaped tensor."""
    from scaletrain.models.registry import build_model

    full = build_model(cfg, device="meta").state_dict()
    names = {name: _source_name(name, cfg, source.shapes) for name in full}
    new = sorted(name for name, src in names.items() if src not in source.shapes and name.startswith(NEW_HEADS))
    missing = sorted(name for name, src in names.items() if src not in source.shapes and name not in new)
    unexpected = sorted(set(source.shapes) - set(names.values())
                        - ({*TIED_TO_EMBEDDINGS} if cfg.tie_embeddings else set()))
    problems = []
    for name, src in names.items():
        if src in source.shapes and tuple(full[name].shape) != source.shapes[src]:
            live, theirs = tuple(full[name].shape), source.shapes[src]
            grows_vocab = name in VOCAB_TENSORS and all(a >= b for a, b in zip(live, theirs))
            if not grows_vocab:
                problems.append(f"{name} {list(theirs)} in the source vs {list(live)} here")
    for label, items in (("missing from the source", missing), ("unexpected", unexpected), ("shape", problems)):
        if items:
            raise CheckpointError(f"model.init_from={cfg.init_from}: {label}: {', '.join(items[:6])}"
                                  f"{f' (+{len(items) - 6} more)' if len(items) > 6 else ''}; the source holds "
                                  f"another architecture (drop model= to take its config)")
    return {name: src for name, src in names.items() if name not in new}, new


@torch.no_grad()
def load_init_weights(model: torch.nn.Module, cfg: ModelConfig) -> dict[str, list[str]]:
    """Overwrites the materialized model's tensors with the source's; each rank reads what it holds.
    Returns {"new": initialized heads, "grown": tensors whose extra vocabulary rows kept their init,
    "bytes_read": tensor bytes a Hugging Face source gave this rank}."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    source = open_source(cfg.init_from)
    plan, new = _plan(cfg, source)
    live = get_model_state_dict(model)  # clean names (wrappers removed), tensors sharing the model's storage
    batches: list[dict] = []  # equal-shape tensors of a checkpoint: DCP reads each rank's chunks itself
    grown = []
    for name, tensor in live.items():
        src = plan.get(name)
        if src is None:
            continue
        if tuple(tensor.shape) == source.shapes[src] and source.read_many is not None:
            batch = next((b for b in batches if src not in b), None)  # a tied table read twice: two batches
            if batch is None:
                batches.append(batch := {})
            batch[src] = tensor
            continue
        local, offset = _local(tensor)
        if local is None:
            continue
        if tuple(tensor.shape) != source.shapes[src]:
            grown.append(name)
        region = tuple(slice(min(o, s), min(o + n, s)) for o, n, s in zip(offset, local.shape, source.shapes[src]))
        if all(r.stop > r.start for r in region):
            local[tuple(slice(0, r.stop - r.start) for r in region)].copy_(source.read(src, region))
    for batch in batches:
        source.read_many(batch)
    log.info("model.init_from=%s: loaded %d tensors from %s%s%s", cfg.init_from, len(plan) - len(grown),
             source.path, f"; new heads initialized: {', '.join(new)}" if new else "",
             f"; extra vocabulary rows initialized in {', '.join(grown)}" if grown else "")
    return {"new": new, "grown": sorted(grown), "bytes_read": source.weights.bytes_read if source.weights else None}
