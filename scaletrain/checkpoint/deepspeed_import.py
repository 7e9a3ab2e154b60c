"""`scaletrain import-deepspeed <ds checkpoint dir> --out RUN_DIR [overrides]`: a checkpoint written by
DeepSpeed itself (engine.save_checkpoint, ZeRO 1-3, any dp size) as a scaletrain checkpoint.

DeepSpeed's own zero_to_fp32 merges the partitions of every rank into one fp32 state dict. Its names are
the wrapped module's: a prefix DeepSpeed users commonly add ("module.", "model.") is stripped when what
remains is exactly our model's names. The model config comes from the overrides (model=..., model.<field>=...),
as for `scaletrain train`. The result holds the weights only (a fresh optimizer state would be a silent
reset): start a run from it with model.init_from=RUN_DIR, export or evaluate it; resuming it is refused."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
from pathlib import Path
from typing import Optional, Sequence

import torch

from scaletrain.errors import CheckpointError

PREFIXES = ("", "module.", "model.", "module.model.", "_forward_module.")
MAX_LISTED = 6


def read_deepspeed_weights(ds_dir: Path, tag: Optional[str]) -> tuple[dict[str, torch.Tensor], str]:
    """(DeepSpeed's consolidated fp32 state dict, the tag read)."""
    from scaletrain.parallel.deepspeed import import_deepspeed

    import_deepspeed("cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if not ds_dir.is_dir():
        raise CheckpointError(f"import-deepspeed: {ds_dir} is not a folder; pass the folder engine.save_checkpoint wrote")
    if tag is None:
        latest = ds_dir / "latest"
        if not latest.is_file():
            raise CheckpointError(f"import-deepspeed: {ds_dir} has no 'latest' file; pass --tag (one of: "
                                  f"{', '.join(sorted(p.name for p in ds_dir.iterdir() if p.is_dir())) or 'none'})")
        tag = latest.read_text().strip()
    if not (ds_dir / tag).is_dir():
        raise CheckpointError(f"import-deepspeed: {ds_dir} has no checkpoint tag {tag}")
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # its progress bar would bury a one-line error
            state = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=tag)
    except (ValueError, FileNotFoundError, KeyError) as error:
        raise CheckpointError(f"import-deepspeed: {ds_dir}/{tag} is not a DeepSpeed ZeRO checkpoint "
                              f"zero_to_fp32 can read ({error})") from None
    return dict(state), tag


def match_names(state: dict[str, torch.Tensor], ours: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """The state renamed to our names (the first prefix under which every name is ours); shapes checked.
    Tied names (lm_head.weight next to tok_embeddings.weight) may be absent: load_state_dict ties them."""
    tied = {"lm_head.weight", "mlm_head.decoder.weight"}
    for prefix in PREFIXES:
        if all(key.startswith(prefix) for key in state):
            renamed = {key[len(prefix):]: value for key, value in state.items()}
            if set(renamed) <= set(ours) and set(ours) - set(renamed) <= tied:
                break
    else:
        stripped = {re.sub(r"^(module\.|model\.)+", "", key) for key in state}
        missing, unexpected = sorted(set(ours) - stripped - tied), sorted(stripped - set(ours))
        raise CheckpointError(
            f"import-deepspeed: {where} holds another model (missing: {', '.join(missing[:MAX_LISTED]) or '-'}; "
            f"unexpected: {', '.join(unexpected[:MAX_LISTED]) or '-'}); pass the model config it was trained "
            f"with (model=... model.<field>=...)")
    shapes = [f"{k} {list(v.shape)} vs {list(ours[k].shape)} here" for k, v in renamed.items()
              if tuple(v.shape) != tuple(ours[k].shape)]
    if shapes:
        raise CheckpointError(f"import-deepspeed: {where}: shape mismatch: {', '.join(shapes[:MAX_LISTED])}; "
                              f"pass the model config it was trained with (model.vocab_size=..., ...)")
    return renamed


def import_deepspeed_checkpoint(ds_dir: str | Path, out: str | Path, overrides: Sequence[str] = (),
                                tag: Optional[str] = None, tokenizer: Optional[str] = None) -> Path:
    """Writes <out>/checkpoints/step-N (N from DeepSpeed's global_stepN tag, else 0); returns that folder."""
    from dataclasses import asdict

    from scaletrain.checkpoint.manager import TOKENIZER, CheckpointManager
    from scaletrain.configs.store import compose_config
    from scaletrain.models.registry import build_model
    from scaletrain.parallel import materialize

    ds_dir, out = Path(ds_dir).expanduser(), Path(out).expanduser()
    cfg = compose_config(list(overrides) + [f"run_dir={out}"])
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pad_vocab_multiple=1))  # rows are final
    state, tag = read_deepspeed_weights(ds_dir, tag)
    model = materialize(build_model(cfg.model, device="meta"), "cpu", cfg.seed)
    weights = match_names(state, model.state_dict(), f"{ds_dir}/{tag}")
    model.load_state_dict(weights, strict=False)  # strict on names above; tied heads follow their table
    files = {}
    if tokenizer is not None:
        path = Path(tokenizer).expanduser()
        path = path / TOKENIZER if path.is_dir() else path
        if not path.is_file():
            raise CheckpointError(f"import-deepspeed: --tokenizer {tokenizer} is not a {TOKENIZER} file or a folder "
                                  f"holding one")
        files[TOKENIZER] = path.read_bytes()
    step = int(re.search(r"(\d+)$", tag).group(1)) if re.search(r"(\d+)$", tag) else 0
    manager = CheckpointManager(cfg.checkpoint, out, rank=0, world_size=1)
    metadata = {"config": asdict(cfg), "layout": "one process (imported from DeepSpeed)", "tokens": 0,
                "imported_from": {"deepspeed_checkpoint": str(ds_dir), "tag": tag}}
    manager.save(step, model, (), {}, metadata, files=files)
    manager.close()
    return manager.directory / f"step-{step:06d}"


def cli(argv: Sequence[str]) -> int:
    from scaletrain.cli import ArgumentParser

    parser = ArgumentParser(prog="scaletrain import-deepspeed",
                            description="a DeepSpeed checkpoint folder (ZeRO 1-3, any dp size) as a scaletrain run folder")
    parser.add_argument("ds_checkpoint", help="the folder engine.save_checkpoint wrote (holds 'latest')")
    parser.add_argument("--out", required=True, help="the run folder to write (checkpoints/step-N inside)")
    parser.add_argument("--tag", default=None, help="the checkpoint tag (default: the one 'latest' names)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json (or a folder with one) to keep with it")
    parser.add_argument("overrides", nargs="*", help="the model config: model=gpt_small model.vocab_size=...")
    args = parser.parse_intermixed_args(argv)
    step = import_deepspeed_checkpoint(args.ds_checkpoint, args.out, args.overrides, args.tag, args.tokenizer)
    print(f"imported {args.ds_checkpoint} into {step}; start a run from it with model.init_from={args.out}")
    return 0
