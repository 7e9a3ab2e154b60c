"""Tokenizers: the four trained kinds, offline loading checked against transformers, the vocab check."""

import json

import numpy as np
import pytest

from scaletrain.configs.schema import ModelConfig
from scaletrain.data.tokenizer import check_vocab, load_tokenizer, train_tokenizer
from scaletrain.errors import DataError

def _texts():
    """Pseudo-English with thousands of distinct words, so every kind reaches its full vocab."""
    rng = np.random.default_rng(0)
    syllables = ["ka", "lo", "mi", "ten", "ra", "su", "vo", "er", "ing", "tion", "pre", "un", "st", "qu", "ze"]
    words = ["".join(rng.choice(syllables, size=rng.integers(1, 4))) for _ in range(3000)]
    fixed = ["The quick brown fox jumps over the lazy dog. It was not amused!",
             "Tokenizers split text into pieces; whole words are masked together.",
             "Encoder-decoder models corrupt spans. Decoder-only models predict the next token?"] * 20
    return fixed + [" ".join(rng.choice(words, size=30)) + "." for _ in range(600)]


TEXTS = _texts()
SAMPLE = "The lazy fox splits pieces. Spans are corrupted!"


@pytest.fixture(scope="module")
def tokenizers():
    return {kind: train_tokenizer(kind, TEXTS, 600) for kind in ("byte_bpe", "wordpiece", "unigram", "bart_bpe")}


def test_special_tokens_by_kind(tokenizers):
    gpt, bert, t5, bart = (tokenizers[k] for k in ("byte_bpe", "wordpiece", "unigram", "bart_bpe"))
    assert gpt.eod_id == gpt.backend.token_to_id("<|endoftext|>") and gpt.pad_id == gpt.eod_id
    assert [bert.special_id(r) for r in ("pad", "cls", "sep", "mask")] == [0, 2, 3, 4]
    assert [bart.special_id(r) for r in ("bos", "pad", "eos", "mask")] == [0, 1, 2, 4]
    assert t5.vocab_size == 600 and len(t5.sentinel_ids) == 100
    assert t5.sentinel_ids[0] == 599 and t5.sentinel_ids[99] == 500  # <extra_id_0> is the last id, as in T5
    assert t5.special_id("eos") == t5.backend.token_to_id("</s>") and t5.pad_id == 0
    with pytest.raises(DataError, match=r"no mask token .* data.tokenizer_type=wordpiece or bart_bpe$"):
        gpt.special_id("mask", "data.objective=mlm")
    for tokenizer in tokenizers.values():
        assert tokenizer.vocab_size <= 600 and tokenizer.special_mask()[tokenizer.eod_id]


def test_byte_level_round_trips_any_text(tokenizers):
    text = "naïve café — 漢字 and emoji 🙂\n\ttabs"
    for kind in ("byte_bpe", "bart_bpe"):
        assert tokenizers[kind].decode(tokenizers[kind].encode(text)) == text


def test_word_start_and_sentence_end_tables(tokenizers):
    bert = tokenizers["wordpiece"]
    table = bert.word_start_table()
    ids = bert.encode("tokenizers unamused")
    pieces = [bert.backend.id_to_token(i) for i in ids]
    assert [bool(table[i]) for i in ids] == [not p.startswith("##") for p in pieces]
    gpt = tokenizers["byte_bpe"]
    ends = gpt.sentence_end_table()
    ids = gpt.encode("It was not amused! The dog.")
    assert ends[ids[-1]] and any(ends[i] for i in ids[:-1])  # "!" and "."
    assert not ends[gpt.encode(" fox")[-1]]


def test_saved_folder_matches_transformers(tmp_path, tokenizers):
    from transformers import BertTokenizerFast, PreTrainedTokenizerFast

    gpt = tokenizers["byte_bpe"]
    gpt.save(tmp_path / "tokenizer.json")
    reference = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.hash == gpt.hash
    assert loaded.encode(SAMPLE) == reference(SAMPLE, add_special_tokens=False)["input_ids"]
    # A BERT folder with only vocab.txt (the original release format) against transformers' own reader.
    bert = tokenizers["wordpiece"]
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(bert.token_strings()) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    from_vocab = load_tokenizer(str(folder))
    reference = BertTokenizerFast.from_pretrained(str(folder), local_files_only=True)
    assert from_vocab.encode(SAMPLE) == reference(SAMPLE, add_special_tokens=False)["input_ids"]
    assert from_vocab.encode(SAMPLE) == bert.encode(SAMPLE)


def test_load_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing.json"))
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DataError, match="could not read the tokenizer"):
        load_tokenizer(str(tmp_path / "broken.json"))
    with pytest.raises(DataError, match="holds no tokenizer.json"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(DataError, match="too small"):
        train_tokenizer("byte_bpe", TEXTS, 100)


def test_model_vocab_is_checked_and_padded(tokenizers, caplog):
    tokenizer = tokenizers["byte_bpe"]
    with pytest.raises(DataError, match=rf"model.vocab_size=500 is smaller .* {tokenizer.vocab_size}"):
        check_vocab(ModelConfig(vocab_size=500), tokenizer)
    caplog.set_level("INFO")
    model = ModelConfig(vocab_size=tokenizer.vocab_size)
    assert check_vocab(model, tokenizer, tp=1) == 640
    assert check_vocab(model, tokenizer, tp=4) == 1024  # a multiple of 128 x tp
    assert "padding rows" in caplog.text
    assert np.all(tokenizer.word_start_table()[tokenizer.special_mask()])


def test_a_tokenizer_trains_on_the_corpus_streamed_not_held_in_memory(tmp_path, monkeypatch):
    import itertools

    from scaletrain.configs.schema import DataConfig
    from scaletrain.data import prepare
    from scaletrain.data.corpus import Corpus, split_documents

    read = []

    def documents():
        for index, text in enumerate(TEXTS[:200]):
            read.append(index)
            yield text

    corpus = Corpus("stream", "f" * 64, documents)
    read_when_training_began = []

    def spy(kind, texts, vocab):
        texts = iter(texts)
        first = next(texts)
        read_when_training_began.append(len(read))
        return train_tokenizer(kind, itertools.chain([first], texts), vocab)

    monkeypatch.setattr(prepare, "train_tokenizer", spy)
    streamed = prepare.tokenizer_from_config(DataConfig(cache_dir=str(tmp_path), tokenizer_vocab=512), corpus)
    assert read_when_training_began[0] <= 3 and len(read) == 200  # a document or two ahead, not the corpus
    assert streamed.hash == train_tokenizer("byte_bpe", split_documents(corpus, 0.02)[0], 512).hash
