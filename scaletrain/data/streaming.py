"""The streaming core of `scaletrain data prepare`: corpora larger than memory, resumable after a kill.

Documents stream from one input file at a time (corpus.units()), go to train or validation by the hash
of their text, and travel in ~32 KB chunks to tokenizer worker processes with a bounded number in flight,
so memory holds a few chunks per worker whatever the corpus size (with --dedup, the content hashes
live in an SQLite table on disk: memory adds its bounded page cache). The writers append to `.partial`
files and spill document lengths to disk.

Every so often, at the end of an input file, everything in flight is written, the writers are fsynced,
and `progress.json` records how far the output is durable (files done, tokens and documents per split).
A killed prepare restarted with the same inputs cuts the partial files back to that point and skips the
finished files; the result is byte-identical to an uninterrupted run."""

from __future__ import annotations

import collections
import concurrent.futures
import concurrent.futures.process
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import signal
import sqlite3
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from tqdm import tqdm

from scaletrain.data.corpus import SPLITS, Corpus, is_validation, settle_held
from scaletrain.data.tokenizer import Tokenizer
from scaletrain.errors import DataError
from scaletrain.forkserver import forkserver_context, signals_held

log = logging.getLogger(__name__)

JOURNAL = "progress.json"
DEDUP_HASHES = "dedup.sqlite.partial"
_DEDUP_CACHE_KIB = 64 << 10  # SQLite's page cache for the --dedup table: its whole share of memory
_CHUNK_CHARS = 1 << 15  # ~32 KB of text per worker task: balances the workers and keeps the bar live
_IN_FLIGHT_PER_WORKER = 4  # chunks queued per worker: enough to keep it busy, few enough to stay small
_JOURNAL_BYTES, _JOURNAL_SECONDS = 64 << 20, 10.0  # a durable point after this much input or time


# ----------------------------------------------------------------------------- tokenization workers

_worker_tokenizer: Optional[Tokenizer] = None


def _load_tokenizer(tokenizer_json: str) -> None:
    global _worker_tokenizer
    from tokenizers import Tokenizer as Backend

    _worker_tokenizer = Tokenizer(Backend.from_str(tokenizer_json))


