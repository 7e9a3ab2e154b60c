"""Megatron-LM's MMIDIDX format both ways, against an encoder and a decoder written here from the format's
public description (Megatron-LM megatron/core/datasets/indexed_dataset.py), not from scaletrain's code:

    .idx = b"MMIDIDX\\x00\\x00" | version u64 = 1 | dtype code u8 | sequence count u64 | document count u64
           | int32 lengths[sequences] | int64 byte pointers[sequences] | int64 document indices[documents+1]
    .bin = the tokens of every sequence back to back
    dtype codes: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16"""

import array
import struct
import subprocess
import sys

import numpy as np
import pytest

from scaletrain import cli
from scaletrain.configs.store import compose_config
from scaletrain.data.megatron import MegatronTokens
from scaletrain.data.prepare import build_datasets, open_prepared
from scaletrain.data.tokenizer import train_tokenizer
from scaletrain.errors import DataError

TYPECODES = {8: ("H", 2), 4: ("i", 4), 1: ("B", 1)}  # code -> (array typecode, bytes per token)


def encode(prefix, documents, code=8, magic=b"MMIDIDX\x00\x00", version=1):
    """documents: a list of documents, each a list of sequences (lists of ints)."""
    typecode, size = TYPECODES[code]
    lengths, pointers, document_indices, tokens, position = [], [], [0], array.array(typecode), 0
    for document in documents:
        for sequence in document:
            lengths.append(len(sequence))
            pointers.append(position)
            position += len(sequence) * size
            tokens.extend(sequence)
        document_indices.append(len(lengths))
    with open(f"{prefix}.bin", "wb") as handle:
        handle.write(tokens.tobytes())
    with open(f"{prefix}.idx", "wb") as handle:
        handle.write(magic + struct.pack("<Q", version) + struct.pack("<B", code))
        handle.write(struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(document_indices)))
        handle.write(struct.pack(f"<{len(lengths)}i", *lengths))
        handle.write(struct.pack(f"<{len(pointers)}q", *pointers))
        handle.write(struct.pack(f"<{len(document_indices)}q", *document_indices))


def decode(prefix):
    """-> list of documents, each the list of its token ids (its sequences joined)."""
    with open(f"{prefix}.idx", "rb") as handle:
        raw = handle.read()
    assert raw[:9] == b"MMIDIDX\x00\x00" and struct.unpack_from("<Q", raw, 9)[0] == 1
    code = raw[17]
    sequences, documents = struct.unpack_from("<QQ", raw, 18)
    offset = 34
    lengths = struct.unpack_from(f"<{sequences}i", raw, offset)
    pointers = struct.unpack_from(f"<{sequences}q", raw, offset + 4 * sequences)
    document_indices = struct.unpack_from(f"<{documents}q", raw, offset + 12 * sequences)
    typecode, size = TYPECODES[code]
    data = open(f"{prefix}.bin", "rb").read()
    sequence_tokens = [array.array(typecode, data[p:p + n * size]).tolist() for p, n in zip(pointers, lengths)]
    return [sum(sequence_tokens[a:b], []) for a, b in zip(document_indices[:-1], document_indices[1:])]


def random_documents(rng, count, vocab):
    return [[rng.integers(0, vocab, size=rng.integers(1, 30)).tolist() for _ in range(rng.integers(1, 4))]
            for _ in range(count)]


@pytest.mark.parametrize("code, vocab", [(8, 65535), (4, 200_000)])
def test_reads_an_independently_encoded_prefix_token_for_token(tmp_path, code, vocab):
    documents = random_documents(np.random.default_rng(code), 50, vocab)
    encode(tmp_path / "corpus_text_document", documents, code)
    dataset = MegatronTokens(tmp_path / "corpus_text_document")
    assert isinstance(dataset.tokens, np.memmap) and dataset.num_documents == 50  # no conversion
    for index, document in enumerate(documents):
        assert dataset.document(index).tolist() == sum(document, [])
    assert dataset.tokens.tolist() == sum(sum(documents, []), [])


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer("byte_bpe", [topics[name] for name in sorted(topics)[:30]], 512).save(path)
    return path


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    from pydoc_data.topics import topics

    root = tmp_path_factory.mktemp("corpus")
    for i, name in enumerate(sorted(topics)[:40]):
        (root / f"{i:03d}.txt").write_text(topics[name])
    return root


def prepare(*args):
    return subprocess.run([sys.executable, "-m", "scaletrain.cli", "data", "prepare", "--no-progress",
                           "--num-workers", "0", *map(str, args)], capture_output=True, text=True, timeout=300)


