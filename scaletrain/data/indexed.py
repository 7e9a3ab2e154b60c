"""Memory-mapped token shards in the spirit of Megatron's indexed dataset.

    <prefix>.bin   the tokens of every document back to back (uint16 when the vocab fits, else uint32),
                   each document followed by its end-of-document token
    <prefix>.idx   header (magic, dtype, document and token counts) + int64 document offsets (n_docs + 1)

Writers write `<file>.partial` and rename when done (the .idx last), so a killed writer never leaves a
file under its final name; readers check the .bin size against the index before trusting a byte. Writers
hash what they write (blake2b) as they write it, so prepare records a checksum per file without reading
its output again."""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path
from typing import Iterator, Optional, Tuple

import numpy as np

from scaletrain.errors import DataError

MAGIC = b"STIDX\x00\x01\x00"
_HEADER = struct.Struct("<8sBqq")  # magic, dtype code, documents, tokens
_DTYPES = {1: np.uint16, 2: np.uint32}
_CODES = {np.dtype(np.uint16): 1, np.dtype(np.uint32): 2}


CHECKSUM = "blake2b"  # the metadata.json key of a file's checksum (blake2b-256, hex)
_SCAN_CHUNK = 8 << 20  # bytes read at a time when a file is hashed back (a multiple of every dtype size)


def new_checksum():
    return hashlib.blake2b(digest_size=32)


