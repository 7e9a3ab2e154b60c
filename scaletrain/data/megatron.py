"""Megatron-LM's indexed dataset (`MMIDIDX`), read in place and written, so corpora move both ways.

    <prefix>.bin   the token ids of every sequence back to back, in the index's dtype
    <prefix>.idx   b"MMIDIDX\\x00\\x00", version <Q (1), dtype code <B, sequence count <Q, document count <Q,
                   then int32 sequence lengths (in tokens), int64 sequence pointers (byte offsets into the
                   .bin), int64 document indices (sequence index where each document starts, then the
                   sequence count: document count = documents + 1)

Both files are read through numpy memory maps, never converted: `MegatronTokens` has the attributes the
loader reads from `IndexedTokens` (tokens, offsets, num_tokens, ...). Megatron stores no tokenizer, so
the run names one (data.tokenizer) and the dtype is checked to hold its vocabulary. A prefix has no
validation split: the last data.val_fraction of its documents are held out (at least one)."""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from scaletrain.data.indexed import _LENGTHS_CHUNK, IndexedWriter, scan_file
from scaletrain.errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count
# Megatron's DType codes (megatron/core/datasets/indexed_dataset.py); the float ones hold no token ids.
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
          8: np.uint16}
CODES = {np.dtype(dtype): code for code, dtype in DTYPES.items()}


def megatron_dtype(vocab_size: int) -> np.dtype:
    """Megatron's choice: uint16 when every id fits, else int32 (it has no uint32 code)."""
    return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32)


def is_megatron_prefix(path: Path) -> bool:
    return Path(f"{path}.idx").is_file() or Path(f"{path}.bin").is_file() and not Path(path).is_dir()


def _refuse(idx_path: Path, problem: str) -> DataError:
    return DataError(f"{idx_path} {problem}; point data.prepared at the prefix of a Megatron-LM .bin/.idx pair "
                     f"(or re-run its preprocess_data.py)")


class MegatronTokens:
    """Documents [first, last) of a Megatron prefix: `tokens` is a read-only memmap slice of the .bin,
    `offsets` (n_docs + 1,) the document starts relative to it."""

    def __init__(self, prefix: Path, documents: Optional[Tuple[int, int]] = None, vocab_size: Optional[int] = None):
        self.prefix = Path(prefix)
        self.vocab_size = vocab_size
        idx_path, bin_path = Path(f"{self.prefix}.idx"), Path(f"{self.prefix}.bin")
        for path in (idx_path, bin_path):
            if not path.is_file():
                raise DataError(f"Megatron shard {path} is missing; a prefix needs both {self.prefix}.bin and "
                                f"{self.prefix}.idx")
        index = np.memmap(idx_path, dtype=np.uint8, mode="r") if idx_path.stat().st_size else np.zeros(0, np.uint8)
        if index.size < _HEADER.size or bytes(index[:len(MAGIC)]) != MAGIC:
            raise _refuse(idx_path, f"does not start with the Megatron magic {MAGIC!r}")
        _, version, code, sequences, document_count = _HEADER.unpack_from(bytes(index[:_HEADER.size]))
        if version != VERSION:
            raise _refuse(idx_path, f"has index version {version}; only version {VERSION} is known")
        if code not in DTYPES or not np.issubdtype(DTYPES[code], np.integer):
            raise _refuse(idx_path, f"has dtype code {code}, not an integer token dtype")
        self.dtype = np.dtype(DTYPES[code])
        expected = _HEADER.size + sequences * 12 + document_count * 8
        if index.size < expected or document_count < 1:
            raise _refuse(idx_path, f"is truncated ({index.size} bytes, its header needs {expected})")
        lengths = np.frombuffer(index, np.int32, sequences, _HEADER.size)
        pointers = np.frombuffer(index, np.int64, sequences, _HEADER.size + 4 * sequences)
        document_index = np.frombuffer(index, np.int64, document_count, _HEADER.size + 12 * sequences)
        # Token offsets of every sequence start; the loader reads the .bin as one stream, so the
        # sequences must lie back to back, which is how Megatron's builder writes them.
        starts = np.zeros(sequences + 1, dtype=np.int64)
        np.cumsum(lengths, out=starts[1:])
        if np.any(pointers != starts[:-1] * self.dtype.itemsize):
            raise _refuse(idx_path, "has sequences that are not stored back to back in the .bin")
        if bin_path.stat().st_size != starts[-1] * self.dtype.itemsize:
            raise DataError(f"{bin_path} has {bin_path.stat().st_size} bytes but {idx_path} describes "
                            f"{starts[-1]} {self.dtype.name} tokens: the pair is truncated or mismatched")
        if document_index[0] != 0 or document_index[-1] != sequences or np.any(np.diff(document_index) < 0):
            raise _refuse(idx_path, "has document indices that do not run from 0 to the sequence count")
        first, last = documents if documents is not None else (0, document_count - 1)
        token_starts = starts[document_index]  # (documents + 1,)
        everything = np.memmap(bin_path, dtype=self.dtype, mode="r") if starts[-1] else np.zeros(0, self.dtype)
        self.tokens = everything[token_starts[first]:token_starts[last]]
        self.offsets = token_starts[first:last + 1] - token_starts[first]
        self.num_documents = last - first
        self.num_tokens = int(self.offsets[-1]) if self.offsets.size else 0
        self.total_documents = document_count - 1

    def document(self, index: int) -> np.ndarray:
        return self.tokens[self.offsets[index]:self.offsets[index + 1]]

    def __len__(self) -> int:
        return self.num_documents