def test_prepare_format_megatron_round_trips_against_the_scaletrain_shards(tmp_path, tokenizer_file, corpus_dir):
    for out, extra in (("native", []), ("megatron", ["--format", "megatron"])):
        result = prepare("--corpus", corpus_dir, "--tokenizer", tokenizer_file, "--out", tmp_path / out, *extra)
        assert result.returncode == 0, result.stderr
    native = open_prepared(tmp_path / "native")
    for split in ("train", "validation"):
        ours = getattr(native, split)
        theirs = decode(tmp_path / "megatron" / split)  # the independent decoder
        assert [ours.document(i).tolist() for i in range(len(ours))] == theirs
    # ... and back: the Megatron folder opens as a prepared folder, and its prefix as data.prepared.
    megatron = open_prepared(tmp_path / "megatron")
    assert np.array_equal(megatron.train.tokens, native.train.tokens)
    cfg = compose_config([f"data.prepared={tmp_path / 'megatron' / 'train'}", f"data.tokenizer={tokenizer_file}"])
    data = build_datasets(cfg)
    held_out = data.validation.num_documents
    assert held_out == max(1, round(0.02 * len(native.train)))
    assert np.array_equal(np.concatenate([data.train.tokens, data.validation.tokens]), native.train.tokens)


def test_training_reads_an_encoded_prefix(tmp_path, tokenizer_file):
    from tests.integration.train_utils import make_trainer, tiny_overrides

    documents = random_documents(np.random.default_rng(0), 200, 512)
    encode(tmp_path / "web", documents)
    trainer = make_trainer(tmp_path / "run", tiny_overrides("gpt", f"data.prepared={tmp_path / 'web'}",
                                                            f"data.tokenizer={tokenizer_file}", "trainer.max_steps=2"))
    assert trainer.train() == 0 and len(trainer.losses) == 2


@pytest.mark.parametrize("problem, message", [
    (dict(magic=b"MMIDIDY\x00\x00"), "magic"), (dict(version=2), "version 2"), (dict(code=1), "uint8"),
])
def test_bad_indexes_exit_2_with_one_line(tmp_path, tokenizer_file, capsys, problem, message):
    encode(tmp_path / "bad", random_documents(np.random.default_rng(1), 5, 200), **problem)
    code = cli.main(["train", f"data.prepared={tmp_path / 'bad'}", f"data.tokenizer={tokenizer_file}",
                     "model.vocab_size=512", f"hydra.run.dir={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and message in err, err


def test_a_prefix_without_a_named_tokenizer_is_refused(tmp_path):
    encode(tmp_path / "web", random_documents(np.random.default_rng(2), 5, 200))
    with pytest.raises(DataError, match="data.tokenizer=PATH"):
        build_datasets(compose_config([f"data.prepared={tmp_path / 'web'}"]))


def test_token_ids_beyond_the_named_tokenizer_are_refused(tmp_path, tokenizer_file):
    # A Megatron prefix records no tokenizer, so ids made with a larger vocab fit the dtype and pass the
    # size checks: data.verify=full reads them all, and the loader checks every sample it hands out.
    from scaletrain.data.loader import Loader
    from scaletrain.data.objectives import CLM

    encode(tmp_path / "web", [[[5, 6, 7, 8] * 4], [[9, 10, 700, 11] * 4], [[12, 13, 14, 15] * 4]])
    overrides = [f"data.prepared={tmp_path / 'web'}", f"data.tokenizer={tokenizer_file}", "data.val_fraction=0.3"]
    with pytest.raises(DataError, match=r"web.bin holds token id 700, outside the 512 tokens of .*data.tokenizer=PATH"):
        build_datasets(compose_config(overrides + ["data.verify=full"]))
    train = build_datasets(compose_config(overrides)).train
    loader = Loader(train, CLM(), 31, 1, 1)
    with pytest.raises(DataError, match="web.bin holds token id 700 at token 18, outside the vocabulary of 512"):
        next(loader)


def test_check_reads_a_megatron_prefix_and_with_a_tokenizer_its_token_ids(tmp_path, tokenizer_file, capsys):
    from scaletrain.cli import main

    encode(tmp_path / "good", [[[5, 6, 7, 8]], [[9, 10], [11]]])
    encode(tmp_path / "bad", [[[5, 6, 7, 8]], [[9, 700, 11]]])
    assert main(["data", "prepare", "--check", str(tmp_path / "good")]) == 0
    assert "index and .bin agree (2 documents 7 uint16 tokens); pass --tokenizer" in capsys.readouterr().out
    assert main(["data", "prepare", "--check", str(tmp_path / "good"), "--tokenizer", str(tokenizer_file)]) == 0
    assert "ok, a Megatron-LM prefix with every token id below 512" in capsys.readouterr().out
    assert main(["data", "prepare", "--check", str(tmp_path / "bad"), "--tokenizer", str(tokenizer_file)]) == 2
    assert "bad.bin holds token id 700, outside the 512 tokens" in capsys.readouterr().err
