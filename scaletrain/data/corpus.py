"""Corpora: the built-in one (CPython's own English prose, no download) and readers for users' files.

A corpus is a stream of documents (str) plus a content fingerprint, so everything derived from it
(tokenizer, token shards) can be cached under a key that changes exactly when the text changes.
Documents go to the validation split by a hash of their text, so the split does not depend on the
order files are listed in or on how many workers read them."""

from __future__ import annotations

import ast
import contextlib
import functools
import glob
import io
import itertools
import gzip
import hashlib
import json
import logging
import os
import sys
import sysconfig
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Tuple

from scaletrain.errors import DataError, one_line

log = logging.getLogger(__name__)

TEXT_SUFFIXES = {".txt", ".text", ".md", ".rst", ""}
JSONL_SUFFIXES = {".jsonl", ".json", ".ndjson"}
PARQUET_SUFFIXES = {".parquet"}
SPLITS = ("train", "validation")
_BUILTIN_VERSION = 1  # bump when the extraction below changes what documents come out
# Standard-library folders that are not prose-bearing library code (tests, IDLE, demos) or not stdlib.
_STDLIB_SKIP = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo",
                "ensurepip", "__pycache__", "tkinter"}


Report = Callable[[int], None]  # a reader calls it with the bytes of its file consumed so far


@dataclass
class Corpus:
    name: str
    fingerprint: str  # sha256 over the content (and the reading options that change the documents)
    _read: Callable[[], Iterator[str]] = field(repr=False)
    # Files read one at a time (a prepare resumes after the last finished one); empty: one unit, _read.
    files: List[Path] = field(default_factory=list, repr=False)
    _read_file: Optional[Callable[[Path, Report], Iterator[str]]] = field(default=None, repr=False)

    def documents(self) -> Iterator[str]:
        return self._read()

    def units(self) -> List[Tuple[str, int, Callable[[Report], Iterator[str]]]]:
        """(name, bytes on disk, read(report) -> documents) per input file, in order."""
        if not self.files or self._read_file is None:
            return [(self.name, 0, lambda report: self._read())]
        return [(str(path), path.stat().st_size, functools.partial(self._read_file, path)) for path in self.files]


def is_validation(text: str, val_fraction: float) -> bool:
    """Deterministic, order-free split: the first 8 bytes of the text's hash as a uniform draw."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64 < val_fraction


# ----------------------------------------------------------------------------- the built-in corpus

def _module_docstrings(path: Path) -> str:
    """All docstrings of one stdlib source file (module, classes, functions), blank-line separated."""
    try:
        with warnings.catch_warnings():  # newer Pythons warn about old escape sequences in some modules
            warnings.simplefilter("ignore")
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    except (SyntaxError, ValueError):
        return ""
    parts = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            docstring = ast.get_docstring(node)
            if docstring and len(docstring) > 40:  # one-liners like "Return x." carry little prose
                parts.append(docstring)
    return "\n\n".join(parts)


def _builtin_sources() -> List[Path]:
    """pydoc_data/topics.py, then the stdlib's .py files in sorted order."""
    import pydoc_data.topics

    root = Path(sysconfig.get_paths()["stdlib"])
    sources = [Path(pydoc_data.topics.__file__)]
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = sorted(d for d in subdirectories if d not in _STDLIB_SKIP)
        sources += [Path(directory) / name for name in sorted(files) if name.endswith(".py")]
    return sources


@functools.lru_cache(maxsize=1)
def builtin_sourced_documents() -> tuple:
    """(source, document): pydoc topics (sorted by name) as "pydoc/<topic>", then one document per stdlib
    module with its docstrings (sorted by path) as its path under the stdlib ("email/header.py"). Parsed with
    `ast`, never imported, so it is deterministic and has no side effects (~2 MB)."""
    from pydoc_data.topics import topics

    root = Path(sysconfig.get_paths()["stdlib"])
    documents = [(f"pydoc/{name}", topics[name].strip()) for name in sorted(topics)]
    documents += [(path.relative_to(root).as_posix(), _module_docstrings(path)) for path in _builtin_sources()[1:]]
    return tuple((source, document) for source, document in documents if document.strip())


