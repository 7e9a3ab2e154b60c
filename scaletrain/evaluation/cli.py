"""`scaletrain eval <run | step | HF dir> --data PATH`: the perplexity of a left-to-right LM on a corpus (a
text / JSONL / parquet file, a glob, a folder, or "builtin") or on a split of a folder written by `scaletrain
data prepare` (made with the model's own tokenizer). Documents are tokenized as prepare packs them: the
text, then the end-of-document token."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from scaletrain.cli import ArgumentParser
from scaletrain.errors import InputError


def _parser() -> ArgumentParser:
    parser = ArgumentParser(prog="scaletrain eval", description="Evaluate a trained model: perplexity on a corpus.")
    parser.add_argument("path", help="a run folder, a checkpoint step-* folder or a Hugging Face folder")
    parser.add_argument("--data", required=True,
                        help='a corpus (file, glob, folder or "builtin") or a prepared folder')
    parser.add_argument("--split", default="validation", choices=("train", "validation"),
                        help="the split of a prepared folder (default validation)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens of context per window (default: the "
                                                                    "model's window, else 1024)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens")
    parser.add_argument("--out", help="also write the result as JSON to this file")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def token_stream(data: str, split: str, tokenizer) -> tuple[np.ndarray, str]:
    """-> (the tokens, what they are) for a prepared folder's split, or a corpus tokenized here."""
    from scaletrain.data.corpus import load_corpus
    from scaletrain.data.prepare import open_prepared

    path = Path(os.path.expanduser(data))
    if (path / "metadata.json").is_file():
        prepared = open_prepared(path, tokenizer)  # refuses shards of another tokenizer, in one line
        return getattr(prepared, split).tokens, f"{path} ({split} split)"
    corpus = load_corpus(data)
    eod, ids = tokenizer.eod_id, []
    for document in corpus.documents():
        if document.strip():
            ids.extend(tokenizer.encode(document) + [eod])
    return np.asarray(ids, dtype=np.int64), f"corpus {corpus.name}"


def cli(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    for name in ("seq_len", "batch_size", "max_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InputError(f"--{name.replace('_', '-')}={value} must be at least 1")

    from scaletrain.evaluation.perplexity import perplexity
    from scaletrain.inference.generate import context_length
    from scaletrain.inference.load import load_model

    loaded = load_model(args.path, args.device)
    if loaded.family != "gpt":
        raise InputError(f"perplexity needs a left-to-right LM (family gpt); {args.path} is family {loaded.family}")
    window = context_length(loaded.model_cfg)
    if args.seq_len is not None and window is not None and args.seq_len > window:
        raise InputError(f"--seq-len={args.seq_len} exceeds the model's window of {window} tokens; lower it")
    window = args.seq_len or window or 1024
    stream, what = token_stream(args.data, args.split, loaded.tokenizer)
    if args.max_tokens is not None:
        stream = stream[:args.max_tokens]
    if len(stream) < 2:
        raise InputError(f"{what} holds {len(stream)} tokens; perplexity needs at least 2")
    device = next(loaded.model.parameters()).device
    result = perplexity(loaded.model, stream, window, args.batch_size, device, progress=not args.no_progress)
    print(f"{args.path} on {what}: perplexity {result.perplexity:.3f} (loss {result.loss:.4f} nats/token over "
          f"{result.tokens:,} tokens, {result.windows} windows of up to {window})")
    if args.out:
        record = dict(model=str(args.path), data=what, window=window, **vars(result))
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    return 0
