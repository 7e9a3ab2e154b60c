"""Corpus readers and the built-in corpus."""

import json

import pytest

from scaletrain.data.corpus import builtin_documents, is_validation, load_corpus, split_documents
from scaletrain.errors import DataError


def test_builtin_corpus_is_deterministic_english_prose():
    first, second = load_corpus("builtin"), load_corpus("builtin")
    assert first.fingerprint == second.fingerprint and len(first.fingerprint) == 64
    documents = list(first.documents())
    assert documents == list(builtin_documents())
    assert sum(map(len, documents)) > 1_500_000
    assert any("assert statement" in d.lower() for d in documents[:20])  # pydoc topics come first
    assert any("JSON" in d for d in documents)  # the json module's docstrings
    train, validation = split_documents(first, 0.02)
    assert len(train) + len(validation) == len(documents)
    assert 0.005 < len(validation) / len(documents) < 0.05
    assert all(is_validation(d, 0.02) for d in validation)


def test_text_files_one_document_per_file_or_per_block(tmp_path):
    (tmp_path / "b.txt").write_text("second file\n\nwith two blocks\n")
    (tmp_path / "a.txt").write_text("first file\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.md").write_text("\n\n")
    per_file = list(load_corpus(str(tmp_path)).documents())
    assert per_file == ["first file", "second file\n\nwith two blocks", ""]
    per_block = list(load_corpus(str(tmp_path), split_blank_lines=True).documents())
    assert per_block == ["first file", "second file", "with two blocks"]
    assert list(load_corpus(str(tmp_path / "*.txt")).documents())[0] == "first file"
    train, validation = split_documents(load_corpus(str(tmp_path)), 0.3)
    assert sorted(train + validation) == sorted(["first file", "second file\n\nwith two blocks"])


def test_fingerprint_follows_content_not_time(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("hello")
    before = load_corpus(str(path)).fingerprint
    path.write_text("hello")
    assert load_corpus(str(path)).fingerprint == before
    path.write_text("hello!")
    assert load_corpus(str(path)).fingerprint != before
    assert load_corpus(str(path), split_blank_lines=True).fingerprint != load_corpus(str(path)).fingerprint


def test_jsonl_reader_and_its_errors(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"content": "one"}) + "\n\n" + json.dumps({"content": "two"}) + "\n")
    assert list(load_corpus(str(path), text_field="content").documents()) == ["one", "two"]
    with pytest.raises(DataError, match=r"data.jsonl:1 has no field 'text'.*data.text_field"):
        list(load_corpus(str(path)).documents())
    path.write_text("{broken\n")
    with pytest.raises(DataError, match=r"data.jsonl:1 is not valid JSON"):
        list(load_corpus(str(path)).documents())


@pytest.mark.parametrize("value, kind", [(None, "null"), (3, "int"), (2.5, "float"), (True, "bool"),
                                         (["a", "b"], "list"), ({"text": "a"}, "dict")])
def test_a_text_value_that_is_not_a_string_names_its_file_and_line(tmp_path, value, kind):
    # It used to train on the value's repr ("None", "[...]") without a word.
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n\n" + json.dumps({"text": value}) + "\n")
    with pytest.raises(DataError, match=rf"data.jsonl:3: field 'text' is {kind}, not a string; fix or remove"):
        list(load_corpus(str(path)).documents())


def test_undecodable_bytes_are_counted_or_replaced(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"ok \xff\xfe and \x80 end")
    with pytest.raises(DataError, match=r"bad.txt has 3 undecodable bytes .* data.decode_errors=replace"):
        list(load_corpus(str(path)).documents())
    assert list(load_corpus(str(path), decode_errors="replace").documents()) == ["ok \ufffd\ufffd and \ufffd end"]


def test_missing_and_empty_inputs(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_corpus(str(tmp_path / "nope"))
    with pytest.raises(DataError, match="matches no file"):
        load_corpus(str(tmp_path / "*.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="contains no file"):
        load_corpus(str(tmp_path / "empty"))
    (tmp_path / "empty" / "blank.txt").write_text("   \n")
    with pytest.raises(DataError, match="is empty"):
        split_documents(load_corpus(str(tmp_path / "empty")), 0.02)


def test_parquet_and_saved_hf_datasets(tmp_path):
    import datasets  # in the test extra: the optional readers are tested, not skipped
    table = datasets.Dataset.from_dict({"text": ["alpha doc", "beta doc"], "id": [1, 2]})
    table.to_parquet(str(tmp_path / "part.parquet"))
    assert list(load_corpus(str(tmp_path / "part.parquet")).documents()) == ["alpha doc", "beta doc"]
    table.save_to_disk(str(tmp_path / "saved"))
    corpus = load_corpus(str(tmp_path / "saved"))
    assert list(corpus.documents()) == ["alpha doc", "beta doc"]
    with pytest.raises(DataError, match="no column 'body'"):
        list(load_corpus(str(tmp_path / "saved"), text_field="body").documents())
    datasets.Dataset.from_dict({"text": ["alpha doc", None]}).to_parquet(str(tmp_path / "nulls.parquet"))
    with pytest.raises(DataError, match=r"nulls.parquet row 1: field 'text' is null, not a string"):
        list(load_corpus(str(tmp_path / "nulls.parquet")).documents())


@pytest.mark.parametrize("val_fraction, train, validation", [
    (1e-12, ["a one", "b two"], ["c three"]),  # nothing hashed into validation: the last document is held out
    (1 - 1e-12, ["c three"], ["a one", "b two"]),  # everything did: the last one trains
])
def test_a_one_sided_split_moves_the_last_document_across(tmp_path, val_fraction, train, validation):
    from scaletrain.data.corpus import train_documents

    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.txt").write_text({"a": "a one", "b": "b two", "c": "c three"}[name])
    corpus = load_corpus(str(tmp_path))
    assert split_documents(corpus, val_fraction) == (train, validation)
    assert list(train_documents(corpus, val_fraction)) == train
    for name in ("b", "c"):
        (tmp_path / f"{name}.txt").unlink()
    assert split_documents(load_corpus(str(tmp_path)), val_fraction) == (["a one"], ["a one"])


def test_a_folder_mixing_jsonl_and_text_is_refused_not_read_as_text(tmp_path):
    from scaletrain.data.corpus import load_corpus
    from scaletrain.errors import DataError

    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n')
    (tmp_path / "b.txt").write_text("two\n")
    with pytest.raises(DataError, match=r"mixes \.jsonl files with \.txt files"):
        list(load_corpus(str(tmp_path)).documents())
