"""A split stored as several shards of bounded size, read back as one token stream.

    <dir>/train.bin .idx  train-00001.bin .idx  train-00002.bin .idx ...

A shard is closed at a document boundary once the next document would take it past the bound (a single
document longer than the bound gets a shard of its own), so no file grows without limit whatever the
corpus size (filesystems, object stores and copies like files of a few GB; the format of each shard is
unchanged). The first shard keeps the split's own name, so a split that fits in one shard is the
single-file layout of earlier folders. metadata.json lists the shards of each split in order.

`ShardedWriter` has the interface of one split writer (IndexedWriter, MegatronWriter), including the
resume of a killed prepare from the (tokens, documents) its journal recorded; `ConcatTokens` gives the
loader the one stream it reads (`tokens[a:b]`, `num_tokens`, `offsets`) over the shards' memory maps."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from scaletrain.data.indexed import CHECKSUM, scan_file
from scaletrain.errors import DataError

log = logging.getLogger(__name__)


def shard_prefix(split_prefix: Path, index: int) -> Path:
    return split_prefix if index == 0 else split_prefix.with_name(f"{split_prefix.name}-{index:05d}")


class ShardedWriter:
    """Appends documents to `<split>`, `<split>-00001`, ... each of at most `max_tokens` tokens (or one
    document). `make_writer(prefix, resume_at)` builds one shard's writer; `open_shard(prefix)` reads a
    finished shard back (its num_tokens, num_documents and offsets), which a resume needs."""

    def __init__(self, prefix: Path, max_tokens: int, make_writer: Callable, open_shard: Callable,
                 resume_at: Optional[Tuple[int, int]] = None):
        if max_tokens < 1:
            raise DataError(f"a shard must hold at least one token (max_tokens={max_tokens}); raise "
                            f"data.max_shard_bytes")
        self.prefix, self.max_tokens = Path(prefix), max_tokens
        self.make_writer, self.open_shard = make_writer, open_shard
        self.shards: List[dict] = []  # {"prefix": name, "tokens": n, "documents": d} per closed shard, in order
        self.checksums: dict = {}
        self.current = self._resume(resume_at) if resume_at else self.make_writer(self.prefix, None)

    def _total(self, key: str) -> int:
        open_shard = 0 if self.current is None else getattr(self.current, key)
        return sum(shard[key] for shard in self.shards) + open_shard

    @property
    def tokens(self) -> int:
        return self._total("tokens")

    @property
    def documents(self) -> int:
        return self._total("documents")

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """tokens: (sum(lengths),) the documents concatenated; lengths: (n_docs,). Cut at the documents
        where the current shard would pass max_tokens."""
        lengths = np.asarray(lengths, dtype=np.int64)
        ends = np.cumsum(lengths)  # (n_docs,) token end of each document within `tokens`
        first_doc, first_token = 0, 0
        while first_doc < lengths.size:
            room = self.max_tokens - self.current.tokens
            # documents [first_doc, last) fit in the room left; at least one when the shard is empty
            last = int(np.searchsorted(ends, first_token + room, side="right"))
            if last == first_doc and self.current.documents == 0:
                last = first_doc + 1
            if last > first_doc:
                end_token = int(ends[last - 1])
                self.current.add_documents(tokens[first_token:end_token], lengths[first_doc:last])
                first_doc, first_token = last, end_token
            if first_doc < lengths.size:
                self._next_shard()

    def _next_shard(self) -> None:
        self._close_current()
        self.current = self.make_writer(shard_prefix(self.prefix, len(self.shards)), None)

    def _close_current(self) -> None:
        writer = self.current
        writer.finish()
        self.checksums.update(writer.checksums)
        self.shards.append({"prefix": writer.prefix.name, "tokens": writer.tokens, "documents": writer.documents})

    def flush(self) -> None:
        self.current.flush()

    def finish(self) -> int:
        self._close_current()
        self.current = None
        return self.documents

    def abort(self) -> None:
        self.current.abort()

    # ---- resume ----------------------------------------------------------------------------------------
    def _resume(self, resume_at: Tuple[int, int]):
        """Keeps the finished shards that end at or before the journal's point, reopens the one the point
        falls in (cut back to it, even when it had been finished after the journal was written) and drops
        the shards after it: everything past the point is written again."""
        tokens_left, documents_left = resume_at
        index = 0
        while True:
            prefix = shard_prefix(self.prefix, index)
            if not Path(f"{prefix}.idx").is_file():  # the shard the point falls in is still partial
                if Path(f"{prefix}.bin").is_file():  # a kill in the middle of _reopen
                    Path(f"{prefix}.bin").replace(Path(f"{prefix}.bin.partial"))
                self._drop_after(index + 1)
                at = (tokens_left, documents_left) if documents_left else None
                return self.make_writer(prefix, at)
            shard = self.open_shard(prefix)
            if shard.num_documents <= documents_left:
                self._keep(prefix, shard)
                tokens_left -= shard.num_tokens
                documents_left -= shard.num_documents
                index += 1
                continue
            self._drop_after(index + 1)
            return self._reopen(prefix, shard, tokens_left, documents_left)

    def _keep(self, prefix: Path, shard) -> None:
        for path in (Path(f"{prefix}.bin"), Path(f"{prefix}.idx")):
            checksum = scan_file(path)[0]
            self.checksums[path.name] = {"bytes": path.stat().st_size, CHECKSUM: checksum.hexdigest()}
        self.shards.append({"prefix": prefix.name, "tokens": shard.num_tokens, "documents": shard.num_documents})

    def _reopen(self, prefix: Path, shard, tokens: int, documents: int):
        """A shard finished after the journal's point: back to a partial shard of its first `documents`."""
        lengths = np.diff(np.asarray(shard.offsets[:documents + 1], dtype=np.int64))
        if int(lengths.sum()) != tokens:
            raise DataError(f"{prefix}.idx disagrees with the prepare journal ({int(lengths.sum())} tokens in its "
                            f"first {documents} documents, the journal says {tokens}); delete "
                            f"{prefix.parent} and re-run scaletrain data prepare")
        del shard  # its memory maps
        # the names IndexedWriter (and MegatronWriter) resume from; a kill after the .idx is gone leaves
        # a shard that the next resume finishes reopening (see _resume)
        Path(f"{prefix}.lengths.partial").write_bytes(lengths.tobytes())
        Path(f"{prefix}.idx").unlink()
        Path(f"{prefix}.bin").replace(Path(f"{prefix}.bin.partial"))
        return self.make_writer(prefix, (tokens, documents) if documents else None)

    def _drop_after(self, index: int) -> None:
        """Removes the staged shards from `index` on (whole or partial): they lie past the journal."""
        while True:
            prefix = shard_prefix(self.prefix, index)
            paths = [Path(f"{prefix}{suffix}") for suffix in (".bin", ".idx", ".bin.partial", ".idx.partial",
                                                               ".lengths.partial")]
            if not any(path.exists() for path in paths):
                return
            for path in paths:
                path.unlink(missing_ok=True)
            index += 1


