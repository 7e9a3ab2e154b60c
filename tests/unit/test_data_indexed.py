"""Indexed token shards: round trip, dtype choice, refusal of damaged files, nothing final before finish()."""

import numpy as np
import pytest

from scaletrain.data.indexed import IndexedTokens, IndexedWriter, token_dtype
from scaletrain.errors import DataError


def write(prefix, documents, dtype=np.uint16):
    writer = IndexedWriter(prefix, dtype)
    for chunk in (documents[:2], documents[2:]):
        writer.add_documents(np.concatenate(chunk), np.array([len(d) for d in chunk]))
    writer.finish()


def test_round_trip(tmp_path):
    documents = [np.array([5, 6, 7]), np.array([8]), np.array([9, 10]), np.array([65535, 0])]
    write(tmp_path / "train", documents)
    shard = IndexedTokens(tmp_path / "train")
    assert len(shard) == 4 and shard.num_tokens == 8 and shard.dtype == np.uint16
    for i, document in enumerate(documents):
        assert np.array_equal(shard.document(i), document)
    assert np.array_equal(shard.tokens, np.concatenate(documents))
    assert (tmp_path / "train.bin").stat().st_size == 16


def test_dtype_follows_the_vocab():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32 and token_dtype(250_000) == np.uint32


def test_only_partial_files_exist_before_finish(tmp_path):
    writer = IndexedWriter(tmp_path / "train", np.uint32)
    writer.add_documents(np.arange(10), np.array([10]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.bin.partial", "train.lengths.partial"]
    writer.abort()
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("damage", ["truncate", "extend", "header"])
def test_damaged_shards_are_refused(tmp_path, damage):
    write(tmp_path / "train", [np.arange(4), np.arange(3), np.arange(5)], np.uint32)
    if damage == "header":
        (tmp_path / "train.idx").write_bytes(b"garbage!" + (tmp_path / "train.idx").read_bytes()[8:])
        message = "not a scaletrain index"
    else:
        with open(tmp_path / "train.bin", "r+b") as handle:
            handle.truncate(44 if damage == "truncate" else 52)
        message = r"train.bin has \d+ bytes but its index says 12 tokens \(48 bytes\)"
    with pytest.raises(DataError, match=message):
        IndexedTokens(tmp_path / "train")
    (tmp_path / "train.bin").unlink()
    with pytest.raises(DataError, match="train.bin is missing"):
        IndexedTokens(tmp_path / "train")
