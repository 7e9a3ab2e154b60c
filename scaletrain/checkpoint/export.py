"""`scaletrain export <run dir | step dir> --out DIR`: a checkpoint of any layout -> a Hugging Face folder
(config.json, model.safetensors, generation_config.json, tokenizer files) that transformers' Auto* classes
and pipelines load as they are."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch

from scaletrain.checkpoint.hf_io import write_hf_folder
from scaletrain.checkpoint.manager import MANIFEST, read_manifest
from scaletrain.errors import UserError
from scaletrain.parallel.data import PRECISION_DTYPES

log = logging.getLogger(__name__)
HF_EXPORT_DIR = "hf"  # checkpoint.export_hf writes <run_dir>/hf/step-N
RELATIVE_MAX_LENGTH = 512  # T5's model_max_length when the run's sequence length is unknown


def model_max_length(model_cfg, source: Path) -> int:
    """Learned positions: the table's length; relative ones: the sequence length the run trained at."""
    if model_cfg.position == "learned":
        return model_cfg.max_seq_len
    if (source / MANIFEST).is_file():
        return int(read_manifest(source).get("config", {}).get("trainer", {}).get("seq_len", RELATIVE_MAX_LENGTH))
    return RELATIVE_MAX_LENGTH


def export_checkpoint(source: str | Path, out: str | Path, max_shard_size: str = "5GB",
                      dtype: Optional[torch.dtype] = None) -> Path:
    from scaletrain.inference.load import load_model

    from scaletrain.data.tasks import read_label_file

    loaded = load_model(source)
    folder = write_hf_folder(loaded.model, loaded.tokenizer, out, model_max_length(loaded.model_cfg, loaded.source),
                             max_shard_size, dtype, id2label=read_label_file(loaded.source))
    log.info("exported %s to %s", loaded.source, folder)
    return folder


def cli(argv: list[str]) -> int:
    from scaletrain.cli import ArgumentParser

    parser = ArgumentParser(prog="scaletrain export", description="Write a checkpoint as a Hugging Face folder.")
    parser.add_argument("source", help="a run folder (its latest complete checkpoint) or a checkpoint step-* folder")
    parser.add_argument("--out", required=True, help="the folder to write (must not exist or be empty)")
    parser.add_argument("--max-shard-size", default="5GB", help="split model.safetensors above this (default 5GB)")
    parser.add_argument("--dtype", choices=sorted(PRECISION_DTYPES), default=None, help="cast the weights (default: as saved)")
    args = parser.parse_args(argv)
    source = Path(args.source).expanduser()
    if not source.exists():
        raise UserError(f"{args.source} does not exist; pass a run folder or a checkpoint step-* folder")
    folder = export_checkpoint(source, args.out, args.max_shard_size, PRECISION_DTYPES.get(args.dtype))
    print(f"exported {source} to {folder}")
    return 0
