"""Bounded shards: a split written as several .bin/.idx pairs of at most data.max_shard_bytes reads back as
the same token stream, documents and samples as the one-file split; a prepare killed after shards were
closed past its last durable point resumes to the same bytes."""

import json

import numpy as np
import pytest

from scaletrain.cli import main
from scaletrain.data import streaming
from scaletrain.data.corpus import load_corpus
from scaletrain.data.loader import SampleView
from scaletrain.data.megatron import MegatronTokens
from scaletrain.data.prepare import open_prepared, prepare, staging_dir
from scaletrain.data.shards import ConcatTokens
from scaletrain.data.tokenizer import train_tokenizer

WORDS = "shard bound token stream document split index resume journal bytes".split()
SHARD_BYTES = 1000  # 500 uint16 tokens


def documents(seed, count):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(3, 60))) for _ in range(count)]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer("byte_bpe", documents(0, 100), 512)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("in")
    for index in range(4):
        texts = documents(index + 1, 60)
        (root / f"{index}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return root


class Window:  # the loader's view of an objective: windows of `seq_len + 1` tokens every seq_len
    name = "clm"

    def window_length(self, seq_len):
        return seq_len + 1

    def stride(self, seq_len):
        return seq_len


def test_concat_tokens_slices_across_shard_ends_like_one_array():
    whole = np.arange(23, dtype=np.uint16)
    stream = ConcatTokens([whole[:7], whole[7:8], whole[8:20], whole[20:]])
    for start in range(24):
        for stop in range(start, 25):
            assert np.array_equal(stream[start:stop], whole[start:stop]), (start, stop)
    assert len(stream) == 23 and stream[7] == 7 and stream[-1] == 22


@pytest.mark.parametrize("shard_format", ["scaletrain", "megatron"])
def test_bounded_shards_read_back_as_the_one_file_split(tmp_path, tokenizer, corpus_dir, shard_format):
    corpus = load_corpus(str(corpus_dir))
    one = prepare(corpus, tokenizer, tmp_path / "one", num_workers=0, progress=False, shard_format=shard_format)
    many = prepare(corpus, tokenizer, tmp_path / "many", num_workers=0, progress=False, shard_format=shard_format,
                   max_shard_bytes=SHARD_BYTES)
    shards = many["splits"]["train"]["shards"]
    assert len(shards) > 5 and shards[0]["prefix"] == "train" and shards[1]["prefix"] == "train-00001"
    for shard in shards:  # each within the bound, or one document on its own
        size = (tmp_path / "many" / f"{shard['prefix']}.bin").stat().st_size
        assert size <= SHARD_BYTES or shard["documents"] == 1, shard
        if shard_format == "megatron":  # every shard is a Megatron prefix of its own
            assert MegatronTokens(tmp_path / "many" / shard["prefix"]).num_documents == shard["documents"]
    assert sum(s["tokens"] for s in shards) == one["splits"]["train"]["tokens"]
    a, b = open_prepared(tmp_path / "one"), open_prepared(tmp_path / "many")
    for split in ("train", "validation"):
        x, y = getattr(a, split), getattr(b, split)
        assert (x.num_tokens, x.num_documents) == (y.num_tokens, y.num_documents)
        assert np.array_equal(np.asarray(x.tokens[:]), np.asarray(y.tokens[:]))
        assert np.array_equal(x.offsets, y.offsets)
        assert all(np.array_equal(x.document(i), y.document(i)) for i in range(0, x.num_documents, 7))
    views = [SampleView(data.train, Window(), 64) for data in (a, b)]
    assert views[0].num_samples == views[1].num_samples
    assert all(np.array_equal(views[0][i], views[1][i]) for i in range(views[0].num_samples))
    assert main(["data", "prepare", "--check", str(tmp_path / "many")]) == 0


def test_a_prepare_killed_after_closing_shards_past_its_journal_resumes_to_the_same_bytes(
        tmp_path, tokenizer, corpus_dir, monkeypatch):
    corpus = load_corpus(str(corpus_dir))
    reference = prepare(corpus, tokenizer, tmp_path / "whole", num_workers=0, progress=False,
                        max_shard_bytes=SHARD_BYTES)
    monkeypatch.setattr(streaming, "_JOURNAL_BYTES", 0)  # a durable point after every input file
    monkeypatch.setattr(streaming, "_CHUNK_CHARS", 1)  # every document written as soon as it is read
    corpus = load_corpus(str(corpus_dir))
    opened, read_file = [], corpus._read_file

    def killed_late_in_the_third_file(path, report):
        opened.append(path.name)
        for number, document in enumerate(read_file(path, report)):
            if len(opened) == 3 and number == 50:
                raise KeyboardInterrupt  # shards were closed since the journal of file 2
            yield document

    corpus._read_file = killed_late_in_the_third_file
    with pytest.raises(KeyboardInterrupt):
        prepare(corpus, tokenizer, tmp_path / "resumed", num_workers=0, progress=False, max_shard_bytes=SHARD_BYTES)
    staging = staging_dir(tmp_path / "resumed")
    journal = json.loads((staging / streaming.JOURNAL).read_text())
    closed = [tokens for tokens in _closed_shard_tokens(staging, reference)]
    assert sum(closed) > journal["splits"]["train"]["tokens"]  # the reopen path runs
    corpus._read_file = read_file
    resumed = prepare(corpus, tokenizer, tmp_path / "resumed", num_workers=0, progress=False,
                      max_shard_bytes=SHARD_BYTES)
    assert (resumed["splits"], resumed["files"]) == (reference["splits"], reference["files"])
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == sorted(
        p.name for p in (tmp_path / "whole").iterdir())


def _closed_shard_tokens(staging, reference):
    for shard in reference["splits"]["train"]["shards"]:
        if (staging / f"{shard['prefix']}.idx").is_file():
            yield shard["tokens"]


def test_a_shard_bound_below_one_token_is_refused(tmp_path, capsys):
    code = main(["data", "prepare", "--out", str(tmp_path / "out"), "--max-shard-bytes", "2"])
    assert code == 2
    assert "data.max_shard_bytes" in capsys.readouterr().err
