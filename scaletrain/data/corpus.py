"""Corpora: the built-in one (CPython's own English prose, no download) and readers for users' files.

A corpus is a stream of documents (str) plus a content fingerprint, so everything derived from it
(tokenizer, token shards) can be cached under a key that changes exactly when the text changes.
Documents go to the validation split by a hash of their text, so the split does not depend on the
order files are listed in or on how many workers read them."""

from __future__ import annotations

import ast
import functools
import glob
import hashlib
import json
import logging
import os
import re
import sys
import sysconfig
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, List

from scaletrain.errors import DataError

log = logging.getLogger(__name__)

TEXT_SUFFIXES = {".txt", ".text", ".md", ".rst", ""}
JSONL_SUFFIXES = {".jsonl", ".json", ".ndjson"}
PARQUET_SUFFIXES = {".parquet"}
# Standard-library folders that are not prose-bearing library code (tests, IDLE, demos) or not stdlib.
_BLANK_LINES = re.compile(r"\r?\n[ \t]*\r?\n")
_BUILTIN_VERSION = 1  # bump when the extraction below changes what documents come out
_STDLIB_SKIP = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo",
                "ensurepip", "__pycache__", "tkinter"}


@dataclass
class Corpus:
    name: str
    fingerprint: str  # sha256 over the content (and the reading options that change the documents)
    _read: Callable[[], Iterator[str]] = field(repr=False)

    def documents(self) -> Iterator[str]:
        return self._read()


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
def builtin_documents() -> tuple:
    """pydoc topics (sorted by name), then one document per stdlib module with its docstrings (sorted by
    path). Parsed with `ast`, never imported, so it is deterministic and has no side effects (~2 MB)."""
    from pydoc_data.topics import topics

    documents = [topics[name].strip() for name in sorted(topics)]
    documents += [_module_docstrings(path) for path in _builtin_sources()[1:]]
    return tuple(document for document in documents if document.strip())


def _builtin_corpus() -> Corpus:
    # The fingerprint hashes the source files themselves (fast), so a cached run never parses them.
    hasher = hashlib.sha256(f"builtin-v{_BUILTIN_VERSION}".encode())
    for path in _builtin_sources():
        hasher.update(path.name.encode() + b"\0" + path.read_bytes())
    return Corpus(name=f"builtin-py{sys.version_info.major}.{sys.version_info.minor}",
                  fingerprint=hasher.hexdigest(), _read=lambda: iter(builtin_documents()))


# ----------------------------------------------------------------------------- users' files

def resolve_files(spec: str) -> List[Path]:
    """A file, a directory (recursive, sorted) or a glob -> sorted list of files."""
    path = Path(os.path.expanduser(spec))
    if any(char in spec for char in "*?["):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"data.corpus glob {spec!r} matches no file; check the pattern")
        return files
    if not path.exists():
        raise DataError(f"data.corpus path {spec} does not exist; pass an existing file, directory or glob "
                        f"(or data.corpus=builtin)")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise DataError(f"data.corpus directory {spec} contains no file; add text/jsonl files")
        return files
    return [path]


def detect_format(files: List[Path], format: str) -> str:
    if format != "auto":
        return format
    suffixes = {p.suffix.lower() for p in files}
    if suffixes <= JSONL_SUFFIXES:
        return "jsonl"
    if suffixes <= PARQUET_SUFFIXES:
        return "parquet"
    if any(p.name == "dataset_info.json" for p in files):
        return "hf_disk"
    return "text"


def _decode(path: Path, data: bytes, errors: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    bad = _count_undecodable(data)
    if errors == "strict":
        raise DataError(f"{path} has {bad} undecodable bytes (not UTF-8); re-encode it as UTF-8 or set "
                        f"data.decode_errors=replace")
    log.warning("%s: replaced %d undecodable bytes with U+FFFD", path, bad)
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


def _text_documents(files: List[Path], split_blank_lines: bool, errors: str) -> Iterator[str]:
    for path in files:
        text = _decode(path, path.read_bytes(), errors)
        if split_blank_lines:
            # A block is text between blank (or whitespace-only) lines; the lines themselves are no documents.
            yield from (block.strip() for block in _BLANK_LINES.split(text) if block.strip())
        else:
            yield text.strip()


def _text(value, where: str, text_field: str) -> str:
    """A record's text; null, numbers, lists (anything but a string) would train on their repr: refuse."""
    if isinstance(value, str):
        return value
    kind = "null" if value is None else type(value).__name__
    raise DataError(f"{where}: field {text_field!r} is {kind}, not a string; fix or remove the record, or set "
                    f"data.text_field to the field holding the text")


def _jsonl_documents(files: List[Path], text_field: str, errors: str) -> Iterator[str]:
    for path in files:
        for line_number, line in enumerate(_decode(path, path.read_bytes(), errors).splitlines(), 1):
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


def _parquet_documents(files: List[Path], text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading parquet needs pyarrow; pip install pyarrow (or datasets)") from None
    for path in files:
        table = pq.read_table(path, columns=[text_field])
        for row, text in enumerate(table.column(text_field).to_pylist()):
            yield _text(text, f"{path} row {row}", text_field)


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
    if format == "text":
        read = lambda: _text_documents(files, split_blank_lines, decode_errors)  # noqa: E731
    elif format == "jsonl":
        read = lambda: _jsonl_documents(files, text_field, decode_errors)  # noqa: E731
    elif format == "parquet":
        read = lambda: _parquet_documents(files, text_field)  # noqa: E731
    else:
        folder = Path(os.path.expanduser(spec))
        folder = folder if folder.is_dir() else folder.parent
        read = lambda: _hf_disk_documents(folder, text_field)  # noqa: E731
    return Corpus(name=name, fingerprint=fingerprint, _read=read)


def corpus_from_config(data_cfg) -> Corpus:
    return load_corpus(data_cfg.corpus, data_cfg.format, data_cfg.text_field, data_cfg.split_blank_lines,
                       data_cfg.decode_errors)


def split_documents(corpus: Corpus, val_fraction: float) -> tuple[List[str], List[str]]:
    """(train, validation) document lists; empty documents are dropped and counted in the log."""
    train, validation, empty = [], [], 0
    for document in corpus.documents():
        if not document.strip():
            empty += 1
            continue
        (validation if is_validation(document, val_fraction) else train).append(document)
    if empty:
        log.info("corpus %s: skipped %d empty documents", corpus.name, empty)
    if not train and not validation:
        raise DataError(f"corpus {corpus.name} is empty (no non-blank document); point data.corpus at files "
                        f"with text")
    # A tiny corpus can hash all its documents to one side; rather than fail, move one across (a single
    # document serves both splits) and say so.
    if not train:
        train.append(validation.pop() if len(validation) > 1 else validation[0])
        log.info("corpus %s: every document hashed into validation; training on one of them", corpus.name)
    if not validation:
        validation.append(train.pop() if len(train) > 1 else train[0])
        log.info("corpus %s: no document hashed into validation; holding out the last one", corpus.name)
    return train, validation
