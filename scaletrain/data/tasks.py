"""Finetuning tasks (data.task=classification | regression): labelled records -> fixed-length examples for a
model's classification head, fed by the trainer's own Loader.

    records  JSONL, CSV / TSV with a header, parquet, a glob of those, a saved `datasets` folder, or
             "builtin": passages of the built-in corpus labelled by the part of the stdlib they document
    labels   classification: strings (or booleans), sorted and mapped to ids 0..K-1, or integer ids as given;
             regression: numbers (a CSV's numeric strings too)
    framing  the family's template (data/tokenizer.py): BERT [CLS] a [SEP] b [SEP], RoBERTa / BART
             <s> a </s></s> b </s>, T5 a </s> b </s>, GPT a (<eod> b), XLNet a <sep> (b <sep>) <cls>; padded
             on the right to trainer.seq_len, on the left for XLNet (its summary reads the last position)
             An encoder-decoder also reads the text in its decoder, shifted right behind the decoder start
             token, and classifies from the decoder's last non-pad state (Hugging Face's
             Bart/T5ForSequenceClassification do the same: the state at the final </s>)

A `LabelledSet` is a split already cut into examples, so the Loader (epochs, dp split, resume) takes it in
place of a token stream; `validation_batches` covers every validation record exactly once."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch

from scaletrain.data.corpus import Corpus, builtin_sourced_documents, is_validation, resolve_files
from scaletrain.data.prepare import tokenizer_from_config
from scaletrain.data.tokenizer import Tokenizer, family_flavour, framing_backend, load_tokenizer
from scaletrain.errors import DataError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # a padding row's class label (objectives.IGNORE_INDEX); regression pads with NaN
LABELS_FILE = "labels.json"  # in each checkpoint: the task and id -> label name (export writes id2label)
BUILTIN = "builtin"
# The built-in task: which part of the standard library a docstring passage documents.
BUILTIN_CLASSES = {"pydoc": "reference", "asyncio": "asyncio", "email": "email", "xml": "xml", "http": "web",
                   "urllib": "web", "xmlrpc": "web", "wsgiref": "web"}
BUILTIN_PER_CLASS = 180  # the smallest class (xml) has ~185 passages: balanced classes
DATASETS_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")  # a Dataset.save_to_disk folder
SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv",
            ".parquet": "parquet"}


@dataclass
class Record:
    text: str
    pair: Optional[str]
    label: Any
    where: str  # "file:line" or "file row N", for messages


# ------------------------------------------------------------------------------------------ reading

def read_rows(path: Path, split: str, decode_errors: str) -> Iterator[tuple[str, dict]]:
    """(where, record as a dict) for one file or saved `datasets` folder."""
    try:
        yield from _file_rows(path, split, decode_errors)
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8; re-encode it as UTF-8 or set data.decode_errors=replace") from None


def _file_rows(path: Path, split: str, decode_errors: str) -> Iterator[tuple[str, dict]]:
    if path.is_dir():
        yield from _dataset_rows(path, split)
        return
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: a task file must be {', '.join(SUFFIXES)} or a saved datasets folder; rename "
                        f"it or convert it")
    if kind == "parquet":
        import pyarrow.parquet as pq

        for row, record in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path} row {row}", record
        return
    with open(path, newline="", encoding="utf-8", errors=decode_errors) as handle:
        if kind != "jsonl":  # the header names the fields; line numbers count it
            for line, record in enumerate(csv.DictReader(handle, delimiter="," if kind == "csv" else "\t"), 2):
                yield f"{path}:{line}", record
            return
        for line, text in enumerate(handle, 1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}:{line} is not valid JSON ({error.msg}); fix or remove the line") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{line} is not a JSON object; write one object per line")
            yield f"{path}:{line}", record


def _dataset_rows(folder: Path, split: str) -> Iterator[tuple[str, dict]]:
    import datasets

    try:
        dataset = datasets.load_from_disk(str(folder))
    except FileNotFoundError:
        raise DataError(f"{folder} is neither a task file nor a saved datasets folder; pass a file, a glob or "
                        f"the folder of Dataset.save_to_disk") from None
    if isinstance(dataset, datasets.DatasetDict):
        wanted = "train" if split == "train" else next((s for s in ("validation", "test") if s in dataset), "")
        if wanted not in dataset:
            raise DataError(f"{folder} holds splits {', '.join(dataset)} but no {split} split; save one")
        dataset = dataset[wanted]
    for row, record in enumerate(dataset):
        yield f"{folder} row {row}", record


def _field(where: str, record: dict, name: str, option: str, text: bool) -> Any:
    if name not in record:
        raise DataError(f"{where} has no field {name!r} (fields: {', '.join(map(str, record))}); set "
                        f"data.{option} to the field that holds it")
    value = record[name]
    if text and not isinstance(value, str):
        kind = "null" if value is None else type(value).__name__
        raise DataError(f"{where}: field {name!r} is {kind}, not a string; fix or remove the record, or set "
                        f"data.{option}")
    return value


def read_records(spec: str, data_cfg, split: str) -> list[Record]:
    folder = Path(os.path.expanduser(spec))
    saved = folder.is_dir() and any((folder / name).is_file() for name in DATASETS_MARKERS)
    files = [folder] if saved else resolve_files(spec, f"data.{split}_files")
    pair_field = data_cfg.text_pair_field
    records = []
    for path in files:
        for where, row in read_rows(path, split, data_cfg.decode_errors):
            records.append(Record(_field(where, row, data_cfg.text_field, "text_field", True),
                                  _field(where, row, pair_field, "text_pair_field", True) if pair_field else None,
                                  _field(where, row, data_cfg.label_field, "label_field", False), where))
    if not records:
        raise DataError(f"data.{split}_files={spec} holds no record; point it at a file with labelled records")
    return records


def builtin_records() -> list[Record]:
    """Docstring paragraphs of 80..1000 characters labelled by their part of the stdlib, BUILTIN_PER_CLASS
    each, picked by a hash of the text (so the choice does not follow file order)."""
    by_class: dict[str, list[Record]] = {}
    for source, document in builtin_sourced_documents():
        label = BUILTIN_CLASSES.get(source.split("/")[0])
        if label is None:
            continue
        for paragraph in document.split("\n\n"):
            text = " ".join(paragraph.split())
            if 80 <= len(text) <= 1000:
                by_class.setdefault(label, []).append(Record(text, None, label, f"builtin {source}"))
    records = []
    for label in sorted(by_class):
        ranked = sorted(by_class[label], key=lambda r: hashlib.blake2b(r.text.encode(), digest_size=8).digest())
        records += ranked[:BUILTIN_PER_CLASS]
    return records


def _split(records: list[Record], val_fraction: float, spec: str) -> tuple[list[Record], list[Record]]:
    """Held out by a hash of the text, as the corpus splits documents."""
    train, validation = [], []
    for record in records:
        (validation if is_validation(record.text + (record.pair or ""), val_fraction) else train).append(record)
    if not train or not validation:
        raise DataError(f"data.val_fraction={val_fraction} holds out {len(validation)} of the {len(records)} "
                        f"records of {spec}; change data.val_fraction or set data.validation_files")
    return train, validation


# ------------------------------------------------------------------------------------------- labels

def _kind(value: Any) -> str:
    if isinstance(value, (str, bool)):
        return "string"  # booleans are class names ("False", "True")
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    return "null" if value is None else type(value).__name__


def _preview(names: list[str]) -> str:
    return ", ".join(names[:6]) + (f", ... ({len(names)} in all)" if len(names) > 6 else "")


@dataclass
class Labels:
    names: list[str]  # id -> label name; [] for regression
    kind: str  # what the training labels are: string | integer | number (regression)


def training_labels(records: list[Record], task: str, num_labels: int, spec: str, label_field: str) -> Labels:
    """The label space of the training records; checks model.num_labels against it."""
    if task == "regression":
        return Labels([], "number")
    kinds = Counter(_kind(record.label) for record in records)
    if len(kinds) > 1:
        counts = ", ".join(f"{count} {kind}" for kind, count in kinds.most_common())
        raise DataError(f"{spec}: the labels in {label_field!r} mix types ({counts}); make every label a string "
                        f"or every label an integer id")
    kind = next(iter(kinds))
    if kind == "string":
        names = sorted({str(record.label) for record in records})
    elif kind == "integer":
        negative = next((r for r in records if r.label < 0), None)
        if negative is not None:
            raise DataError(f"{negative.where}: label {negative.label} is negative; integer labels are class ids "
                            f"0..K-1")
        names = [str(i) for i in range(max(max(r.label for r in records) + 1, num_labels))]
    else:
        where = next(r.where for r in records)
        raise DataError(f"{where}: classification labels must be strings or integer ids but {label_field!r} holds "
                        f"{kind} values; fix the labels, or set data.task=regression for numbers")
    if len(names) < 2:
        raise DataError(f"{spec}: every training label is {names[0]!r}; a classifier needs at least two classes")
    if num_labels and num_labels != len(names):
        raise DataError(f"model.num_labels={num_labels} but the training labels of {spec} have {len(names)} "
                        f"classes ({_preview(names)}); set model.num_labels={len(names)} or 0 (from the data)")
    return Labels(names, kind)


def label_values(records: list[Record], labels: Labels, split: str) -> np.ndarray:
    """(N,) int64 class ids, or float32 targets for regression."""
    if labels.kind == "number":
        values = []
        for record in records:
            try:
                value = float(record.label) if not isinstance(record.label, bool) else math.nan
            except (TypeError, ValueError):
                value = math.nan
            if not math.isfinite(value):
                raise DataError(f"{record.where}: the regression label {record.label!r} is not a finite number; "
                                f"fix or remove the record")
            values.append(value)
        return np.asarray(values, dtype=np.float32)
    ids = {name: i for i, name in enumerate(labels.names)}
    out = np.empty(len(records), dtype=np.int64)
    for i, record in enumerate(records):
        if _kind(record.label) != labels.kind:
            raise DataError(f"{record.where}: label {record.label!r} is {_kind(record.label)} but the training "
                            f"labels are {labels.kind} values; use one type in every file")
        key = str(record.label)
        if key not in ids:
            raise DataError(f"{record.where}: the {split} label {record.label!r} never occurs in the training "
                            f"records (labels: {_preview(labels.names)}); fix the record or add training examples")
        out[i] = ids[key]
    return out


# ----------------------------------------------------------------------------------------- encoding

def encode(records: list[Record], tokenizer: Tokenizer, model_cfg, seq_len: int) -> dict[str, np.ndarray]:
    """Framed, truncated (longest text of a pair first) and padded model inputs, each (N, seq_len): on the
    right, on the left for XLNet."""
    from tokenizers.processors import TemplateProcessing

    backend = framing_backend(tokenizer, model_cfg)
    flavour = family_flavour(model_cfg)
    if flavour == "gpt":  # GPT-2 frames nothing; a pair is joined by the end-of-text token (GPT-1's delimiter)
        eod = tokenizer.backend.id_to_token(tokenizer.eod_id)
        backend.post_processor = TemplateProcessing(single="$A", pair=f"$A {eod} $B:1",
                                                    special_tokens=[(eod, tokenizer.eod_id)])
    backend.enable_truncation(max_length=seq_len)
    inputs = [record.text if record.pair is None else (record.text, record.pair) for record in records]
    encodings = backend.encode_batch(inputs, add_special_tokens=True)
    n, pad, left = len(records), tokenizer.pad_id, model_cfg.family == "xlnet"
    ids, mask, types = np.full((n, seq_len), pad, np.int64), np.zeros((n, seq_len), np.int64), np.zeros((n, seq_len), np.int64)
    truncated = 0
    for i, encoding in enumerate(encodings):
        length = len(encoding.ids)
        if length == 0:
            raise DataError(f"{records[i].where}: the text is empty; fix or remove the record")
        where = slice(seq_len - length, None) if left else slice(0, length)
        ids[i, where], mask[i, where], types[i, where] = encoding.ids, 1, encoding.type_ids
        truncated += bool(encoding.overflowing)
    if truncated:
        log.info("%d of %d records were truncated to trainer.seq_len=%d tokens", truncated, n, seq_len)
    arrays = {"input_ids": ids, "attention_mask": mask}
    if model_cfg.family == "bert":
        arrays["token_type_ids"] = types if model_cfg.type_vocab_size > 1 else np.zeros_like(types)
    if model_cfg.family == "xlnet":  # <cls> is segment 2; pads are masked keys, so theirs never matters
        arrays["token_type_ids"] = types
    if model_cfg.family == "encdec":
        # the decoder reads the text shifted right behind its start token; its last non-pad position is then
        # the final </s> of the input
        arrays["decoder_input_ids"], arrays["decoder_attention_mask"] = _shift_right(
            np.where(mask == 1, ids, IGNORE_INDEX), decoder_start_id(tokenizer, model_cfg), pad)
    return arrays


def decoder_start_id(tokenizer: Tokenizer, model_cfg) -> int:
    """pad for T5, </s> for BART: export's decoder_start_token_id."""
    if family_flavour(model_cfg) == "t5":
        return tokenizer.pad_id
    return tokenizer.special_id("eos", "BART's decoder start")


