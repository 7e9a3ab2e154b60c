"""`scaletrain data prepare` through the real CLI: idempotent, atomic under SIGKILL, one-line user errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from scaletrain.configs.schema import DataConfig
from scaletrain.data.corpus import is_validation
from scaletrain.data.prepare import build_datasets, open_prepared, staging_dir
from scaletrain.data.tokenizer import load_tokenizer, train_tokenizer
from scaletrain.errors import DataError
from scaletrain.parallel.multiprocess import run_on_ranks

WORDS = ("the model reads tokens and writes shards while workers tokenize documents in parallel so that "
         "training never waits for data every epoch sees a new order").split()


def prepare_cli(*args, check_rc=0):
    result = subprocess.run([sys.executable, "-m", "scaletrain.cli", "data", "prepare", "--no-progress", *args],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == check_rc, result.stderr
    return result


def write_jsonl(path, documents):
    path.write_text("".join(json.dumps({"body": text}) + "\n" for text in documents))


def random_documents(count, rng, max_words=400):
    return [" ".join(rng.choice(WORDS, size=rng.integers(5, max_words))) + "." for _ in range(count)]


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    train_tokenizer("byte_bpe", random_documents(200, np.random.default_rng(0)), 600).save(path)
    return path


def expected_shards(documents, tokenizer, val_fraction=0.02):
    """Reference: encode every document in-process and pack with EOD, split by the same hash rule."""
    splits = {"train": [], "validation": []}
    for document in documents:
        splits["validation" if is_validation(document, val_fraction) else "train"].append(document)
    return {split: np.concatenate([np.append(tokenizer.encode(d), tokenizer.eod_id) for d in docs])
            for split, docs in splits.items()}


def test_prepare_then_rerun_does_nothing(tmp_path, tokenizer_file):
    documents = random_documents(300, np.random.default_rng(1))
    write_jsonl(tmp_path / "corpus.jsonl", documents)
    out = tmp_path / "prepared"
    args = ["--corpus", str(tmp_path / "corpus.jsonl"), "--text-field", "body", "--tokenizer", str(tokenizer_file),
            "--out", str(out), "--num-workers", "2"]
    first = prepare_cli(*args)
    assert "prepared" in first.stdout
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    second = prepare_cli(*args)
    assert "up to date" in second.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    tokenizer = load_tokenizer(str(tokenizer_file))
    data = open_prepared(out, tokenizer)
    reference = expected_shards(documents, tokenizer)
    assert np.array_equal(np.asarray(data.train.tokens), reference["train"])
    assert np.array_equal(np.asarray(data.validation.tokens), reference["validation"])
    assert data.metadata["splits"]["train"]["documents"] + data.metadata["splits"]["validation"]["documents"] == 300
    assert data.metadata["tokenizer_hash"] == tokenizer.hash and len(data.metadata["input_fingerprint"]) == 64


def test_sigkill_midway_leaves_nothing_complete_and_rerun_finishes(tmp_path, tokenizer_file):
    documents = random_documents(4000, np.random.default_rng(2), max_words=300)  # ~4 MB: a few seconds
    write_jsonl(tmp_path / "corpus.jsonl", documents)
    out = tmp_path / "prepared"
    args = ["--corpus", str(tmp_path / "corpus.jsonl"), "--text-field", "body", "--tokenizer", str(tokenizer_file),
            "--out", str(out), "--num-workers", "1"]
    process = subprocess.Popen([sys.executable, "-m", "scaletrain.cli", "data", "prepare", "--no-progress", *args],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = staging_dir(out) / "train.bin.partial"
    deadline = time.time() + 120
    while not (partial.exists() and partial.stat().st_size > 0) and time.time() < deadline:
        assert process.poll() is None, "prepare finished before it could be killed; grow the corpus"
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert partial.exists() and not out.exists()
    with pytest.raises(DataError, match="does not exist .an interrupted prepare left prepared.partial"):
        open_prepared(out)
    prepare_cli(*args)
    tokenizer = load_tokenizer(str(tokenizer_file))
    data = open_prepared(out, tokenizer)
    assert np.array_equal(np.asarray(data.train.tokens), expected_shards(documents, tokenizer)["train"])
    assert not list(out.glob("*.partial")) and not staging_dir(out).exists()


def test_a_failing_re_prepare_leaves_the_good_folder_as_it_was(tmp_path, tokenizer_file):
    (tmp_path / "docs").mkdir()
    documents = random_documents(60, np.random.default_rng(6))
    write_jsonl(tmp_path / "docs" / "a.jsonl", documents)
    out = tmp_path / "prepared"
    args = ["--corpus", str(tmp_path / "docs"), "--text-field", "body", "--tokenizer", str(tokenizer_file),
            "--out", str(out)]
    prepare_cli(*args)
    good = {path.name: path.read_bytes() for path in out.iterdir()}
    lines = [json.dumps({"body": text}) for text in random_documents(40, np.random.default_rng(7))]
    (tmp_path / "docs" / "b.jsonl").write_text("\n".join(lines[:20] + ["{broken"] + lines[20:]) + "\n")
    failed = prepare_cli(*args, check_rc=2)
    assert "b.jsonl:21 is not valid JSON" in failed.stderr
    assert {path.name: path.read_bytes() for path in out.iterdir()} == good
    tokenizer = load_tokenizer(str(tokenizer_file))
    assert np.array_equal(np.asarray(open_prepared(out, tokenizer).train.tokens),
                          expected_shards(documents, tokenizer)["train"])
    (out / "notes.txt").write_text("mine")  # a folder holding other files is never replaced
    assert "notes.txt, which scaletrain data prepare did not write" in prepare_cli(*args, check_rc=2).stderr
    (out / "notes.txt").unlink()
    (tmp_path / "docs" / "b.jsonl").write_text("\n".join(lines) + "\n")
    assert "prepared" in prepare_cli(*args).stdout
    assert open_prepared(out).metadata["splits"]["train"]["documents"] > good_documents(good)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".prepared.lock", "docs", "prepared"]


def good_documents(files):
    return json.loads(files["metadata.json"])["splits"]["train"]["documents"]


def test_damaged_or_foreign_shards_are_refused(tmp_path, tokenizer_file):
    (tmp_path / "docs").mkdir()
    for i, text in enumerate(random_documents(60, np.random.default_rng(3))):
        (tmp_path / "docs" / f"{i:03d}.txt").write_text(text)
    out = tmp_path / "prepared"
    prepare_cli("--corpus", str(tmp_path / "docs"), "--tokenizer", str(tokenizer_file), "--out", str(out))
    other = train_tokenizer("byte_bpe", random_documents(50, np.random.default_rng(4)), 520)
    with pytest.raises(DataError, match="made with tokenizer .* re-run scaletrain data prepare"):
        open_prepared(out, other)
    with open(out / "train.bin", "r+b") as handle:
        handle.truncate(handle.seek(0, 2) - 2)
    with pytest.raises(DataError, match=r"train.bin has \d+ bytes but its index says .* truncated or corrupted"):
        open_prepared(out)
    result = prepare_cli("--corpus", str(tmp_path / "docs"), "--tokenizer", str(tokenizer_file), "--out", str(out))
    assert "prepared" in result.stdout  # a re-run repairs what no longer matches its metadata
    open_prepared(out)


def check(folder, capsys):
    """scaletrain data prepare --check in this process -> (exit code, the one line it printed)."""
    from scaletrain.cli import main

    code = main(["data", "prepare", "--check", str(folder)])
    captured = capsys.readouterr()
    lines = (captured.out if code == 0 else captured.err).strip().splitlines()
    assert len(lines) == 1, captured
    return code, lines[0]


def test_checksums_catch_a_shard_overwritten_at_the_same_size(tmp_path, tokenizer_file, capsys):
    write_jsonl(tmp_path / "corpus.jsonl", random_documents(80, np.random.default_rng(8)))
    out = tmp_path / "prepared"
    args = ["--corpus", str(tmp_path / "corpus.jsonl"), "--text-field", "body", "--tokenizer", str(tokenizer_file),
            "--out", str(out)]
    prepare_cli(*args)
    vocab = json.loads((out / "metadata.json").read_text())["vocab_size"]
    code, line = check(out, capsys)
    assert code == 0 and line.startswith(f"{out}: ok, 4 files match their checksums and every token id is below "
                                         f"{vocab}")
    tokens = np.fromfile(out / "train.bin", np.uint16)
    tokens[100:110] = tokens[200:210]  # in-range ids at the same size: only a checksum can tell
    tokens.tofile(out / "train.bin")
    assert open_prepared(out).train.num_tokens == tokens.size  # data.verify=size: sizes only
    code, line = check(out, capsys)
    assert code == 2 and f"{out / 'train.bin'} does not match its checksum" in line and "--verify full" in line
    with pytest.raises(DataError, match="train.bin does not match its checksum"):
        build_datasets(SimpleNamespace(data=DataConfig(prepared=str(out), verify="full")))
    assert "up to date" in prepare_cli(*args).stdout  # sizes match: a plain re-run trusts the folder
    assert "prepared" in prepare_cli(*args, "--verify", "full").stdout  # and the full check rebuilds it
    assert check(out, capsys)[0] == 0
    assert "data.verify='fast' is not one of size, full" in prepare_cli(*args, "--verify", "fast", check_rc=2).stderr


def test_out_of_range_token_ids_and_folders_without_checksums(tmp_path, tokenizer_file, capsys):
    from scaletrain.data.loader import Loader
    from scaletrain.data.objectives import CLM

    write_jsonl(tmp_path / "corpus.jsonl", random_documents(80, np.random.default_rng(9)))
    out = tmp_path / "prepared"
    prepare_cli("--corpus", str(tmp_path / "corpus.jsonl"), "--text-field", "body", "--tokenizer",
                str(tokenizer_file), "--out", str(out))
    metadata = json.loads((out / "metadata.json").read_text())
    del metadata["files"]  # as an older scaletrain wrote it
    (out / "metadata.json").write_text(json.dumps(metadata))
    code, line = check(out, capsys)
    assert code == 0 and "records no checksums (prepared by an older scaletrain)" in line
    tokens = np.fromfile(out / "train.bin", np.uint16)
    tokens[5] = 65535
    tokens.tofile(out / "train.bin")
    code, line = check(out, capsys)
    vocab = metadata["vocab_size"]
    assert code == 2 and f"train.bin holds token id 65535, outside the vocabulary of {vocab} tokens" in line
    data = open_prepared(out)  # data.verify=size opens it; the loader refuses the sample before the model sees it
    loader = Loader(data.train, CLM(), 8, 1, 1)
    loader.consumed_samples = int(np.flatnonzero(loader.permutation(0) == 0)[0])  # the sample holding token 5
    with pytest.raises(DataError, match=f"train.bin holds token id 65535 at token 5, outside the vocabulary of {vocab}"):
        next(loader)
    from scaletrain.cli import main
    assert main(["data", "prepare", "--corpus", "builtin"]) == 2
    assert "one of the arguments --out --check is required" in capsys.readouterr().err


def run_error(result):
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_bad_input_is_one_line_and_exit_code_2(tmp_path, tokenizer_file):
    def error_of(*args):
        return run_error(prepare_cli("--tokenizer", str(tokenizer_file), "--out", str(tmp_path / "out"), *args,
                                     check_rc=2))

    assert "does not exist" in error_of("--corpus", str(tmp_path / "missing"))
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("\n\n  \n")
    assert "is empty" in error_of("--corpus", str(tmp_path / "blank"))
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    message = error_of("--corpus", str(bad))
    assert str(bad) in message and "2 undecodable bytes" in message and "data.decode_errors=replace" in message
    prepare_cli("--corpus", str(bad), "--decode-errors", "replace", "--tokenizer", str(tokenizer_file),
                "--out", str(tmp_path / "replaced"))
    assert "does not exist" in error_of("--corpus", "builtin", "--tokenizer", str(tmp_path / "nope.json"))
    nulls = tmp_path / "nulls.jsonl"
    nulls.write_text('{"text": "a document"}\n{"text": null}\n')
    assert f"{nulls}:2: field 'text' is null, not a string" in error_of("--corpus", str(nulls))
    (tmp_path / "a_file").write_text("keep me")
    for out, where in ((tmp_path / "a_file", "is a file"), (tmp_path / "a_file" / "sub", "lies below the file")):
        message = run_error(prepare_cli("--corpus", str(bad), "--tokenizer", str(tokenizer_file), "--out", str(out),
                                        check_rc=2))
        assert f"--out {out} {where}" in message and "pass a folder" in message
    assert (tmp_path / "a_file").read_text() == "keep me"


def test_build_datasets_prepares_the_builtin_corpus_once(tmp_path):
    cfg = SimpleNamespace(data=DataConfig(cache_dir=str(tmp_path), tokenizer_vocab=1024, num_workers=2))
    started = time.perf_counter()
    data = build_datasets(cfg, progress=False)
    first_seconds = time.perf_counter() - started
    assert data.tokenizer.vocab_size == 1024
    assert data.train.num_tokens > 400_000 and data.validation.num_tokens > 1000
    metadata = data.directory / "metadata.json"
    stamp = metadata.stat().st_mtime_ns
    again = build_datasets(cfg, progress=False)
    assert again.directory == data.directory and metadata.stat().st_mtime_ns == stamp
    assert again.tokenizer.hash == data.tokenizer.hash
    assert first_seconds < 60  # the first `scaletrain train` must not wait long for its data
    cfg_prepared = SimpleNamespace(data=DataConfig(prepared=str(data.directory)))
    assert build_datasets(cfg_prepared).train.num_tokens == data.train.num_tokens
    assert Path(data.directory).parent == tmp_path / "datasets"


def _build_on_rank(rank, world_size, corpus, tokenizer, cache_dir):
    cfg = SimpleNamespace(data=DataConfig(corpus=corpus, text_field="body", tokenizer=tokenizer,
                                          cache_dir=cache_dir, num_workers=2))
    data = build_datasets(cfg, progress=False)
    return str(data.directory), (data.directory / "metadata.json").stat().st_mtime_ns, data.train.num_tokens


def test_ranks_preparing_at_once_share_one_result(tmp_path, tokenizer_file):
    write_jsonl(tmp_path / "corpus.jsonl", random_documents(100, np.random.default_rng(5)))
    results = run_on_ranks(_build_on_rank, 2, str(tmp_path / "corpus.jsonl"), str(tokenizer_file),
                           str(tmp_path / "cache"))
    assert results[0] == results[1]  # same directory, written once (same mtime), same tokens
    assert [p.name for p in (tmp_path / "cache" / "datasets").iterdir() if not p.name.startswith(".")] == [
        Path(results[0][0]).name]  # one folder (beside it only its hidden lock file)