def builtin_documents() -> tuple:
    return tuple(document for _, document in builtin_sourced_documents())


def _builtin_corpus() -> Corpus:
    # The fingerprint hashes the source files themselves (fast), so a cached run never parses them.
    hasher = hashlib.sha256(f"builtin-v{_BUILTIN_VERSION}".encode())
    for path in _builtin_sources():
        hasher.update(path.name.encode() + b"\0" + path.read_bytes())
    return Corpus(name=f"builtin-py{sys.version_info.major}.{sys.version_info.minor}",
                  fingerprint=hasher.hexdigest(), _read=lambda: iter(builtin_documents()))


# ----------------------------------------------------------------------------- users' files

def resolve_files(spec: str, option: str = "data.corpus") -> List[Path]:
    """A file, a directory (recursive, sorted) or a glob -> sorted list of files; `option` names the setting
    in messages."""
    path = Path(os.path.expanduser(spec))
    if any(char in spec for char in "*?["):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"{option} glob {spec!r} matches no file; check the pattern")
        return files
    if not path.exists():
        raise DataError(f"{option} path {spec} does not exist; pass an existing file, directory or glob "
                        f"(or {option}=builtin)")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise DataError(f"{option} directory {spec} contains no file; add text/jsonl files")
        return files
    return [path]


COMPRESSED_SUFFIXES = {".gz", ".zst", ".zstd"}
_REPORT_EVERY = 4096  # lines between progress reports


def inner_suffix(path: Path) -> str:
    """data.jsonl.gz -> .jsonl: the format under the compression."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED_SUFFIXES:
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


@contextlib.contextmanager
def open_input(path: Path):
    """-> (binary stream of the decompressed bytes, the raw file: raw.tell() is the progress on disk)."""
    with open(path, "rb") as raw:
        suffix = path.suffix.lower()
        if suffix == ".gz":
            with gzip.GzipFile(fileobj=raw) as stream:
                yield stream, raw
        elif suffix in (".zst", ".zstd"):
            try:
                import zstandard
            except ImportError:
                raise DataError(f"{path} is zstd-compressed; pip install zstandard (or scaletrain[zstd])") from None
            with zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True) as stream:
                yield io.BufferedReader(stream), raw
        else:
            yield raw, raw


def _read_all(path: Path) -> bytes:
    with open_input(path) as (stream, _):
        return _checked_read(path, stream.read)


def _checked_read(path: Path, read):
    try:
        return read()
    except (OSError, EOFError) as error:  # gzip.BadGzipFile is an OSError; zstd raises ZstdError (OSError-like)
        raise DataError(f"{path} cannot be decompressed ({one_line(error)}); re-download or remove it") from None
    except Exception as error:
        if type(error).__name__ == "ZstdError":
            raise DataError(f"{path} cannot be decompressed ({one_line(error)}); re-download or remove it") from None
        raise


def _lines(path: Path, report: Report) -> Iterator[bytes]:
    with open_input(path) as (stream, raw):
        iterator = iter(stream)
        for number in itertools.count(1):
            line = _checked_read(path, lambda: next(iterator, None))
            if line is None:
                break
            if number % _REPORT_EVERY == 0:
                report(raw.tell())
            yield line
    report(path.stat().st_size)


def detect_format(files: List[Path], format: str) -> str:
    if format != "auto":
        return format
    suffixes = {inner_suffix(p) for p in files}
    if suffixes <= JSONL_SUFFIXES:
        return "jsonl"
    if suffixes <= PARQUET_SUFFIXES:
        return "parquet"
    if any(p.name == "dataset_info.json" for p in files):
        return "hf_disk"
    structured = sorted(suffixes & (JSONL_SUFFIXES | PARQUET_SUFFIXES))
    if structured:  # read as text, their records' JSON / bytes would become the documents
        others = ", ".join(sorted(suffixes - set(structured)))
        raise DataError(f"the corpus mixes {', '.join(structured)} files with {others} files; put each format in its "
                        f"own folder (or name one with data.format)")
    return "text"


def _decode(path: Path, data: bytes, errors: str, replaced: Optional[list] = None) -> str:
    """`replaced` (a one-item counter) collects the count instead of logging it per call."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    bad = _count_undecodable(data)
    if errors == "strict":
        raise DataError(f"{path} has {bad} undecodable bytes (not UTF-8); re-encode it as UTF-8 or set "
                        f"data.decode_errors=replace")
    if replaced is None:
        log.warning("%s: replaced %d undecodable bytes with U+FFFD", path, bad)
    else:
        replaced[0] += bad
    return data.decode("utf-8", errors="replace")


