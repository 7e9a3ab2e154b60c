"""data/tasks.py: labelled records from every supported format, label spaces and their refusals (one line
each), the families' framing, and validation batches that cover every record once."""

import json

import numpy as np
import pytest
import torch

from scaletrain.configs.schema import DataConfig, validate_cross_fields
from scaletrain.configs.store import compose_config
from scaletrain.data.tasks import (IGNORE_INDEX, LabelledSet, build_task_data, label_values, read_records,
                                   training_labels, validation_batches)
from scaletrain.errors import ConfigError, DataError

ROWS = [{"text": "a cat sat", "second": "on a mat", "label": "yes"},
        {"text": "the dog ran", "second": "far away", "label": "no"},
        {"text": "birds fly", "second": "south", "label": "yes"}]


def _write(path, rows):
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif suffix in (".csv", ".tsv"):
        sep = "," if suffix == ".csv" else "\t"
        path.write_text(sep.join(rows[0]) + "\n" + "".join(sep.join(map(str, r.values())) + "\n" for r in rows))
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("name", ["t.jsonl", "t.csv", "t.tsv", "t.parquet", "saved"])
def test_every_format_gives_the_same_records(tmp_path, name):
    data = DataConfig(task="classification", train_files="x", text_pair_field="second")
    records = read_records(str(_write(tmp_path / name, ROWS)), data, "train")
    assert [(r.text, r.pair, r.label) for r in records] == [(r["text"], r["second"], r["label"]) for r in ROWS]
    labels = training_labels(records, "classification", 0, name, "label")
    assert labels.names == ["no", "yes"]  # sorted: the ids are stable whatever the file order
    assert label_values(records, labels, "train").tolist() == [1, 0, 1]


def test_integer_ids_are_kept_and_regression_reads_numbers(tmp_path):
    data = DataConfig(task="classification", train_files="x")
    rows = [{"text": "x", "label": 2}, {"text": "y", "label": 0}]
    records = read_records(str(_write(tmp_path / "ids.jsonl", rows)), data, "train")
    labels = training_labels(records, "classification", 0, "ids", "label")
    assert labels.names == ["0", "1", "2"] and label_values(records, labels, "train").tolist() == [2, 0]
    csv = read_records(str(_write(tmp_path / "sts.csv", [{"text": "x", "label": 3.5}, {"text": "y", "label": 1}])),
                       data, "train")  # a CSV's numbers are strings
    scores = training_labels(csv, "regression", 0, "sts", "label")
    assert label_values(csv, scores, "train").tolist() == [3.5, 1.0]


def _task_cfg(tmp_path, train_rows, validation_rows=None, *extra):
    train = _write(tmp_path / "train.jsonl", train_rows)
    overrides = ["model=bert_tiny", "model.vocab_size=512", "data.tokenizer_type=wordpiece", "data.tokenizer_vocab=512",
                 "data.task=classification", f"data.train_files={train}", "trainer.seq_len=16", *extra]
    if validation_rows is not None:
        overrides.append(f"data.validation_files={_write(tmp_path / 'validation.jsonl', validation_rows)}")
    return compose_config(overrides + [f"data.cache_dir={tmp_path / 'cache'}"])


@pytest.mark.parametrize("train, validation, extra, message", [
    ([{"text": "a", "y": "p"}, {"text": "b", "y": "q"}], None, [], "has no field 'label'.*data.label_field"),
    ([{"text": "a", "label": "p"}, {"text": "b", "label": 1}], None, [], r"mix types \(1 string, 1 integer\)"),
    (ROWS, [{"text": "c", "label": "maybe"}], [], "validation label 'maybe' never occurs in the training"),
    (ROWS, ROWS, ["model.num_labels=3"], "model.num_labels=3 but the training labels .* have 2 classes"),
    ([], None, [], "holds no record"),
    ([{"text": 5, "label": "p"}], None, [], "field 'text' is int, not a string"),
    ([{"text": "a", "label": 0.5}, {"text": "b", "label": 1.5}], None, [], "strings or integer ids.*regression"),
    (ROWS, [{"text": "c", "label": 1}], [], "label 1 is integer but the training labels are string"),
])
def test_bad_task_input_is_one_line(tmp_path, train, validation, extra, message):
    with pytest.raises(DataError, match=message) as error:
        build_task_data(_task_cfg(tmp_path, train, validation, *extra))
    assert "\n" not in str(error.value)


