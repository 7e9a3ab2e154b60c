"""`scaletrain eval --data`: the perplexity of a trained GPT on a corpus and on a prepared folder equals the
token-weighted perplexity computed by hand with transformers on the exported model, over the same windows."""

import json
import math
import signal

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
    assert main(["data", "prepare", "--corpus", str(run / "docs.jsonl"), "--tokenizer-vocab", "600",
                 "--out", str(run / "other"), "--val-fraction", "0.4", "--no-progress"]) == 0
    capsys.readouterr()
    for argv, message in ((["--seq-len", "0"], "--seq-len=0 must be at least 1"),
                          (["--data", str(run / "other")], "was prepared with tokenizer"),
                          (["--seq-len", "4096"], "exceeds the model's window"),
                          (["--data", str(run / "missing.txt")], "missing.txt")):
        data = [] if "--data" in argv else ["--data", str(run / "docs.jsonl")]
        assert main(["eval", str(run / "run"), *data, *argv]) == 2
        error = capsys.readouterr().err.strip()
        assert message in error and "\n" not in error, error


MC = [{"context": f"question {i}: the {w} is", "choices": ["red", "a dog", "on the mat"], "answer": i % 3}
      for i, w in enumerate(["cat", "sky", "sea", "dog", "mat", "sun"])]
GEN = [{"context": "the cat sat on the", "answer": "mat"}, {"context": "a dog", "answer": "ran"},
       {"context": "tokens are", "answer": "counted"}]


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _hf_choice_logprob(model, tokenizer, prompt, choice, window):
    ids = (tokenizer(prompt)["input_ids"] + tokenizer(" " + choice)["input_ids"])[-(window + 1):]
    length = len(tokenizer(" " + choice)["input_ids"])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids[:-1]])).logits[0], dim=-1)
    return sum(float(logprobs[t - 1, ids[t]]) for t in range(len(ids) - length, len(ids)))


