"""Streaming prepare: compressed inputs, --dedup, and resuming a killed prepare without redoing finished files."""

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest

from scaletrain.data import streaming
from scaletrain.data.corpus import load_corpus
from scaletrain.data.prepare import open_prepared, prepare, staging_dir
from scaletrain.data.tokenizer import train_tokenizer

WORDS = "streams shards tokens workers resume journal bytes corpus epoch order".split()


def documents(seed, count):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(3, 40))) for _ in range(count)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer("byte_bpe", documents(0, 200), 512)


def write_files(root, per_file, compress):
    """Six JSONL files, each compressed (gzip / zstd / none); returns every document in order."""
    import zstandard

    root.mkdir()
    everything = []
    for index in range(6):
        texts = documents(index + 1, per_file)
        everything += texts
        data = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
        kind = compress[index % len(compress)]
        if kind == "gz":
            (root / f"{index}.jsonl.gz").write_bytes(gzip.compress(data))
        elif kind == "zst":
            (root / f"{index}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
        else:
            (root / f"{index}.jsonl").write_bytes(data)
    return everything


def test_compressed_inputs_read_as_the_plain_text(tmp_path):
    expected = write_files(tmp_path / "in", 30, ("gz", "zst", "plain"))
    assert list(load_corpus(str(tmp_path / "in")).documents()) == expected


def test_dedup_drops_exact_duplicates_and_counts_them(tmp_path, tokenizer):
    texts = documents(9, 50)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts + texts[:20]))
    corpus = load_corpus(str(tmp_path / "in"))
    metadata = prepare(corpus, tokenizer, tmp_path / "dedup", num_workers=0, progress=False, dedup=True)
    unique = len(set(texts))
    assert metadata["duplicates"] == len(texts) + 20 - unique
    assert sum(s["documents"] for s in metadata["splits"].values()) == unique