def _count_undecodable(data: bytes) -> int:
    count, position = 0, 0
    while True:
        try:
            data[position:].decode("utf-8")
            return count
        except UnicodeDecodeError as error:
            count += error.end - error.start
            position += error.end


def _text_file(path: Path, split_blank_lines: bool, errors: str, report: Report) -> Iterator[str]:
    if not split_blank_lines:  # the file is one document: it is in memory once anyway
        yield _decode(path, _read_all(path), errors).strip()
        report(path.stat().st_size)
        return
    # A block is text between blank (or whitespace-only) lines; the lines themselves are no documents.
    block, replaced = [], [0]
    for line in itertools.chain(_lines(path, report), [b"\n"]):
        if line.strip(b" \t\r\n"):
            block.append(line)
        elif block:
            text = _decode(path, b"".join(block), errors, replaced).strip()
            block = []
            if text:
                yield text
    if replaced[0]:
        log.warning("%s: replaced %d undecodable bytes with U+FFFD", path, replaced[0])


def _text(value, where: str, text_field: str) -> str:
    """A record's text; null, numbers, lists (anything but a string) would train on their repr: refuse."""
    if isinstance(value, str):
        return value
    kind = "null" if value is None else type(value).__name__
    raise DataError(f"{where}: field {text_field!r} is {kind}, not a string; fix or remove the record, or set "
                    f"data.text_field to the field holding the text")


def _jsonl_file(path: Path, text_field: str, errors: str, report: Report) -> Iterator[str]:
    replaced = [0]
    for line_number, raw_line in enumerate(_lines(path, report), 1):
        line = _decode(path, raw_line, errors, replaced)
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{line_number} is not valid JSON ({error.msg}); fix or remove the "
                            f"line") from None
        if not isinstance(record, dict) or text_field not in record:
            raise DataError(f"{path}:{line_number} has no field {text_field!r}; set data.text_field to the "
                            f"field holding the text")
        yield _text(record[text_field], f"{path}:{line_number}", text_field)
    if replaced[0]:
        log.warning("%s: replaced %d undecodable bytes with U+FFFD", path, replaced[0])