class ConcatTokens:
    """Several shards' token memmaps as one read-only stream: `stream[a:b]` copies across shard ends."""

    def __init__(self, parts: Sequence[np.ndarray]):
        self.parts = list(parts)
        self.dtype = self.parts[0].dtype
        self.starts = np.zeros(len(self.parts) + 1, dtype=np.int64)  # (shards + 1,) token start of each
        np.cumsum([part.size for part in self.parts], out=self.starts[1:])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index) -> np.ndarray:
        if not isinstance(index, slice):
            index = int(index) + (len(self) if int(index) < 0 else 0)
            shard = int(np.searchsorted(self.starts, index, side="right")) - 1
            return self.parts[shard][index - self.starts[shard]]
        start, stop, step = index.indices(len(self))
        if step != 1:
            raise IndexError("a token stream is read in contiguous slices")
        if stop <= start:
            return self.parts[0][:0]
        # 'right': past the shards that end where `start` begins (empty shards included)
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        last = int(np.searchsorted(self.starts, stop - 1, side="right")) - 1
        if first == last:  # the common case: one memmap slice, no copy
            return self.parts[first][start - self.starts[first]:stop - self.starts[first]]
        pieces = [self.parts[s][max(start - self.starts[s], 0):min(stop, self.starts[s + 1]) - self.starts[s]]
                  for s in range(first, last + 1)]
        return np.concatenate(pieces)


class ShardedSplit:
    """One split of a prepared folder opened from its shards: the attributes the loader reads from a
    single IndexedTokens (tokens, offsets, num_tokens, num_documents, prefix, vocab_size, document)."""

    def __init__(self, prefix: Path, shards: Sequence, vocab_size: Optional[int]):
        self.prefix, self.vocab_size = Path(prefix), vocab_size
        self.shards = list(shards)
        self.dtype = self.shards[0].dtype
        self.tokens = ConcatTokens([shard.tokens for shard in self.shards])
        token_starts = self.tokens.starts
        self.offsets = np.concatenate([np.zeros(1, np.int64)] + [
            np.asarray(shard.offsets[1:], dtype=np.int64) + token_starts[i] for i, shard in enumerate(self.shards)])
        self.num_tokens = int(token_starts[-1])
        self.num_documents = sum(shard.num_documents for shard in self.shards)

    def document(self, index: int) -> np.ndarray:
        return self.tokens[int(self.offsets[index]):int(self.offsets[index + 1])]

    def __len__(self) -> int:
        return self.num_documents


def open_split(split_prefix: Path, shard_names: Optional[Sequence[str]], open_shard: Callable,
               vocab_size: Optional[int]):
    """A split of a prepared folder: its one shard as is, or its shards (metadata.json order) as one."""
    names = list(shard_names) if shard_names else [split_prefix.name]
    shards = [open_shard(split_prefix.with_name(name)) for name in names]
    if len(shards) == 1:
        return shards[0]
    return ShardedSplit(split_prefix, shards, vocab_size)