def test_few_shot_multiple_choice_equals_transformers_and_its_saved_prompts_reproduce_it(run, tmp_path):
    task, train = _write(tmp_path / "colors.jsonl", MC), _write(tmp_path / "train.jsonl", MC[:4])
    assert main(["eval", str(run / "run"), "--tasks", str(task), "--shots", "2", "--train", str(train),
                 "--seq-len", "24", "--batch-size", "4", "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "colors.json").read_text())
    saved = json.loads((tmp_path / "out" / "colors.prompts.json").read_text())
    assert (saved["shots"], saved["seed"], saved["separator"]) == (2, 1234, "\n\n")
    model = transformers.AutoModelForCausalLM.from_pretrained(run / "hf").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(run / "hf")
    correct = correct_norm = 0
    for record, p in zip(MC, saved["prompts"]):
        demos = [MC[i] for i in p["demonstrations"]]
        assert len(demos) == 2 and p["prompt"] == "\n\n".join(
            [f"{d['context']} {d['choices'][d['answer']]}" for d in demos] + [record["context"]])
        theirs = [_hf_choice_logprob(model, tokenizer, p["prompt"], c, 24) for c in record["choices"]]
        assert p["loglikelihoods"] == pytest.approx(theirs, abs=1e-4)
        correct += int(np.argmax(theirs)) == record["answer"]
        correct_norm += int(np.argmax([s / len(c) for s, c in zip(theirs, record["choices"])])) == record["answer"]
    assert (result["acc"], result["acc_norm"]) == (correct / len(MC), correct_norm / len(MC))
    # the same call draws the same demonstrations
    assert main(["eval", str(run / "run"), "--tasks", str(task), "--shots", "2", "--train", str(train),
                 "--seq-len", "24", "--out", str(tmp_path / "again")]) == 0
    assert json.loads((tmp_path / "again" / "colors.prompts.json").read_text())["prompts"] == saved["prompts"]
    _replay_reproduces(run, tmp_path, "colors", saved, ("acc", "acc_norm"))


def _replay_reproduces(run, tmp_path, name, saved, metrics):
    """The saved prompts alone (task and train files gone) give the saved scores on the run and on its export;
    a saved score changed by hand is reported as not reproduced (exit 1)."""
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / f"{name}.prompts.json").write_text(json.dumps(saved))
    for path in tmp_path.glob("*.jsonl"):
        path.unlink()
    for model in ("run", "hf"):
        out = tmp_path / f"replayed-{model}"
        assert main(["eval", str(run / model), "--replay", str(alone / f"{name}.prompts.json"), "--batch-size", "3",
                     "--out", str(out)]) == 0
        again = json.loads((out / f"{name}.prompts.json").read_text())
        assert [p["prompt"] for p in again["prompts"]] == [p["prompt"] for p in saved["prompts"]]
        assert again["window"] == saved["window"] and again["replayed"].endswith(f"{name}.prompts.json")
        for key in metrics:
            assert again["scores"][key] == saved["scores"][key]
        for ours, theirs in zip(again["prompts"], saved["prompts"]):
            for key in ("loglikelihoods", "generated"):
                if key in theirs:
                    assert ours[key] == pytest.approx(theirs[key], abs=1e-4)
    tampered = dict(saved, scores={**saved["scores"], metrics[0]: saved["scores"][metrics[0]] + 0.5})
    (alone / "tampered.prompts.json").write_text(json.dumps(tampered))
    assert main(["eval", str(run / "run"), "--replay", str(alone / "tampered.prompts.json")]) == 1


def test_generation_task_decodes_what_transformers_greedy_generate_decodes(run, tmp_path):
    task = _write(tmp_path / "words.jsonl", GEN)
    assert main(["eval", str(run / "run"), "--tasks", str(task), "--shots", "1", "--max-new-tokens", "4",
                 "--batch-size", "2", "--out", str(tmp_path / "out")]) == 0
    saved = json.loads((tmp_path / "out" / "words.prompts.json").read_text())["prompts"]
    model = transformers.AutoModelForCausalLM.from_pretrained(run / "hf").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(run / "hf")
    matches = 0
    for record, p in zip(GEN, saved):
        ids = torch.tensor([tokenizer(p["prompt"])["input_ids"]])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
        text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split("\n")[0].strip()
        assert p["generated"] == text
        matches += text == record["answer"]
    assert json.loads((tmp_path / "out" / "words.json").read_text())["exact_match"] == matches / len(GEN)
    _replay_reproduces(run, tmp_path, "words", json.loads((tmp_path / "out" / "words.prompts.json").read_text()),
                       ("exact_match",))


def test_eval_with_tp2_workers_gives_one_process_scores(run, tmp_path, capsys):
    mc, gen = _write(tmp_path / "colors.jsonl", MC), _write(tmp_path / "words.jsonl", GEN)
    common = ["--tasks", str(mc), str(gen), "--shots", "1", "--seq-len", "24", "--batch-size", "4",
              "--max-new-tokens", "4"]
    assert main(["eval", str(run / "run"), *common, "--out", str(tmp_path / "one")]) == 0
    handler = signal.getsignal(signal.SIGTERM)
    assert main(["eval", str(run / "run"), *common, "--tp", "2", "--out", str(tmp_path / "two")]) == 0
    assert signal.getsignal(signal.SIGTERM) is handler  # the launcher gives the caller's handlers back
    for name, key in (("colors", "loglikelihoods"), ("words", "generated")):
        one, two = (json.loads((tmp_path / d / f"{name}.prompts.json").read_text()) for d in ("one", "two"))
        assert two["scores"] == one["scores"]
        for ours, theirs in zip(two["prompts"], one["prompts"]):
            assert ours[key] == (pytest.approx(theirs[key], abs=1e-5) if key == "loglikelihoods" else theirs[key])
    capsys.readouterr()
    assert main(["eval", str(run / "run"), *common, "--tp", "3"]) == 2  # refused before any worker starts
    error = capsys.readouterr().err.strip()
    assert "--tp 3 must divide model.n_heads" in error and "\n" not in error, error


@pytest.mark.parametrize("records, extra, message", [
    ([], [], "holds no records"),
    ([{"context": "a", "choices": ["b"], "answer": 0}], [], "at least two strings"),
    ([{"context": "a", "choices": ["b", "c"], "answer": 2}], [], "must be the index of the right choice, 0..1"),
    ([{"choices": ["b", "c"], "answer": 0}], [], 'needs a string "context"'),
    ([{"context": "a", "choices": ["b", "c"], "answer": 0}], ["--shots", "3"], "--shots 3 needs at least 3"),
    ([{"context": "a", "choices": ["b", "x " * 40], "answer": 0}], ["--seq-len", "8"], "the answer alone is"),
])
def test_bad_task_files_exit_2_with_one_line(run, tmp_path, capsys, records, extra, message):
    task = _write(tmp_path / "bad.jsonl", records)
    assert main(["eval", str(run / "run"), "--tasks", str(task), *extra]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and "\n" not in error, error


@pytest.mark.parametrize("content, extra, message", [
    (None, [], "does not exist"),
    ("{not json", [], "is not JSON"),
    ({"prompts": []}, [], 'holds no "prompts" list'),
    ({"prompts": [{"prompt": "a", "choices": ["b"], "answer": 0}]}, [], "at least two strings"),
    ({"delimiter": "\n", "prompts": [{"prompt": "a", "choices": ["b", "c"], "answer": 0}]}, [], "delimiter"),
    ({"window": 4096, "prompts": [{"prompt": "a", "choices": ["b", "c"], "answer": 0}]}, [], "replay it on a model"),
    ({"prompts": [{"prompt": "a", "choices": ["b", "c"], "answer": 0}]}, ["--shots", "1"], "drop --data"),
])
def test_bad_replay_files_exit_2_with_one_line(run, tmp_path, capsys, content, extra, message):
    path = tmp_path / "bad.prompts.json"
    if content is not None:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    assert main(["eval", str(run / "run"), "--replay", str(path), *extra]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and "\n" not in error, error


def test_trainer_eval_tasks_log_what_scaletrain_eval_gives_on_the_checkpoint(tmp_path):
    task = _write(tmp_path / "colors.jsonl", MC)
    overrides = tiny_overrides("gpt", "trainer.max_steps=2", "optim.warmup_steps=0", "trainer.eval_every=2",
                               "checkpoint.every=2", f"trainer.eval_tasks=[{task}]", "trainer.eval_shots=1")
    trainer = make_trainer(tmp_path / "run", overrides)
    assert trainer.train() == 0
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in logged if "task/colors/acc" in r]
    assert [r["step"] for r in logged] == [2]
    final = json.loads((tmp_path / "run" / "final_metrics.json").read_text())
    assert final["task/colors/acc_norm"] == logged[0]["task/colors/acc_norm"]
    assert main(["eval", str(tmp_path / "run"), "--tasks", str(task), "--shots", "1", "--seed", "0",
                 "--seq-len", "32", "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "colors.json").read_text())
    assert (result["acc"], result["acc_norm"]) == (final["task/colors/acc"], final["task/colors/acc_norm"])


@pytest.mark.parametrize("family, extra, message", [
    ("gpt", ["data.task=classification", "data.train_files=builtin"],
     "trainer.eval_tasks scores a pretrained GPT, BERT (cloze) or T5 / BART (data.task=lm)"),
    ("gpt", ["trainer.eval_every=0"], "trainer.eval_tasks runs at evaluations"),
    ("gpt", ["trainer.eval_tasks=[missing.jsonl]"], "missing.jsonl is not a file")])
def test_eval_tasks_that_cannot_be_scored_are_refused(tmp_path, capsys, family, extra, message):
    task = _write(tmp_path / "colors.jsonl", MC)
    code = main(["train", *tiny_overrides(family, f"trainer.eval_tasks=[{task}]", "trainer.eval_every=5", *extra),
                 f"hydra.run.dir={tmp_path / 'run'}"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and message in error and "\n" not in error, error


CLOZE = [{"context": "the ___ sat on the mat", "choices": ["cat", "dog", "red sky"], "answer": 0},
         {"context": "a dog ran", "choices": ["fast", "on the mat"], "answer": 1}]


def test_cloze_on_a_bert_equals_transformers_masked_lm_probabilities(tmp_path):
    overrides = tiny_overrides("bert")[:5] + ["model.nsp_head=false", "trainer.max_steps=1", "optim.warmup_steps=0"]
    assert make_trainer(tmp_path / "run", overrides + tiny_overrides("gpt")[3:]).train() == 0
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    task = _write(tmp_path / "cloze.jsonl", CLOZE)
    assert main(["eval", str(tmp_path / "run"), "--tasks", str(task), "--out", str(tmp_path / "out")]) == 0
    saved = json.loads((tmp_path / "out" / "cloze.prompts.json").read_text())["prompts"]
    model = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    correct = 0
    for record, p in zip(CLOZE, saved):
        theirs = []
        for choice in record["choices"]:
            target = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
            masks = " ".join([tokenizer.mask_token] * len(target))
            text = record["context"].replace("___", masks) if "___" in record["context"] else f"{record['context']} {masks}"
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            with torch.no_grad():
                logprobs = torch.log_softmax(model(ids).logits[0], dim=-1)
            at = (ids[0] == tokenizer.mask_token_id).nonzero().flatten()
            theirs.append(float(logprobs[at, torch.tensor(target)].sum()))
        assert p["loglikelihoods"] == pytest.approx(theirs, abs=1e-4)
        correct += int(np.argmax(theirs)) == record["answer"]
    assert json.loads((tmp_path / "out" / "cloze.json").read_text())["acc"] == correct / len(CLOZE)
    assert main(["eval", str(tmp_path / "run"), "--data", str(task)]) == 2  # no perplexity for a BERT


def _train_on_rank(rank, world_size, run_dir, overrides):
    trainer = make_trainer(run_dir, overrides)
    trainer.train()
    return trainer.last_eval, trainer.eval_prompts


@pytest.mark.parametrize("layout", [["parallel.tp=2", "parallel.dp_shard=1"],
                                    ["parallel.tp=2", "parallel.dp_shard=1", "parallel.sequence_parallel=true"],
                                    ["parallel.dp_shard=2", "parallel.zero=3"],
                                    ["parallel.dp_shard=2", "parallel.zero=3", "parallel.engine=deepspeed"]])
def test_eval_tasks_under_two_rank_layouts_score_as_one_process(tmp_path, layout):
    from scaletrain.parallel.multiprocess import run_on_ranks

    mc, gen = _write(tmp_path / "colors.jsonl", MC), _write(tmp_path / "words.jsonl", GEN)
    overrides = tiny_overrides("gpt", "optim=sgd", "optim.lr=0.5", "trainer.max_steps=2", "optim.warmup_steps=0",
                               "trainer.eval_every=2", f"trainer.eval_tasks=[{mc},{gen}]", "trainer.eval_shots=1")
    single = make_trainer(tmp_path / "single", overrides)
    single.train()
    assert {"task/colors/acc", "task/colors/acc_norm", "task/words/exact_match"} <= set(single.last_eval)
    tasks = {k: v for k, v in single.last_eval.items() if k.startswith("task/")}
    for last_eval, prompts in run_on_ranks(_train_on_rank, 2, tmp_path / "two", overrides + layout):
        assert {k: v for k, v in last_eval.items() if k.startswith("task/")} == tasks
        # every choice's log-likelihood and every greedy generation, not only the (coarse) accuracies
        for ours, theirs in zip(prompts["colors"], single.eval_prompts["colors"]):
            assert ours["loglikelihoods"] == pytest.approx(theirs["loglikelihoods"], rel=1e-5, abs=1e-5)
        assert [p["generated"] for p in prompts["words"]] == [p["generated"] for p in single.eval_prompts["words"]]


ENCDEC = {"t5": tiny_overrides("encdec")[:5],
          "bart": ["model=bart_tiny", "model.vocab_size=512", "data=bart_denoise", "data.tokenizer_vocab=512"]}


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_encoder_decoder_multiple_choice_equals_transformers_seq2seq_on_the_export(tmp_path, name):
    steps = ["trainer.max_steps=1", "optim.warmup_steps=0"] + tiny_overrides("gpt")[3:]
    assert make_trainer(tmp_path / "run", ENCDEC[name] + steps).train() == 0
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    task = _write(tmp_path / "colors.jsonl", MC)
    assert main(["eval", str(tmp_path / "run"), "--tasks", str(task), "--shots", "1", "--batch-size", "4",
                 "--out", str(tmp_path / "out")]) == 0
    saved = json.loads((tmp_path / "out" / "colors.prompts.json").read_text())["prompts"]
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "hf").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    correct = correct_norm = 0
    for record, p in zip(MC, saved):
        source = torch.tensor([tokenizer(p["prompt"])["input_ids"]])
        theirs = []
        for choice in record["choices"]:
            # bare, as lm-eval encodes a seq2seq continuation; decoder_input_ids: labels shifted right
            labels = torch.tensor([tokenizer(" " + choice, add_special_tokens=False)["input_ids"]])
            with torch.no_grad():
                logprobs = torch.log_softmax(model(input_ids=source, labels=labels).logits[0], dim=-1)
            theirs.append(float(logprobs[torch.arange(labels.shape[1]), labels[0]].sum()))
        assert p["loglikelihoods"] == pytest.approx(theirs, abs=1e-4)
        correct += int(np.argmax(theirs)) == record["answer"]
        correct_norm += int(np.argmax([s / len(c) for s, c in zip(theirs, record["choices"])])) == record["answer"]
    result = json.loads((tmp_path / "out" / "colors.json").read_text())
    assert (result["acc"], result["acc_norm"]) == (correct / len(MC), correct_norm / len(MC))
    for model_dir in ("run", "hf"):  # the export replays to the same scores
        assert main(["eval", str(tmp_path / model_dir), "--replay", str(tmp_path / "out" / "colors.prompts.json")]) == 0
    assert main(["eval", str(tmp_path / "run"), "--tasks", str(_write(tmp_path / "words.jsonl", GEN))]) == 2