def _parquet_file(path: Path, text_field: str, report: Report) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading parquet needs pyarrow; pip install pyarrow (or datasets)") from None
    handle = pq.ParquetFile(path)
    if text_field not in handle.schema_arrow.names:
        raise DataError(f"{path} has no column {text_field!r} (columns: {', '.join(handle.schema_arrow.names)}); "
                        f"set data.text_field")
    rows, size, done = max(handle.metadata.num_rows, 1), path.stat().st_size, 0
    for batch in handle.iter_batches(batch_size=1024, columns=[text_field]):  # one batch in memory at a time
        for row, text in enumerate(batch.column(0).to_pylist(), done):
            yield _text(text, f"{path} row {row}", text_field)
        done += batch.num_rows
        report(size * done // rows)


def _hf_disk_documents(folder: Path, text_field: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise DataError("reading a saved Hugging Face dataset needs the datasets package; pip install "
                        "datasets") from None
    dataset = datasets.load_from_disk(str(folder))
    if isinstance(dataset, datasets.DatasetDict):
        dataset = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
    if text_field not in dataset.column_names:
        raise DataError(f"{folder} has no column {text_field!r} (columns: {', '.join(dataset.column_names)}); "
                        f"set data.text_field")
    for start in range(0, len(dataset), 1000):
        for row, text in enumerate(dataset[start:start + 1000][text_field], start):
            yield _text(text, f"{folder} row {row}", text_field)


def _ignore(_: int) -> None:
    pass


def _fingerprint_files(files: List[Path], options: str) -> str:
    hasher = hashlib.sha256(options.encode())
    for path in files:
        hasher.update(str(path.name).encode() + b"\0")
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                hasher.update(chunk)
    return hasher.hexdigest()


def load_corpus(spec: str = "builtin", format: str = "auto", text_field: str = "text",
                split_blank_lines: bool = False, decode_errors: str = "strict") -> Corpus:
    if spec == "builtin":
        return _builtin_corpus()
    files = resolve_files(spec)
    format = detect_format(files, format)
    options = f"{format}|{text_field}|{split_blank_lines}|{decode_errors}"
    fingerprint = _fingerprint_files(files, options)
    name = Path(os.path.expanduser(spec.split("*")[0])).name or "corpus"
    readers = {"text": lambda path, report: _text_file(path, split_blank_lines, decode_errors, report),
               "jsonl": lambda path, report: _jsonl_file(path, text_field, decode_errors, report),
               "parquet": lambda path, report: _parquet_file(path, text_field, report)}
    if format in readers:
        read_file = readers[format]
        read = lambda: itertools.chain.from_iterable(read_file(path, _ignore) for path in files)  # noqa: E731
        return Corpus(name=name, fingerprint=fingerprint, _read=read, files=files, _read_file=read_file)
    folder = Path(os.path.expanduser(spec))
    folder = folder if folder.is_dir() else folder.parent
    read = lambda: _hf_disk_documents(folder, text_field)  # noqa: E731
    return Corpus(name=name, fingerprint=fingerprint, _read=read)


def corpus_from_config(data_cfg) -> Corpus:
    return load_corpus(data_cfg.corpus, data_cfg.format, data_cfg.text_field, data_cfg.split_blank_lines,
                       data_cfg.decode_errors)


def settle_held(held: dict, routed: dict, corpus_name: str) -> None:
    """At the end of a corpus. Each split held its latest document back (`held`, of the `routed` counts):
    they go to their split, or one moves across when the other split got none (a single document serves
    both), so a tiny corpus that hashed all its documents to one side still has both splits."""
    train, validation = held["train"], held["validation"]
    if train is None and validation is None:
        raise DataError(f"corpus {corpus_name} is empty (no non-blank document); point data.corpus at files "
                        f"with text")
    if train is None:
        log.info("corpus %s: every document hashed into validation; training on one of them", corpus_name)
        held["train"] = validation
        held["validation"] = validation if routed["validation"] == 1 else None
    if validation is None:
        log.info("corpus %s: no document hashed into validation; holding out the last one", corpus_name)
        held["validation"] = train
        held["train"] = train if routed["train"] == 1 else None


def split_stream(corpus: Corpus, val_fraction: float) -> Iterator[Tuple[str, str]]:
    """(split, document) in corpus order, streamed: memory holds one document per split, whatever the
    corpus size. Empty documents are dropped and counted in the log."""
    held: dict = {split: None for split in SPLITS}
    routed, empty = {split: 0 for split in SPLITS}, 0
    for document in corpus.documents():
        if not document.strip():
            empty += 1
            continue
        split = "validation" if is_validation(document, val_fraction) else "train"
        routed[split] += 1
        previous, held[split] = held[split], document
        if previous is not None:
            yield split, previous
    if empty:
        log.info("corpus %s: skipped %d empty documents", corpus.name, empty)
    settle_held(held, routed, corpus.name)
    for split in SPLITS:
        if held[split] is not None:
            yield split, held[split]


def train_documents(corpus: Corpus, val_fraction: float) -> Iterator[str]:
    """The train split, streamed (a tokenizer trains on it without holding the corpus in memory)."""
    return (document for split, document in split_stream(corpus, val_fraction) if split == "train")


def split_documents(corpus: Corpus, val_fraction: float) -> tuple[List[str], List[str]]:
    """(train, validation) document lists, for corpora that fit in memory."""
    splits: dict = {split: [] for split in SPLITS}
    for split, document in split_stream(corpus, val_fraction):
        splits[split].append(document)
    return splits["train"], splits["validation"]