def check_vocab_fits(dataset: MegatronTokens, tokenizer) -> None:
    largest = int(np.iinfo(dataset.dtype).max)
    if tokenizer.vocab_size - 1 > largest:
        raise DataError(f"{dataset.prefix}.idx stores {dataset.dtype.name} tokens (ids up to {largest}) but the "
                        f"tokenizer {tokenizer.source} has {tokenizer.vocab_size}; name the tokenizer the shards "
                        f"were made with (data.tokenizer=PATH)")


def open_megatron(prefix: Path, tokenizer, val_fraction: float, verify: str = "size"):
    """(train, validation) views of one prefix: the last val_fraction of the documents (>= 1) validate.
    Megatron records no checksums: verify="full" reads the .bin once for token ids outside the vocab."""
    vocab = tokenizer.vocab_size
    whole = MegatronTokens(prefix, vocab_size=vocab)
    check_vocab_fits(whole, tokenizer)
    if verify == "full":
        bad = scan_file(Path(f"{prefix}.bin"), dtype=whole.dtype, vocab_size=vocab)[1]
        if bad is not None:
            raise DataError(f"{prefix}.bin holds token id {bad}, outside the {vocab} tokens of {tokenizer.source}; "
                            f"name the tokenizer the shards were made with (data.tokenizer=PATH)")
    documents = whole.total_documents
    if documents == 0:
        raise DataError(f"Megatron prefix {prefix} holds no document; point at a non-empty one")
    held_out = max(1, round(val_fraction * documents))
    if documents == 1:  # one document serves both splits
        return whole, whole
    return (MegatronTokens(prefix, (0, documents - held_out), vocab),
            MegatronTokens(prefix, (documents - held_out, documents), vocab))


def open_megatron_prepared(data_cfg):
    from scaletrain.data.prepare import PreparedData
    from scaletrain.data.tokenizer import load_tokenizer

    prefix = Path(os.path.expanduser(data_cfg.prepared))
    if data_cfg.tokenizer == "train":
        raise DataError(f"data.prepared={prefix} is a Megatron prefix, which records no tokenizer; name the one it "
                        f"was made with: data.tokenizer=PATH (a tokenizer.json or a Hugging Face folder)")
    tokenizer = load_tokenizer(data_cfg.tokenizer)
    train, validation = open_megatron(prefix, tokenizer, data_cfg.val_fraction, data_cfg.verify)
    metadata = {"format": "megatron", "prefix": str(prefix), "dtype": train.dtype.name,
                "tokenizer_hash": tokenizer.hash, "vocab_size": tokenizer.vocab_size}
    return PreparedData(tokenizer, train, validation, prefix.parent, metadata)


class MegatronWriter(IndexedWriter):
    """One sequence per document, the .idx in Megatron's layout; spilling and resuming as IndexedWriter."""

    def __init__(self, prefix: Path, dtype: np.dtype, resume_at=None):
        if np.dtype(dtype) not in CODES:
            raise DataError(f"Megatron has no dtype code for {np.dtype(dtype)}")
        super().__init__(prefix, dtype, resume_at)

    def _final_paths(self):
        return Path(f"{self.prefix}.bin"), Path(f"{self.prefix}.idx")

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        if tokens.size and int(tokens.max()) > np.iinfo(self.dtype).max:
            raise DataError(f"token id {int(tokens.max())} does not fit the Megatron dtype {self.dtype.name}")
        super().add_documents(tokens, lengths)

    def _write_index(self, handle) -> None:
        count = self.documents
        handle.write(_HEADER.pack(MAGIC, VERSION, CODES[self.dtype], count, count + 1))
        for lengths in self.spilled_lengths():  # int32 sequence lengths
            handle.write(lengths.astype(np.int32).tobytes())
        position = 0
        for lengths in self.spilled_lengths():  # int64 byte pointers: where each sequence starts
            ends = position + np.cumsum(lengths) * self.dtype.itemsize
            handle.write(np.concatenate([[position], ends[:-1]]).astype(np.int64).tobytes())
            position = int(ends[-1])
        for start in range(0, count + 1, _LENGTHS_CHUNK):  # document i is sequence i
            handle.write(np.arange(start, min(start + _LENGTHS_CHUNK, count + 1), dtype=np.int64).tobytes())