def test_a_dedup_prepare_killed_after_committing_its_hashes_resumes_exactly(tmp_path, tokenizer, monkeypatch):
    # Every file repeats documents of the one before, so a digest committed for a file the journal does not
    # count yet would drop that file's documents as duplicates on the resume.
    (tmp_path / "in").mkdir()
    texts = documents(11, 140)
    for index in range(6):
        part = texts[20 * index:20 * index + 40]
        (tmp_path / "in" / f"{index}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in part))
    corpus = load_corpus(str(tmp_path / "in"))
    reference = prepare(corpus, tokenizer, tmp_path / "whole", num_workers=0, progress=False, dedup=True)
    assert reference["duplicates"] == 100
    monkeypatch.setattr(streaming, "_JOURNAL_BYTES", 0)
    journals, write = [], streaming.atomic_write_text

    def killed_at_the_third_journal(path, text):
        if path.name == streaming.JOURNAL and len(journals) == 2:
            raise KeyboardInterrupt  # the hashes of file 2 are committed, the journal still says 2 files
        journals.append(path)
        write(path, text)

    monkeypatch.setattr(streaming, "atomic_write_text", killed_at_the_third_journal)
    with pytest.raises(KeyboardInterrupt):
        prepare(corpus, tokenizer, tmp_path / "resumed", num_workers=0, progress=False, dedup=True)
    monkeypatch.setattr(streaming, "atomic_write_text", write)
    metadata = prepare(corpus, tokenizer, tmp_path / "resumed", num_workers=0, progress=False, dedup=True)
    assert (metadata["duplicates"], metadata["splits"], metadata["files"]) == (
        reference["duplicates"], reference["splits"], reference["files"])


def test_the_dedup_hashes_do_not_grow_this_process_memory(tmp_path):
    import hashlib
    import itertools
    import tracemalloc

    seen = streaming.SeenDigests(tmp_path / streaming.DEDUP_HASHES, None)
    digests = [hashlib.blake2b(str(i).encode(), digest_size=16).digest() for i in range(50_000)]
    tracemalloc.start()
    try:
        kept = sum(seen.add(digest) for digest in itertools.chain(digests, digests[:1000]))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    seen.close()
    assert kept == 50_000
    assert peak < 100_000  # a set of the same digests takes ~4 MB; SQLite's page cache is outside Python's heap


def folder_bytes(folder):
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_a_killed_prepare_resumes_after_its_finished_files(tmp_path, tokenizer, monkeypatch):
    write_files(tmp_path / "in", 200, ("gz", "zst"))
    reference = prepare(load_corpus(str(tmp_path / "in")), tokenizer, tmp_path / "whole", num_workers=2,
                        progress=False)
    # The folder held an older prepare (of the first file): it must stay whole until the new one is done.
    prepare(load_corpus(str(tmp_path / "in" / "0.jsonl.gz")), tokenizer, tmp_path / "resumed", num_workers=0,
            progress=False)
    old = folder_bytes(tmp_path / "resumed")
    monkeypatch.setattr(streaming, "_JOURNAL_BYTES", 0)  # a durable point after every file
    corpus = load_corpus(str(tmp_path / "in"))
    opened, read_file = [], corpus._read_file

    def killed_at_the_fifth_file(path, report):
        opened.append(path.name)
        if len(opened) == 5:
            raise KeyboardInterrupt  # as a kill would, mid-run: nothing cleans up
        return read_file(path, report)

    corpus._read_file = killed_at_the_fifth_file
    with pytest.raises(KeyboardInterrupt):
        prepare(corpus, tokenizer, tmp_path / "resumed", num_workers=2, progress=False)
    assert folder_bytes(tmp_path / "resumed") == old
    assert open_prepared(tmp_path / "resumed").metadata["splits"] != reference["splits"]
    assert (staging_dir(tmp_path / "resumed") / streaming.JOURNAL).exists()
    opened.clear()
    metadata = prepare(corpus, tokenizer, tmp_path / "resumed", num_workers=2, progress=False)
    assert opened == ["4.jsonl.gz", "5.jsonl.zst"]  # the four finished files were not read again
    assert metadata["splits"] == reference["splits"]
    assert metadata["files"] == reference["files"]  # the resumed writers hashed what they kept
    assert sorted(metadata["files"]) == ["train.bin", "train.idx", "validation.bin", "validation.idx"]
    whole, resumed = open_prepared(tmp_path / "whole"), open_prepared(tmp_path / "resumed")
    for split in ("train", "validation"):
        assert np.array_equal(getattr(whole, split).tokens, getattr(resumed, split).tokens)
        assert np.array_equal(getattr(whole, split).offsets, getattr(resumed, split).offsets)
    assert not list((tmp_path / "resumed").glob("*.partial")) and not (tmp_path / "resumed" / streaming.JOURNAL).exists()
    assert not staging_dir(tmp_path / "resumed").exists()


def test_a_prepare_killed_between_its_two_renames_is_finished_by_the_next(tmp_path, tokenizer, monkeypatch):
    write_files(tmp_path / "in", 20, ("plain",))
    out = tmp_path / "out"
    prepare(load_corpus(str(tmp_path / "in" / "0.jsonl")), tokenizer, out, num_workers=0, progress=False)
    old = folder_bytes(out)
    corpus = load_corpus(str(tmp_path / "in"))
    replace, renames = os.replace, []

    def killed_after_the_first_folder_rename(source, target):
        if Path(source) == out:  # the old folder moves aside; a kill now leaves no <out> at all
            replace(source, target)
            raise KeyboardInterrupt
        replace(source, target)

    monkeypatch.setattr(os, "replace", killed_after_the_first_folder_rename)
    with pytest.raises(KeyboardInterrupt):
        prepare(corpus, tokenizer, out, num_workers=0, progress=False)
    monkeypatch.setattr(os, "replace", replace)
    assert not out.exists() and staging_dir(out).is_dir()
    read_file = corpus._read_file
    corpus._read_file = lambda path, report: renames.append(path) or read_file(path, report)
    metadata = prepare(corpus, tokenizer, out, num_workers=0, progress=False)
    assert renames == []  # the complete staging folder was swapped in, not prepared again
    assert folder_bytes(out) != old and open_prepared(out).metadata == metadata
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", "in", "out"]


def _worker_facts(_):
    import signal
    return os.getppid(), signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGINT)


def test_tokenizer_workers_come_from_the_forkserver_and_leave_the_stop_signals_to_the_parent(tokenizer):
    # A fork of this (threaded) process could hang a worker for good; a worker that died of a SIGUSR1 meant
    # for the trainer would break the pool.
    import signal

    with streaming.OrderedPool(tokenizer, 2) as pool:
        parent, on_usr1, on_int = pool._pool.submit(_worker_facts, None).result()
        [(tag, (tokens, lengths))] = list(pool.submit("t", ["streams shards"])) + list(pool.drain())
    assert parent != os.getpid()
    assert on_usr1 == signal.SIG_IGN and on_int == signal.SIG_IGN
    assert tag == "t" and tokens.tolist() == tokenizer.encode("streams shards") + [tokenizer.eod_id]


def test_signals_held_delivers_a_stop_after_the_block_not_inside_it():
    import signal

    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda number, frame: seen.append("handler"))
    try:
        with streaming.signals_held():
            os.kill(os.getpid(), signal.SIGUSR1)
            seen.append("inside")
        seen.append("after")
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert seen == ["inside", "handler", "after"]