def scan_file(path: Path, size: Optional[int] = None, dtype: Optional[np.dtype] = None,
              vocab_size: Optional[int] = None):
    """Reads the first `size` bytes (all by default) once -> (checksum object, the first token id outside
    [0, vocab_size) or None); the token ids are looked at only when `dtype` and `vocab_size` are given."""
    checksum, bad = new_checksum(), None
    with open(path, "rb") as handle:
        left = path.stat().st_size if size is None else size
        while left > 0:
            chunk = handle.read(min(_SCAN_CHUNK, left))
            if not chunk:
                break
            checksum.update(chunk)
            left -= len(chunk)
            if vocab_size is not None and bad is None:
                bad = out_of_range(np.frombuffer(chunk, dtype, len(chunk) // np.dtype(dtype).itemsize), vocab_size)
    return checksum, bad


def out_of_range(ids: np.ndarray, vocab_size: int) -> Optional[int]:
    """A token id of `ids` outside [0, vocab_size), or None: two reductions, no copy."""
    if ids.size == 0:
        return None
    largest, smallest = int(ids.max()), int(ids.min())
    return largest if largest >= vocab_size else smallest if smallest < 0 else None


class _HashingFile:
    """A binary file whose writes also feed a checksum."""

    def __init__(self, handle, checksum):
        self.handle, self.checksum = handle, checksum

    def write(self, data) -> None:
        self.checksum.update(data)
        self.handle.write(data)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32)


def _fsync_rename(partial: Path, final: Path) -> None:
    with open(partial, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(partial, final)


_LENGTHS_CHUNK = 1 << 20  # documents per block when the index is built from the spilled lengths


def _open_at(path: Path, size: Optional[int]):
    """A fresh file (size None), or a killed writer's file cut back to the `size` bytes it had flushed."""
    if size is None:
        return open(path, "wb")
    if not path.is_file() or path.stat().st_size < size:
        raise DataError(f"{path} is shorter than its prepare journal says ({size} bytes); delete the folder and "
                        f"re-run scaletrain data prepare")
    handle = open(path, "r+b")
    handle.truncate(size)
    handle.seek(size)
    return handle


class IndexedWriter:
    """Appends documents (already tokenized, EOD included) to `<prefix>.bin.partial`; `finish()` writes the
    index and renames both files into place. The document lengths spill to `<prefix>.lengths.partial`, so
    memory stays bounded whatever the document count. `resume_at=(tokens, documents)` continues a killed
    writer from a point its `flush()` made durable."""

    def __init__(self, prefix: Path, dtype: np.dtype, resume_at: Optional[Tuple[int, int]] = None):
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        self.bin_path, self.idx_path = self._final_paths()
        self.bin_partial = self.bin_path.with_name(self.bin_path.name + ".partial")
        self.idx_partial = self.idx_path.with_name(self.idx_path.name + ".partial")
        self.lengths_partial = self.bin_path.with_name(self.bin_path.stem + ".lengths.partial")
        self.tokens, self.documents = resume_at or (0, 0)
        kept = resume_at and self.tokens * self.dtype.itemsize
        self._handle = _open_at(self.bin_partial, kept)
        self._lengths = _open_at(self.lengths_partial, resume_at and self.documents * 8)
        # A resumed writer hashes again what it kept (once, at disk speed); hash states cannot be saved.
        self._checksum = scan_file(self.bin_partial, kept)[0] if resume_at else new_checksum()
        self.checksums: dict = {}  # after finish(): {file name: {"bytes": n, CHECKSUM: hex}}

    def _final_paths(self) -> Tuple[Path, Path]:
        return self.prefix.with_suffix(".bin"), self.prefix.with_suffix(".idx")

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """tokens: (sum(lengths),) the documents concatenated; lengths: (n_docs,)."""
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        self._checksum.update(tokens)
        self._handle.write(tokens)
        self._lengths.write(np.asarray(lengths, dtype=np.int64).tobytes())
        self.tokens += int(tokens.size)
        self.documents += int(np.size(lengths))

    def flush(self) -> None:
        for handle in (self._handle, self._lengths):
            handle.flush()
            os.fsync(handle.fileno())

    def spilled_lengths(self) -> Iterator[np.ndarray]:
        """The lengths written so far, in blocks of at most _LENGTHS_CHUNK (int64)."""
        with open(self.lengths_partial, "rb") as handle:
            for chunk in iter(lambda: handle.read(8 * _LENGTHS_CHUNK), b""):
                yield np.frombuffer(chunk, dtype=np.int64)

    def _write_index(self, handle) -> None:
        handle.write(_HEADER.pack(MAGIC, _CODES[self.dtype], self.documents, self.tokens))
        handle.write(np.zeros(1, np.int64).tobytes())
        position = 0
        for lengths in self.spilled_lengths():
            ends = position + np.cumsum(lengths)
            handle.write(ends.tobytes())
            position = int(ends[-1])

    def finish(self) -> int:
        self._handle.close()
        self._lengths.close()
        index_checksum = new_checksum()
        with open(self.idx_partial, "wb") as handle:
            self._write_index(_HashingFile(handle, index_checksum))
        self.lengths_partial.unlink()
        for path, checksum, partial in ((self.bin_path, self._checksum, self.bin_partial),
                                        (self.idx_path, index_checksum, self.idx_partial)):
            self.checksums[path.name] = {"bytes": partial.stat().st_size, CHECKSUM: checksum.hexdigest()}
        _fsync_rename(self.bin_partial, self.bin_path)
        _fsync_rename(self.idx_partial, self.idx_path)
        return self.documents

    def abort(self) -> None:
        self._handle.close()
        self._lengths.close()
        for path in (self.bin_partial, self.idx_partial, self.lengths_partial):
            path.unlink(missing_ok=True)


class IndexedTokens:
    """Read side: `tokens` is a read-only memmap of the whole stream, `offsets` the document starts;
    `vocab_size` (None: unknown) bounds the token ids, which the loader checks per sample."""

    def __init__(self, prefix: Path, vocab_size: Optional[int] = None):
        self.prefix = Path(prefix)
        self.vocab_size = vocab_size
        bin_path, idx_path = self.prefix.with_suffix(".bin"), self.prefix.with_suffix(".idx")
        for path in (bin_path, idx_path):
            if not path.is_file():
                raise DataError(f"token shard {path} is missing; re-run scaletrain data prepare for "
                                f"{self.prefix.parent}")
        raw = idx_path.read_bytes()
        if len(raw) < _HEADER.size or raw[:8] != MAGIC:
            raise DataError(f"{idx_path} is not a scaletrain index (bad header); delete {self.prefix.parent} "
                            f"and re-run scaletrain data prepare")
        _, code, documents, tokens = _HEADER.unpack_from(raw)
        if code not in _DTYPES:
            raise DataError(f"{idx_path} names an unknown token dtype ({code}); delete {self.prefix.parent} and "
                            f"re-run scaletrain data prepare")
        self.dtype = np.dtype(_DTYPES[code])
        self.offsets = np.frombuffer(raw, dtype=np.int64, offset=_HEADER.size)
        expected_bytes = tokens * self.dtype.itemsize
        actual_bytes = bin_path.stat().st_size
        if (self.offsets.size != documents + 1 or self.offsets[-1] != tokens or actual_bytes != expected_bytes
                or np.any(np.diff(self.offsets) < 0)):
            raise DataError(f"{bin_path} has {actual_bytes} bytes but its index says {tokens} tokens "
                            f"({expected_bytes} bytes): the shard is truncated or corrupted; delete "
                            f"{self.prefix.parent} and re-run scaletrain data prepare")
        self.num_documents = int(documents)
        self.num_tokens = int(tokens)
        # An empty file cannot be memory-mapped.
        self.tokens = (np.memmap(bin_path, dtype=self.dtype, mode="r") if tokens
                       else np.zeros(0, dtype=self.dtype))

    def document(self, index: int) -> np.ndarray:
        return self.tokens[self.offsets[index]:self.offsets[index + 1]]

    def __len__(self) -> int:
        return self.num_documents