def test_undecodable_file_is_one_line(tmp_path):
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "caf\xe9", "label": "a"}\n')
    with pytest.raises(DataError, match="not UTF-8.*data.decode_errors=replace"):
        read_records(str(tmp_path / "bad.jsonl"), DataConfig(task="classification", train_files="x"), "train")


def test_config_refusals():
    with pytest.raises(ConfigError, match="needs labelled records"):
        compose_config(["data.task=classification"])
    cfg = compose_config(["data.task=classification", "data.train_files=x", "checkpoint.keep_best=val_pearson"])
    with pytest.raises(ConfigError, match="checkpoint.keep_best=val_pearson is not a metric of data.task=classification"):
        validate_cross_fields(cfg, world_size=1)
    cfg = compose_config(["model=gpt_tiny", "data.task=classification", "data.train_files=x", "parallel.pp=2"])
    with pytest.raises(ConfigError, match="needs parallel.pp=1"):
        validate_cross_fields(cfg, world_size=2)


def test_bert_frames_pairs_and_t5_reads_the_text_in_its_decoder(tmp_path):
    rows = ROWS * 4
    bert = build_task_data(_task_cfg(tmp_path, rows, rows, "data.text_pair_field=second"))
    tokenizer, example = bert.tokenizer, bert.train[0]
    cls, sep = tokenizer.role_id("cls"), tokenizer.role_id("sep")
    first, second = tokenizer.encode(rows[0]["text"]), tokenizer.encode(rows[0]["second"])
    n = 3 + len(first) + len(second)
    assert example["input_ids"][:n].tolist() == [cls, *first, sep, *second, sep]
    assert example["token_type_ids"][:n].tolist() == [0] * (len(first) + 2) + [1] * (len(second) + 1)
    assert example["attention_mask"].sum() == n and (example["input_ids"][n:] == tokenizer.pad_id).all()
    t5 = build_task_data(_task_cfg(tmp_path, rows, rows, "model=t5_tiny", "data.tokenizer_type=unigram"))
    example = t5.train[0]
    pad, eos = t5.tokenizer.pad_id, t5.tokenizer.role_id("eos")
    n = int(example["attention_mask"].sum())
    assert example["input_ids"][n - 1] == eos  # a </s>, and the decoder sees pad (its start), then the text
    assert example["decoder_input_ids"][:n].tolist() == [pad, *example["input_ids"][:n - 1].tolist()]


def test_validation_batches_cover_every_record_once_over_dp_ranks():
    labels = np.arange(7) % 3
    split = LabelledSet("validation", {"input_ids": np.arange(7)[:, None].repeat(4, 1), "labels": labels}, 4)
    seen = []
    for rank in range(2):
        batches = list(validation_batches(split, micro_batch=2, dp_rank=rank, dp_size=2))
        assert len(batches) == 2  # 7 records padded to 8: every rank runs the same number of batches
        for batch in batches:
            seen += batch["input_ids"][:, 0][batch["labels"] != IGNORE_INDEX].tolist()
    assert sorted(seen) == list(range(7))
    regression = LabelledSet("v", {"input_ids": np.zeros((3, 4), np.int64), "labels": np.ones(3, np.float32)}, 4)
    last = list(validation_batches(regression, micro_batch=2))[-1]["labels"]
    assert last[0] == 1 and torch.isnan(last[1])


def test_the_finetune_experiment_passes_every_config_check():
    cfg = compose_config(["experiment=finetune_classification"])
    validate_cross_fields(cfg, world_size=1)
    assert (cfg.data.task, cfg.data.train_files, cfg.checkpoint.keep_best) == ("classification", "builtin", "val_accuracy")
