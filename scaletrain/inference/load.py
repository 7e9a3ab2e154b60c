"""The one way inference and evaluation get a model: `load_model(path)` takes a scaletrain run folder (its
latest complete, verified checkpoint), a checkpoint step-* folder (any training layout: DCP reassembles the
shards) or a local Hugging Face folder, and returns a plain single-process model in eval mode with its
tokenizer. The optimizer state is never read. Nothing here imports the trainer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from scaletrain.checkpoint import hf_io
from scaletrain.checkpoint.manager import (checkpoint_model_config, checkpoint_tokenizer_path, find_checkpoint,
                                           read_model_tensors)
from scaletrain.configs.schema import ModelConfig
from scaletrain.data.tokenizer import Tokenizer, load_tokenizer
from scaletrain.errors import UserError
from scaletrain.models.hf import model_from_tensors


@dataclass
class LoadedModel:
    model: nn.Module  # eval mode, on `device`, fp32 as trained (or the folder's dtype)
    tokenizer: Tokenizer
    model_cfg: ModelConfig  # vocab_size is the model's own (padded) row count
    family: str  # gpt | bert | encdec
    source: Path  # the step-* folder or the Hugging Face folder actually read
    hf_class: str | None = None  # set when the source is a Hugging Face folder


def load_model(path: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    location = _existing(path)
    device = _device(device)
    if hf_io.is_hf_folder(location):
        return _from_hf_folder(location, device)
    return _from_checkpoint(find_checkpoint(location, what="model path"), device)


def model_config(path: str | Path):
    """The ModelConfig load_model would build (vocabulary as the tensors have it), from the config and the
    tensors' shapes alone: no weights are read."""
    from scaletrain.checkpoint.init_from import open_source

    return open_source(str(_existing(path))).model_cfg


def _existing(path: str | Path) -> Path:
    location = Path(path).expanduser()
    if not location.exists():
        raise UserError(f"{path} does not exist; pass a scaletrain run folder, a checkpoint step-* folder or a "
                        f"Hugging Face model folder")
    return location


def _device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    return device


def _from_checkpoint(step: Path, device: torch.device) -> LoadedModel:
    tensors = read_model_tensors(step)
    cfg = checkpoint_model_config(step, tensors)
    model = model_from_tensors(cfg, tensors, device)
    tokenizer = load_tokenizer(str(checkpoint_tokenizer_path(step)))
    return LoadedModel(model, tokenizer, cfg, cfg.family, step)


def _from_hf_folder(folder: Path, device: torch.device) -> LoadedModel:
    source = hf_io.read_hf_folder(folder)
    state = hf_io.full_state_from_hf(source)
    model = model_from_tensors(source.model_cfg, state, device, dtype=torch.float32)
    tokenizer = load_tokenizer(str(folder))
    return LoadedModel(model, tokenizer, source.model_cfg, source.model_cfg.family, folder, source.hf_class)
