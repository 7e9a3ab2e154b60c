"""Memory-mapped token shards in the spirit of Megatron's indexed dataset.

    <prefix>.bin   the tokens of every document back to back (uint16 when the vocab fits, else uint32),
                   each document followed by its end-of-document token
    <prefix>.idx   header (magic, dtype, document and token counts) + int64 document offsets (n_docs + 1)

Writers write `<file>.partial` and rename when done (the .idx last), so a killed writer never leaves a
file under its final name; readers check the .bin size against the index before trusting a byte."""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import List

import numpy as np

from scaletrain.errors import DataError

MAGIC = b"STIDX\x00\x01\x00"
_HEADER = struct.Struct("<8sBqq")  # magic, dtype code, documents, tokens
_DTYPES = {1: np.uint16, 2: np.uint32}
_CODES = {np.dtype(np.uint16): 1, np.dtype(np.uint32): 2}


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32)


def _fsync_rename(partial: Path, final: Path) -> None:
    with open(partial, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(partial, final)


class IndexedWriter:
    """Appends documents (already tokenized, EOD included) to `<prefix>.bin.partial`; `finish()` writes the
    index and renames both files into place."""

    def __init__(self, prefix: Path, dtype: np.dtype):
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        self.bin_partial = self.prefix.with_suffix(".bin.partial")
        self.idx_partial = self.prefix.with_suffix(".idx.partial")
        self._handle = open(self.bin_partial, "wb")
        self._lengths: List[np.ndarray] = []
        self.tokens = 0

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """tokens: (sum(lengths),) the documents concatenated; lengths: (n_docs,)."""
        self._handle.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self._lengths.append(np.asarray(lengths, dtype=np.int64))
        self.tokens += int(tokens.size)

    def finish(self) -> int:
        self._handle.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
        offsets = np.zeros(lengths.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        with open(self.idx_partial, "wb") as handle:
            handle.write(_HEADER.pack(MAGIC, _CODES[self.dtype], lengths.size, self.tokens))
            handle.write(offsets.tobytes())
        _fsync_rename(self.bin_partial, self.prefix.with_suffix(".bin"))
        _fsync_rename(self.idx_partial, self.prefix.with_suffix(".idx"))
        return lengths.size

    def abort(self) -> None:
        self._handle.close()
        for path in (self.bin_partial, self.idx_partial):
            path.unlink(missing_ok=True)


class IndexedTokens:
    """Read side: `tokens` is a read-only memmap of the whole stream, `offsets` the document starts."""

    def __init__(self, prefix: Path):
        self.prefix = Path(prefix)
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