def _init_worker(tokenizer_json: str) -> None:
    # The parent alone decides when to stop (it catches Ctrl-C and the stop signals and shuts the pool
    # down); a worker that died of a SIGUSR1 meant for the trainer would break the pool. SIGTERM stays
    # fatal so that the pool, Slurm and the OS can still end a worker.
    for number in (signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(number, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _load_tokenizer(tokenizer_json)


def _tokenize_chunk(texts: List[str]) -> Tuple[np.ndarray, np.ndarray]:
    return pack_documents(_worker_tokenizer, texts)


def pack_documents(tokenizer: Tokenizer, texts: List[str]) -> Tuple[np.ndarray, np.ndarray]:
    """-> (tokens of every document followed by EOD, concatenated; per-document lengths incl. EOD)."""
    from scaletrain.data.indexed import token_dtype

    ids = tokenizer.encode_batch(texts)
    lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
    tokens = np.empty(int(lengths.sum()), dtype=token_dtype(tokenizer.vocab_size))
    ends = np.cumsum(lengths)
    for document, end in zip(ids, ends):
        tokens[end - len(document) - 1:end - 1] = document
        tokens[end - 1] = tokenizer.eod_id
    return tokens, lengths


class OrderedPool:
    """submit(tag, texts) -> the results that are ready, in submission order, as (tag, (tokens, lengths));
    at most `_IN_FLIGHT_PER_WORKER` chunks per worker wait, so a fast reader cannot fill the memory."""

    def __init__(self, tokenizer: Tokenizer, num_workers: int):
        self.tokenizer, self.num_workers = tokenizer, num_workers
        self._pending: collections.deque = collections.deque()
        self._pool: Optional[concurrent.futures.ProcessPoolExecutor] = None

    def __enter__(self) -> "OrderedPool":
        daemonic = multiprocessing.current_process().daemon  # e.g. a test rank: it may not have children
        if daemonic and self.num_workers > 1:
            log.info("tokenizing in this process: a daemonic process cannot start data.num_workers=%d workers",
                     self.num_workers)
        if self.num_workers <= 1 or daemonic:
            _load_tokenizer(self.tokenizer.json)  # this process's signals stay as they are
            return self
        # Workers come from the forkserver, never from a fork of this process: by now it runs threads (the
        # tokenizer trainer's Rust pool, torch's, a progress bar's), and a fork taken while one of them
        # holds a lock hangs the child for good (a `scaletrain train` once stalled at "prepare: 0.00B").
        # A worker killed from outside (the OOM killer) breaks the executor, where a Pool would wait forever.
        # TOKENIZERS_PARALLELISM=false makes each worker one thread (the processes are the parallelism).
        self._previous = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        with signals_held():  # a stop meanwhile would leave started workers that nothing tracks
            self._pool = concurrent.futures.ProcessPoolExecutor(
                self.num_workers, mp_context=forkserver_context(), initializer=_init_worker,
                initargs=(self.tokenizer.json,))
            self._pool.submit(int).result()  # starts every worker now, and the forkserver on first use
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is None:
            return
        # On an error or a stop the queued chunks are dropped; the few running ones take milliseconds.
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = self._previous

    def _result(self, future: concurrent.futures.Future):
        try:
            return future.result()
        except concurrent.futures.process.BrokenProcessPool:
            raise DataError("a data prepare worker died (killed from outside, out of memory?); run the same "
                            "command again: the prepare resumes from its last durable point, or lower "
                            "data.num_workers") from None

    def submit(self, tag, texts: List[str]):
        if self._pool is None:
            yield tag, _tokenize_chunk(texts)
            return
        self._pending.append((tag, self._pool.submit(_tokenize_chunk, texts)))
        while len(self._pending) > _IN_FLIGHT_PER_WORKER * self.num_workers or (
                self._pending and self._pending[0][1].done()):
            tag, future = self._pending.popleft()
            yield tag, self._result(future)

    def drain(self):
        while self._pending:
            tag, future = self._pending.popleft()
            yield tag, self._result(future)


# ----------------------------------------------------------------------------- the resumable writer loop

def atomic_write_text(path: Path, text: str) -> None:
    """Written beside `path`, flushed to disk, then renamed over it: a reader sees the old or the new file."""
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)


def load_journal(directory: Path, key: dict) -> Optional[dict]:
    """The resume journal a killed prepare of `key` left in `directory`, if any."""
    try:
        journal = json.loads((directory / JOURNAL).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None
    return journal if journal.get("key") == key else None


class _Progress:
    """A bar over the input bytes on disk (ETA), with tokens/s and documents beside it."""

    def __init__(self, total_bytes: int, enabled: bool, initial: int):
        self.bar = tqdm(total=total_bytes or None, initial=initial, unit="B", unit_scale=True, desc="prepare",
                        disable=not enabled, leave=False, smoothing=0.1)
        self.started, self.tokens = time.perf_counter(), 0

    def at(self, done_bytes: int) -> None:
        self.bar.update(max(0, done_bytes - self.bar.n))

    def tokens_written(self, tokens: int, documents: int) -> None:
        self.tokens += tokens
        rate = self.tokens / max(time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix_str(f"{self.tokens:,} tokens, {rate:,.0f} tokens/s, {documents:,} docs", refresh=False)


class SeenDigests:
    """The content hashes of the documents kept so far (--dedup), in an SQLite table beside the shards:
    memory stays at SQLite's page cache (_DEDUP_CACHE_KIB) whatever the document count, and the disk
    holds ~25-40 bytes per unique document. A row records the journal generation that added it: an
    uncommitted one dies with a killed process, and a resume drops those committed after its journal."""

    def __init__(self, path: Path, resume_generation: Optional[int]):
        if resume_generation is None:
            for stale in path.parent.glob(path.name + "*"):  # the table and SQLite's own journal
                stale.unlink()
        self.db = sqlite3.connect(path)
        self.db.execute(f"PRAGMA cache_size=-{_DEDUP_CACHE_KIB}")
        self.db.execute("CREATE TABLE IF NOT EXISTS seen (digest BLOB PRIMARY KEY, generation INTEGER) WITHOUT ROWID")
        if resume_generation is not None:
            self.db.execute("DELETE FROM seen WHERE generation > ?", (resume_generation,))
        self.db.commit()
        self.generation = (resume_generation or 0) + 1

    def add(self, digest: bytes) -> bool:
        """True when the digest is new (the document is kept)."""
        return self.db.execute("INSERT OR IGNORE INTO seen VALUES (?, ?)", (digest, self.generation)).rowcount == 1

    def commit(self) -> int:
        """Makes every digest added so far durable; -> the generation the journal records."""
        self.db.commit()
        self.generation += 1
        return self.generation - 1

    def close(self) -> None:
        self.db.close()


class StreamingPrepare:
    """One run of prepare over `corpus` into `directory` (held under the caller's lock)."""

    def __init__(self, corpus: Corpus, tokenizer: Tokenizer, directory: Path, key: dict, val_fraction: float,
                 writer_factory, dedup: bool = False):
        self.corpus, self.tokenizer, self.directory, self.key = corpus, tokenizer, directory, key
        self.val_fraction, self.writer_factory, self.dedup = val_fraction, writer_factory, dedup
        self.routed = {split: 0 for split in SPLITS}  # documents sent to each split (held one included)
        self.held: Dict[str, Optional[str]] = {split: None for split in SPLITS}
        self.chunks: Dict[str, List[str]] = {split: [] for split in SPLITS}
        self.chunk_chars = {split: 0 for split in SPLITS}
        self.empty = self.duplicates = self.files_done = 0
        self.seen: Optional[SeenDigests] = None

    # ---- resume --------------------------------------------------------------------------------------
    def _open(self):
        journal = load_journal(self.directory, self.key)
        resume = journal is not None and journal["files_done"] > 0
        self.writers = {}
        for split in SPLITS:
            at = (journal["splits"][split]["tokens"], journal["splits"][split]["documents"]) if resume else None
            self.writers[split] = self.writer_factory(self.directory / split, at)
        if self.dedup:
            self.seen = SeenDigests(self.directory / DEDUP_HASHES, journal["dedup_generation"] if resume else None)
        if resume:
            self.files_done, self.empty, self.duplicates = (journal[k] for k in ("files_done", "empty", "duplicates"))
            self.routed, self.held = journal["routed"], journal["held"]
            log.info("resuming the prepare of %s after %d finished input files", self.directory, self.files_done)
        return resume

    def _save_journal(self) -> None:
        for writer in self.writers.values():
            writer.flush()
        generation = self.seen.commit() if self.seen is not None else 0
        atomic_write_text(self.directory / JOURNAL, json.dumps({
            "key": self.key, "files_done": self.files_done, "empty": self.empty, "duplicates": self.duplicates,
            "routed": self.routed, "held": self.held, "dedup_generation": generation,
            "splits": {s: {"tokens": w.tokens, "documents": w.documents} for s, w in self.writers.items()}}))

    # ---- documents -----------------------------------------------------------------------------------
    def _route(self, document: str, pool: OrderedPool):
        if not document.strip():
            self.empty += 1
            return
        if self.dedup:
            digest = hashlib.blake2b(document.encode("utf-8", "surrogatepass"), digest_size=16).digest()
            if not self.seen.add(digest):
                self.duplicates += 1
                return
        split = "validation" if is_validation(document, self.val_fraction) else "train"
        self.routed[split] += 1
        # Each split holds its latest document back: a corpus whose documents all hash to one side moves
        # that one across at the end (corpus.settle_held), after the rest was already written.
        previous, self.held[split] = self.held[split], document
        if previous is not None:
            yield from self._add(split, previous, pool)

    def _add(self, split: str, document: str, pool: OrderedPool):
        self.chunks[split].append(document)
        self.chunk_chars[split] += len(document)
        if self.chunk_chars[split] >= _CHUNK_CHARS:
            yield from self._submit(split, pool)

    def _submit(self, split: str, pool: OrderedPool):
        if self.chunks[split]:
            texts, self.chunks[split], self.chunk_chars[split] = self.chunks[split], [], 0
            yield from pool.submit(split, texts)

    def _write(self, results, progress: _Progress) -> None:
        for split, (tokens, lengths) in results:
            self.writers[split].add_documents(tokens, lengths)
            progress.tokens_written(int(tokens.size), sum(w.documents for w in self.writers.values()))

    # ---- the run -------------------------------------------------------------------------------------
    def run(self, num_workers: int, progress: bool) -> dict:
        units = self.corpus.units()
        resumed = self._open()
        starts = [0, *itertools.accumulate(size for _, size, _ in units)]  # byte offset of each input file
        bar = _Progress(starts[-1], progress, starts[self.files_done])
        try:
            with OrderedPool(self.tokenizer, num_workers) as pool:
                since_bytes, since_time = 0, time.perf_counter()
                for index in range(self.files_done, len(units)):
                    name, size, read = units[index]
                    base = starts[index]
                    for document in read(lambda done: bar.at(base + done)):
                        self._write(self._route(document, pool), bar)
                    self.files_done, since_bytes = index + 1, since_bytes + size
                    if since_bytes >= _JOURNAL_BYTES or time.perf_counter() - since_time >= _JOURNAL_SECONDS:
                        for split in SPLITS:
                            self._write(self._submit(split, pool), bar)
                        self._write(pool.drain(), bar)
                        self._save_journal()
                        since_bytes, since_time = 0, time.perf_counter()
                settle_held(self.held, self.routed, self.corpus.name)
                for split in SPLITS:
                    if self.held[split] is not None:
                        self._write(self._add(split, self.held[split], pool), bar)
                    self._write(self._submit(split, pool), bar)
                self._write(pool.drain(), bar)
        finally:
            bar.bar.close()
            if self.seen is not None:
                self.seen.close()
        splits = {}
        for split, writer in self.writers.items():
            splits[split] = {"documents": writer.finish(), "tokens": writer.tokens}
            if hasattr(writer, "shards"):  # data/shards.py: the split's files in order
                splits[split]["shards"] = writer.shards
        files = {name: entry for writer in self.writers.values() for name, entry in writer.checksums.items()}
        (self.directory / DEDUP_HASHES).unlink(missing_ok=True)
        (self.directory / JOURNAL).unlink(missing_ok=True)
        if self.empty:
            log.info("corpus %s: skipped %d empty documents", self.corpus.name, self.empty)
        if self.dedup:
            log.info("corpus %s: dropped %d exact duplicate documents", self.corpus.name, self.duplicates)
        return {"splits": splits, "files": files, "duplicates": self.duplicates, "empty": self.empty,
                "resumed": resumed}

