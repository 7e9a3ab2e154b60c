"""`scaletrain eval --data`: the perplexity of a trained GPT on a corpus and on a prepared folder equals the
token-weighted perplexity computed by hand with transformers on the exported model, over the same windows."""

import json
import math

import numpy as np
import pytest
import torch
import transformers

from scaletrain.cli import main
from train_utils import make_trainer, tiny_overrides

TEXTS = ["the cat sat on the mat and looked at the dog", "a dog ran", "tokens are counted once each, " * 6]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    trainer = make_trainer(root / "run", tiny_overrides("gpt", "trainer.max_steps=2", "optim.warmup_steps=0"))
    assert trainer.train() == 0
    assert main(["export", str(root / "run"), "--out", str(root / "hf")]) == 0
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return root


def reference_perplexity(folder, stream, window):
    """exp(sum NLL / predicted tokens) over (window + 1)-token slices every window tokens, with transformers."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    nll, count = 0.0, 0
    for start in range(0, len(stream) - 1, window):
        piece = torch.tensor(stream[start:start + window + 1])[None]
        with torch.no_grad():
            logits = model(piece[:, :-1]).logits
        nll += float(torch.nn.functional.cross_entropy(logits[0], piece[0, 1:], reduction="sum"))
        count += piece.shape[1] - 1
    return math.exp(nll / count), count


def test_perplexity_on_a_corpus_equals_transformers_on_the_export(run, capsys):
    tokenizer = transformers.AutoTokenizer.from_pretrained(run / "hf")
    stream = [i for text in TEXTS for i in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]]
    expected, count = reference_perplexity(run / "hf", stream, 16)
    for model in ("run", "hf"):  # a run folder and the Hugging Face folder give the same figure
        assert main(["eval", str(run / model), "--data", str(run / "docs.jsonl"), "--seq-len", "16",
                     "--batch-size", "2", "--out", str(run / f"{model}.json"), "--no-progress"]) == 0
        result = json.loads((run / f"{model}.json").read_text())
        assert result["tokens"] == count and result["windows"] == math.ceil((len(stream) - 1) / 16)
        assert result["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert "perplexity" in capsys.readouterr().out


def test_perplexity_on_a_prepared_folder_and_bad_input(run, capsys):
    tokenizer_file = next((run / "run" / "checkpoints").glob("step-*")) / "tokenizer.json"
    assert main(["data", "prepare", "--corpus", str(run / "docs.jsonl"), "--tokenizer", str(tokenizer_file),
                 "--out", str(run / "prepared"), "--val-fraction", "0.4", "--no-progress"]) == 0
    stream = np.fromfile(run / "prepared" / "train.bin", dtype=np.uint16).astype(np.int64).tolist()
    expected, count = reference_perplexity(run / "hf", stream, 8)
    assert main(["eval", str(run / "run"), "--data", str(run / "prepared"), "--split", "train", "--seq-len", "8",
                 "--out", str(run / "prepared.json"), "--no-progress"]) == 0
    result = json.loads((run / "prepared.json").read_text())
    assert (result["tokens"], result["perplexity"]) == (count, pytest.approx(expected, rel=1e-5))
    capsys.readouterr()
    for argv, message in ((["--seq-len", "0"], "--seq-len=0 must be at least 1"),
                          (["--seq-len", "4096"], "exceeds the model's window"),
                          (["--data", str(run / "missing.txt")], "missing.txt")):
        data = [] if "--data" in argv else ["--data", str(run / "docs.jsonl")]
        assert main(["eval", str(run / "run"), *data, *argv]) == 2
        error = capsys.readouterr().err.strip()
        assert message in error and "\n" not in error, error
