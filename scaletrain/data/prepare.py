"""`scaletrain data prepare`: tokenize a corpus in worker processes into memory-mapped token shards, and
`build_datasets(cfg)`, which the trainer calls to get (tokenizer, train, validation) from the cache.

    <out>/train.bin .idx  [train-00001.bin .idx ...]  validation.bin .idx  tokenizer.json  metadata.json

Each split is written in shards of at most data.max_shard_bytes (data/shards.py), listed in metadata.json.

A prepare writes into `<out>.partial` beside the folder and renames it to `<out>` only when complete, so
an existing `<out>` stays valid until the new one replaces it, whatever happens meanwhile. metadata.json
is written last and names the tokenizer hash and the input fingerprint, so a folder is complete exactly
when it has a metadata.json whose key matches; re-running with the same inputs does nothing, and a killed
run leaves `<out>.partial` with a `progress.json` journal from which the next run resumes after the last
finished input file. A file lock beside the folder (`.<out>.lock`) serializes ranks (or users) preparing
the same folder."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

import numpy as np

from scaletrain.data.corpus import SPLITS, Corpus, corpus_from_config, train_documents
from scaletrain.data.indexed import CHECKSUM, IndexedTokens, IndexedWriter, scan_file, token_dtype
from scaletrain.data.shards import ShardedWriter, open_split
from scaletrain.data.streaming import JOURNAL, StreamingPrepare, atomic_write_text, load_journal
from scaletrain.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from scaletrain.durable import fsync_dir
from scaletrain.errors import DataError

if TYPE_CHECKING:  # data.mixture imports this module
    from scaletrain.data.mixture import Mixture

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
DEFAULT_MAX_SHARD_BYTES = 1 << 30  # data.max_shard_bytes


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    train: IndexedTokens
    validation: IndexedTokens
    directory: Path
    metadata: dict
    mixture: Optional["Mixture"] = None  # data.mixture: every source (train/validation are the first's)


# ----------------------------------------------------------------------------- prepare

def _key(corpus: Corpus, tokenizer: Tokenizer, val_fraction: float, shard_format: str = "scaletrain",
         dedup: bool = False) -> dict:
    return {"format_version": FORMAT_VERSION, "input_fingerprint": corpus.fingerprint,
            "tokenizer_hash": tokenizer.hash, "val_fraction": val_fraction, "shard_format": shard_format,
            "dedup": dedup}


def _read_metadata(directory: Path) -> Optional[dict]:
    path = directory / "metadata.json"
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _up_to_date(directory: Path, key: dict, verify: str = "size", warn: bool = False) -> bool:
    metadata = _read_metadata(directory)
    if metadata is not None:
        metadata.setdefault("shard_format", "scaletrain")  # folders written before these options existed
        metadata.setdefault("dedup", False)
    if metadata is None or any(metadata.get(name) != value for name, value in key.items()):
        return False
    problem = shard_problem(directory, metadata, verify)
    if problem:  # a shard damaged after the fact is rebuilt, not trusted
        if warn:
            log.warning("%s; rebuilding %s", problem, directory)
        return False
    return True


# ----------------------------------------------------------------------------- verification

def shard_problem(directory: Path, metadata: dict, verify: str) -> Optional[str]:
    """What is wrong with the shards of a prepared folder, or None. Sizes always (a stat per file);
    verify="full" reads every byte once: the checksums metadata.json records (folders prepared before
    they were recorded have none) and every token id below the vocabulary."""
    files = metadata.get("files") or {}
    dtype = np.dtype(metadata["dtype"])
    expected = {f"{shard['prefix']}.bin": shard["tokens"] * dtype.itemsize
                for split in SPLITS for shard in split_shards(metadata, split)}
    expected.update({name: entry["bytes"] for name, entry in files.items()})
    for name, size in expected.items():
        path = directory / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes but metadata.json records {size} (truncated or replaced)"
    if verify != "full":
        return None
    for name in sorted(expected):
        path, is_tokens = directory / name, name.endswith(".bin")
        checksum, bad = scan_file(path, dtype=dtype, vocab_size=metadata["vocab_size"] if is_tokens else None)
        if name in files and checksum.hexdigest() != files[name][CHECKSUM]:
            return (f"{path} does not match its checksum in metadata.json (changed after prepare: overwritten "
                    f"or damaged)")
        if bad is not None:
            return (f"{path} holds token id {bad}, outside the vocabulary of {metadata['vocab_size']} tokens "
                    f"(damaged, or not made with this folder's tokenizer)")
    return None


def _rebuild_hint(directory: Path) -> str:
    return f"rebuild it: re-run the scaletrain data prepare that made {directory} with --verify full"


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------- replacing a folder whole

# What a prepare writes into its folder; ".partial" files and the old in-folder ".lock" besides. A folder
# holding anything else is not ours to replace or delete.
_OWN_FILES = {f"{split}.{ext}" for split in SPLITS for ext in ("bin", "idx")} | {
    "tokenizer.json", "metadata.json", JOURNAL, ".lock"}
_OWN_SHARD = re.compile(r"(%s)-\d{5}\.(bin|idx)" % "|".join(SPLITS))  # the shards after each split's first


def _own_file(name: str) -> bool:
    return name in _OWN_FILES or ".partial" in name or _OWN_SHARD.fullmatch(name) is not None


def staging_dir(directory: Path) -> Path:
    """Where a prepare of `directory` writes until it is complete."""
    return directory.with_name(directory.name + ".partial")


def _previous_dir(directory: Path) -> Path:
    return directory.with_name(directory.name + ".previous")


def _lock_path(directory: Path) -> Path:
    # Beside the folder, not in it: the folder itself is renamed away when replaced.
    return directory.with_name(f".{directory.name}.lock")


def _check_only_prepared_files(folder: Path, fix: str) -> None:
    """A folder prepare replaces or deletes must hold nothing else."""
    if not folder.is_dir():
        raise DataError(f"{folder} is a file where scaletrain data prepare needs a folder; {fix}")
    foreign = sorted(entry.name for entry in folder.iterdir()
                     if not entry.is_file() or not _own_file(entry.name))
    if foreign:
        raise DataError(f"{folder} holds {', '.join(foreign[:3])}, which scaletrain data prepare did not write; "
                        f"{fix}")


def _remove_prepared(folder: Path) -> None:
    """Deletes a folder a prepare wrote (leftovers or a replaced one), never one holding other files."""
    if folder.exists():
        _check_only_prepared_files(folder, f"move it away (prepare needs {folder.name} for its own files)")
        shutil.rmtree(folder)


def _recover(directory: Path) -> None:
    """A prepare killed between the two renames of `_swap_in` left the old folder as `.previous`."""
    previous = _previous_dir(directory)
    if previous.exists() and not directory.exists():
        os.replace(previous, directory)
    else:
        _remove_prepared(previous)


def _swap_in(staging: Path, directory: Path) -> None:
    """The complete `staging` becomes `directory`; the folder it replaces is deleted only afterwards (a
    trainer that still maps its shards keeps reading them)."""
    previous = _previous_dir(directory)
    if directory.exists():
        os.replace(directory, previous)
    os.replace(staging, directory)
    fsync_dir(directory.parent)
    _remove_prepared(previous)


def _shard_dtype(shard_format: str, vocab_size: int) -> np.dtype:
    from scaletrain.data.megatron import megatron_dtype

    return megatron_dtype(vocab_size) if shard_format == "megatron" else token_dtype(vocab_size)


def _shard_reader(shard_format: str, vocab_size: Optional[int]):
    """-> open(prefix) of one shard."""
    if shard_format == "megatron":
        from scaletrain.data.megatron import MegatronTokens

        return lambda prefix: MegatronTokens(prefix, vocab_size=vocab_size)
    return lambda prefix: IndexedTokens(prefix, vocab_size)


def _shard_writer(shard_format: str, vocab_size: int, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
    """-> factory(prefix, resume_at) of the split writers: shards of at most max_shard_bytes each."""
    dtype = _shard_dtype(shard_format, vocab_size)
    if shard_format == "megatron":
        from scaletrain.data.megatron import MegatronWriter as writer_class
    else:
        writer_class = IndexedWriter
    max_tokens = max(1, max_shard_bytes // dtype.itemsize)
    make_writer = lambda prefix, resume_at: writer_class(prefix, dtype, resume_at)  # noqa: E731
    read_shard = _shard_reader(shard_format, None)
    return lambda prefix, resume_at: ShardedWriter(prefix, max_tokens, make_writer, read_shard, resume_at)


def split_shards(metadata: dict, split: str) -> List[dict]:
    """The shards of a split in order ({"prefix", "tokens", "documents"}); one named after the split in
    folders prepared before shards were bounded."""
    entry = metadata["splits"][split]
    return entry.get("shards") or [{"prefix": split, "tokens": entry["tokens"], "documents": entry["documents"]}]


def _open_shards(directory: Path, metadata: dict, split: str):
    names = [shard["prefix"] for shard in split_shards(metadata, split)]
    return open_split(directory / split, names, _shard_reader(metadata.get("shard_format"), metadata["vocab_size"]),
                      metadata["vocab_size"])


def prepare(corpus: Corpus, tokenizer: Tokenizer, directory: Path, val_fraction: float = 0.02,
            num_workers: int = 2, progress: bool = True, shard_format: str = "scaletrain",
            dedup: bool = False, verify: str = "size", max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> dict:
    """Tokenizes `corpus` into `directory` unless it already holds this exact (corpus, tokenizer, split)
    and its shards pass `verify` (size | full); returns the metadata. Safe to call from every rank at
    once. Streams (data/streaming.py): bounded memory, and a killed prepare resumes after its last durable
    input file. shard_format="megatron" writes Megatron-LM .bin/.idx pairs (data/megatron.py); dedup drops
    exact duplicate documents."""
    # The real folder (not a symlink to it, nor "."): it is renamed, and its siblings are written.
    directory = Path(directory).expanduser().resolve()
    key = _key(corpus, tokenizer, val_fraction, shard_format, dedup)
    if _up_to_date(directory, key, verify):
        return _read_metadata(directory)
    with _file_lock(_lock_path(directory)):
        _recover(directory)
        if _up_to_date(directory, key, verify, warn=True):  # another process finished it while we waited
            return _read_metadata(directory)
        if directory.exists():
            _check_only_prepared_files(directory, "a prepare replaces the whole folder, so pass a new or empty one")
        staging = staging_dir(directory)
        if not _up_to_date(staging, key):  # else a complete prepare was killed just before its swap
            if load_journal(staging, key) is None:  # another attempt's leftovers: nothing to resume
                _remove_prepared(staging)
            staging.mkdir(parents=True, exist_ok=True)
            writers = _shard_writer(shard_format, tokenizer.vocab_size, max_shard_bytes)
            _prepare_into(staging, corpus, tokenizer, key, val_fraction, num_workers, progress, shard_format, dedup,
                          writers)
        metadata = _read_metadata(staging)
        _swap_in(staging, directory)
    splits = metadata["splits"]
    tokens, seconds = sum(s["tokens"] for s in splits.values()), metadata["seconds"]
    log.info("prepared %s: %d documents, %d tokens in %.1fs (%.0f tokens/s, %d workers)", directory,
             sum(s["documents"] for s in splits.values()), tokens, seconds, tokens / max(seconds, 1e-9),
             num_workers)
    return metadata


def _prepare_into(staging: Path, corpus: Corpus, tokenizer: Tokenizer, key: dict, val_fraction: float,
                  num_workers: int, progress: bool, shard_format: str, dedup: bool, writers) -> None:
    started = time.perf_counter()
    run = StreamingPrepare(corpus, tokenizer, staging, key, val_fraction, writers, dedup).run(num_workers, progress)
    splits = run["splits"]
    seconds = time.perf_counter() - started
    atomic_write_text(staging / "tokenizer.json", tokenizer.json)
    metadata = dict(key, corpus=corpus.name, vocab_size=tokenizer.vocab_size,
                    dtype=_shard_dtype(shard_format, tokenizer.vocab_size).name, eod_id=tokenizer.eod_id,
                    splits=splits, files=run["files"], duplicates=run["duplicates"], seconds=round(seconds, 3),
                    complete=True)
    atomic_write_text(staging / "metadata.json", json.dumps(metadata, indent=2))


def open_prepared(directory: Path, tokenizer: Optional[Tokenizer] = None, verify: str = "size") -> PreparedData:
    """Opens a complete prepared directory; with `tokenizer`, checks the shards were made with it;
    verify="full" reads every byte against the checksums (see shard_problem)."""
    directory = Path(os.path.expanduser(str(directory)))
    if not directory.is_dir():
        interrupted = (f" (an interrupted prepare left {staging_dir(directory).name})"
                       if staging_dir(directory).is_dir() else "")
        raise DataError(f"prepared data directory {directory} does not exist{interrupted}; run scaletrain data "
                        f"prepare --out {directory} first")
    metadata = _read_metadata(directory)
    if metadata is None or not metadata.get("complete"):
        raise DataError(f"{directory} has no complete metadata.json (an interrupted prepare?); re-run "
                        f"scaletrain data prepare --out {directory}")
    if tokenizer is None:
        tokenizer = load_tokenizer(str(directory / "tokenizer.json"))
    if metadata["tokenizer_hash"] != tokenizer.hash:
        raise DataError(f"the shards in {directory} were made with tokenizer {metadata['tokenizer_hash'][:12]} "
                        f"but this run uses {tokenizer.hash[:12]} ({tokenizer.source}); re-run scaletrain data "
                        f"prepare with this tokenizer or set data.tokenizer={directory / 'tokenizer.json'}")
    splits = {split: _open_shards(directory, metadata, split) for split in SPLITS}  # they check bin vs idx
    if verify == "full":
        log.info("data.verify=full: reading every byte of the shards in %s", directory)
        if not metadata.get("files"):
            log.warning("%s records no checksums (prepared by an older scaletrain): its sizes and token ids are "
                        "checked, its contents cannot be", directory)
    problem = shard_problem(directory, metadata, verify)
    if problem:
        raise DataError(f"{problem}; {_rebuild_hint(directory)}")
    return PreparedData(tokenizer, splits["train"], splits["validation"], directory, metadata)


def check_megatron(prefix: Path, tokenizer_spec: str) -> str:
    """`--check` on a Megatron-LM prefix: its index's structure and the .bin size always (MegatronTokens);
    with --tokenizer, every token id below that vocabulary (Megatron records neither tokenizer nor checksums)."""
    from scaletrain.data.megatron import MegatronTokens, check_vocab_fits

    dataset = MegatronTokens(prefix)
    counts = f"{dataset.num_documents:,} documents {dataset.num_tokens:,} {dataset.dtype.name} tokens"
    if tokenizer_spec == "train":
        return (f"{prefix}: a Megatron-LM prefix whose index and .bin agree ({counts}); pass --tokenizer PATH to "
                f"also check every token id against the vocabulary it was made with")
    tokenizer = load_tokenizer(tokenizer_spec)
    check_vocab_fits(dataset, tokenizer)
    bad = scan_file(Path(f"{prefix}.bin"), dtype=dataset.dtype, vocab_size=tokenizer.vocab_size)[1]
    if bad is not None:
        raise DataError(f"{prefix}.bin holds token id {bad}, outside the {tokenizer.vocab_size} tokens of "
                        f"{tokenizer.source}; name the tokenizer it was made with (--tokenizer PATH)")
    return f"{prefix}: ok, a Megatron-LM prefix with every token id below {tokenizer.vocab_size} ({counts})"


def check_prepared(directory: Path) -> str:
    """`scaletrain data prepare --check`: every byte of a prepared folder, whatever data.verify says."""
    metadata = open_prepared(directory).metadata
    problem = shard_problem(directory, metadata, "full")
    if problem:
        raise DataError(f"{problem}; {_rebuild_hint(directory)}")
    counts = ", ".join(f"{split} {v['documents']:,} documents {v['tokens']:,} tokens"
                       for split, v in metadata["splits"].items())
    if not metadata.get("files"):
        return (f"{directory}: sizes and token ids ok, but it records no checksums (prepared by an older "
                f"scaletrain), so its contents cannot be checked; prepare it again into a new folder to record "
                f"them ({counts})")
    return (f"{directory}: ok, {len(metadata['files'])} files match their checksums and every token id is below "
            f"{metadata['vocab_size']} ({counts})")


# ----------------------------------------------------------------------------- the trainer's entry point

def tokenizer_from_config(data_cfg, corpus: Corpus) -> Tokenizer:
    """data.tokenizer=train trains on the train split once and caches it by (kind, vocab, corpus hash)."""
    if data_cfg.tokenizer != "train":
        return load_tokenizer(data_cfg.tokenizer)
    key = f"{data_cfg.tokenizer_type}|{data_cfg.tokenizer_vocab}|{corpus.fingerprint}|{data_cfg.val_fraction}"
    folder = (Path(os.path.expanduser(data_cfg.cache_dir)) / "tokenizers" /
              f"{data_cfg.tokenizer_type}-{data_cfg.tokenizer_vocab}-{hashlib.sha256(key.encode()).hexdigest()[:16]}")
    path = folder / "tokenizer.json"
    if not path.is_file():
        with _file_lock(folder / ".lock"):
            if not path.is_file():
                # streamed into the trainer: it keeps word counts, never the corpus
                tokenizer = train_tokenizer(data_cfg.tokenizer_type, train_documents(corpus, data_cfg.val_fraction),
                                            data_cfg.tokenizer_vocab)
                atomic_write_text(path, tokenizer.json)
    try:
        tokenizer = load_tokenizer(str(path))
    except DataError:
        raise DataError(f"the cached tokenizer {path} is unreadable (damaged?); delete {folder} and run again "
                        f"to retrain it") from None
    tokenizer.source = f"{data_cfg.tokenizer_type} trained on {corpus.name} ({path})"
    return tokenizer


def prepared_cache_dir(data_cfg, corpus: Corpus, tokenizer: Tokenizer) -> Path:
    return (Path(os.path.expanduser(data_cfg.cache_dir)) / "datasets" /
            f"{corpus.name}-{corpus.fingerprint[:12]}-{tokenizer.hash[:12]}")


def build_datasets(cfg, progress: bool = True) -> PreparedData:
    """(tokenizer, train, validation) for a TrainConfig: a prepared directory or Megatron prefix
    (data.prepared), a weighted mixture (data.mixture), or the corpus prepared into cfg.data.cache_dir on
    first use, keyed by the content hashes of corpus and tokenizer."""
    data_cfg = cfg.data
    if data_cfg.mixture:
        from scaletrain.data.mixture import build_mixture

        return build_mixture(cfg, progress)
    if data_cfg.prepared:
        from scaletrain.data.megatron import is_megatron_prefix, open_megatron_prepared

        if is_megatron_prefix(Path(os.path.expanduser(data_cfg.prepared))):
            return open_megatron_prepared(data_cfg)
        tokenizer = None if data_cfg.tokenizer == "train" else load_tokenizer(data_cfg.tokenizer)
        return open_prepared(Path(data_cfg.prepared), tokenizer, data_cfg.verify)
    corpus = corpus_from_config(data_cfg)
    tokenizer = tokenizer_from_config(data_cfg, corpus)
    directory = prepared_cache_dir(data_cfg, corpus, tokenizer)
    prepare(corpus, tokenizer, directory, data_cfg.val_fraction, data_cfg.num_workers, progress,
            verify=data_cfg.verify, max_shard_bytes=data_cfg.max_shard_bytes)
    return open_prepared(directory, tokenizer)  # prepare just verified (or wrote) it: no second full read


# ----------------------------------------------------------------------------- CLI

def check_output_folder(directory: Path) -> None:
    """--out must be a folder or a path that can become one: not a file, not below a file, and in a
    writable folder (prepare builds <out>.partial beside it and renames it into place)."""
    for path in (directory, *directory.parents):
        if path.exists() and not path.is_dir():
            where = "is a file" if path == directory else f"lies below the file {path}"
            raise DataError(f"--out {directory} {where}; pass a folder for the prepared shards")
    parent = next(path for path in directory.resolve().parents if path.exists())
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DataError(f"--out {directory}: {parent} is not writable (prepare builds {directory.name}.partial "
                        f"beside {directory.name}); pass a folder inside one you can write to")


def _parser():
    from scaletrain.cli import ArgumentParser
    from scaletrain.configs.schema import DataConfig

    parser = ArgumentParser(prog="scaletrain data", description="Data pipeline commands.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{prepare}")
    prepare = commands.add_parser("prepare", help="tokenize a corpus into memory-mapped token shards",
                                  description="Tokenize a corpus into memory-mapped token shards.")
    target = prepare.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", help="output directory")
    target.add_argument("--check", metavar="DIR", help="verify a prepared folder (sizes, checksums, token ids) "
                                                        "or a Megatron-LM prefix (with --tokenizer: its token ids)")
    prepare.epilog = ("--format megatron writes Megatron-LM .bin/.idx shards (<out>/train, <out>/validation) "
                      "instead of scaletrain's; the input format is then --input-format.")
    defaults = DataConfig()
    for name in ("corpus", "format", "text_field", "decode_errors", "tokenizer", "tokenizer_type",
                 "tokenizer_vocab", "cache_dir", "num_workers", "val_fraction", "verify", "max_shard_bytes"):
        value = getattr(defaults, name)
        prepare.add_argument(f"--{name.replace('_', '-')}", dest=name, type=type(value), default=value,
                             help=f"data.{name} (default: {value})")
    prepare.add_argument("--split-blank-lines", action="store_true", help="one document per blank-line block")
    prepare.add_argument("--input-format", default="auto",
                         help="with --format megatron: the input's format (auto | text | jsonl | parquet | hf_disk)")
    prepare.add_argument("--dedup", action="store_true", help="drop exact duplicate documents (by content hash)")
    prepare.add_argument("--no-progress", action="store_true")
    return parser


def cli(argv: List[str]) -> int:
    from scaletrain.configs.schema import DataConfig

    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)  # stderr: errors only
    if args.check:
        from scaletrain.data.megatron import is_megatron_prefix

        target = Path(os.path.expanduser(args.check))
        print(check_megatron(target, args.tokenizer) if is_megatron_prefix(target) else check_prepared(target))
        return 0
    shard_format = "scaletrain"
    if args.format == "megatron":  # the output's format; the input's is --input-format
        shard_format, args.format = "megatron", args.input_format
    options = {f.name: getattr(args, f.name) for f in fields(DataConfig) if hasattr(args, f.name)}
    data_cfg = DataConfig(**options)
    directory = Path(os.path.expanduser(args.out))
    check_output_folder(directory)
    corpus = corpus_from_config(data_cfg)
    tokenizer = tokenizer_from_config(data_cfg, corpus)
    key = _key(corpus, tokenizer, data_cfg.val_fraction, shard_format, args.dedup)
    if _up_to_date(directory, key, data_cfg.verify):
        print(f"{directory} is up to date (corpus {corpus.fingerprint[:12]}, tokenizer {tokenizer.hash[:12]})")
        return 0
    metadata = prepare(corpus, tokenizer, directory, data_cfg.val_fraction, data_cfg.num_workers,
                       progress=not args.no_progress, shard_format=shard_format, dedup=args.dedup,
                       verify=data_cfg.verify, max_shard_bytes=data_cfg.max_shard_bytes)
    splits = metadata["splits"]
    print(f"prepared {directory}: vocab {tokenizer.vocab_size}, "
          + ", ".join(f"{s} {v['documents']} docs {v['tokens']} tokens" for s, v in splits.items())
          + (f", {metadata['duplicates']} duplicate documents dropped" if args.dedup else "")
          + f", {metadata['seconds']}s")
    return 0