def _shift_right(targets: np.ndarray, start: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """Targets (N, L), -100 after their end -> the decoder's inputs (start, targets[:-1]) padded with pad where
    the target is, and their 0/1 mask."""
    shifted = np.concatenate([np.full((len(targets), 1), start, np.int64), targets[:, :-1]], axis=1)
    mask = targets != IGNORE_INDEX  # input i predicts target i
    return np.where(mask, shifted, pad), mask.astype(np.int64)


def label_word_targets(labels: Labels, tokenizer: Tokenizer, model_cfg) -> np.ndarray:
    """data.text_to_text: each class's label word(s) framed as a decoder target (T5: words </s>; BART: <s>
    words </s>) -> (K, L) ids, -100 after each target's end."""
    backend = framing_backend(tokenizer, model_cfg)
    targets = [backend.encode(name, add_special_tokens=True).ids for name in labels.names]
    table = np.full((len(targets), max(map(len, targets))), IGNORE_INDEX, np.int64)
    for k, ids in enumerate(targets):
        table[k, :len(ids)] = ids
    if len({tuple(ids) for ids in targets}) < len(targets):
        raise DataError(f"data.text_to_text: two labels tokenize alike ({_preview(labels.names)}); rename them")
    return table


def text_to_text_arrays(arrays: dict, class_ids: np.ndarray, table: np.ndarray, tokenizer: Tokenizer,
                        model_cfg) -> dict:
    """A record's decoder target is its class's label words: labels (N, L) token ids for the loss, class_ids
    (N,) for the metrics."""
    targets = table[class_ids]  # (N, L)
    decoder, decoder_mask = _shift_right(targets, decoder_start_id(tokenizer, model_cfg), tokenizer.pad_id)
    return {**arrays, "decoder_input_ids": decoder, "decoder_attention_mask": decoder_mask, "labels": targets,
            "class_ids": class_ids}


@dataclass
class LabelledSet:
    """One split as examples: the Loader reads it like a SampleView (num_samples, window, [i])."""

    name: str
    arrays: dict[str, np.ndarray]  # model inputs (N, T) and labels (N,)
    window: int  # trainer.seq_len (the loader's state records it)

    @property
    def num_samples(self) -> int:
        return len(self.arrays["labels"])

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {key: value[index] for key, value in self.arrays.items()}


@dataclass
class TaskObjective:
    """The Loader's objective for a labelled split: the example is the encoded record (nothing random)."""

    name: str  # the task
    needs_rng = False

    def __call__(self, example: dict, rng=None, other=None) -> dict:
        return example


@dataclass
class TaskData:
    """What the trainer gets instead of prepare.PreparedData for data.task != lm."""

    task: str
    tokenizer: Tokenizer
    train: LabelledSet
    validation: LabelledSet
    labels: Labels
    label_targets: Optional[np.ndarray] = None  # data.text_to_text: each class's decoder target (K, L)
    mixture = None

    @property
    def num_labels(self) -> int:
        if self.label_targets is not None:
            return 0  # text-to-text: no head
        return len(self.labels.names) or 1  # regression: one output

    @property
    def objective(self) -> TaskObjective:
        return TaskObjective(self.task)

    def label_file(self) -> bytes:
        """labels.json of a checkpoint: the task and id -> label name (export writes it as id2label)."""
        return json.dumps({"task": self.task, "id2label": dict(enumerate(self.labels.names))}, indent=2).encode()


def read_label_file(path: Path) -> Optional[dict[int, str]]:
    """A checkpoint's id -> label name, or None when it holds no labels.json (a language model)."""
    path = Path(path) / LABELS_FILE
    if not path.is_file():
        return None
    return {int(key): name for key, name in json.loads(path.read_text())["id2label"].items()}


def task_tokenizer(data_cfg, records: list[Record]) -> Tokenizer:
    """data.tokenizer=train: the builtin task shares the built-in corpus's tokenizer (and its cache entry) with
    a pretraining run on it; files train one on their own texts."""
    if data_cfg.tokenizer != "train":
        return load_tokenizer(data_cfg.tokenizer)
    if data_cfg.train_files == BUILTIN:
        from scaletrain.data.corpus import load_corpus

        # the corpus tokenizer is keyed by val_fraction too: the pretraining default, not the task's hold-out
        default = type(data_cfg)().val_fraction
        return tokenizer_from_config(dataclasses.replace(data_cfg, val_fraction=default), load_corpus(BUILTIN))
    texts = [text for record in records for text in (record.text, record.pair) if text]
    fingerprint = hashlib.sha256("\0".join(texts).encode()).hexdigest()
    return tokenizer_from_config(data_cfg, Corpus(name="task", fingerprint=fingerprint, _read=lambda: iter(texts)))


def build_task_data(cfg) -> TaskData:
    """Records -> label space -> tokenizer -> encoded train and validation splits."""
    d, seq_len = cfg.data, cfg.trainer.seq_len
    train = builtin_records() if d.train_files == BUILTIN else read_records(d.train_files, d, "train")
    # the label space of every record of train_files, the held-out ones too: their problems come first
    labels = training_labels(train, d.task, cfg.model.num_labels, d.train_files, d.label_field)
    if d.validation_files:
        validation = read_records(d.validation_files, d, "validation")
    else:
        train, validation = _split(train, d.val_fraction, d.train_files)
    tokenizer = task_tokenizer(d, train)
    splits = []
    table = label_word_targets(labels, tokenizer, cfg.model) if d.text_to_text else None
    for name, records in (("train", train), ("validation", validation)):
        arrays = encode(records, tokenizer, cfg.model, seq_len)
        if table is None:
            arrays["labels"] = label_values(records, labels, name)
        else:
            arrays = text_to_text_arrays(arrays, label_values(records, labels, name), table, tokenizer, cfg.model)
        splits.append(LabelledSet(name, arrays, seq_len))
    log.info("data.task=%s: %d train and %d validation records%s", d.task, len(train), len(validation),
             f", labels {_preview(labels.names)}" if labels.names else "")
    return TaskData(d.task, tokenizer, splits[0], splits[1], labels, table)


def validation_batches(split: LabelledSet, micro_batch: int, dp_rank: int = 0, dp_size: int = 1) -> Iterator[dict]:
    """Every record once, in order: the split is padded to a multiple of micro_batch x dp with copies of record
    0 whose label is ignored (-100; NaN for regression), so every rank runs the same number of batches."""
    n, per_batch = split.num_samples, micro_batch * dp_size
    for first in range(dp_rank * micro_batch, -(-n // per_batch) * per_batch, per_batch):
        rows = np.arange(first, first + micro_batch)
        batch = {key: torch.from_numpy(value[np.where(rows < n, rows, 0)]) for key, value in split.arrays.items()}
        for key in ("labels", "class_ids"):  # class_ids: data.text_to_text's, beside its token labels
            if key in batch:
                labels = batch[key]
                labels[torch.from_numpy(rows >= n)] = IGNORE_INDEX if not labels.is_floating_point() else math.nan
        yield batch
