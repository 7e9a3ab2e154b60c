"""data.text_to_text=true: a T5 / BART finetuned to write each record's label word as its decoder output, scored
by exact match of greedy decoding. Each learns the topic task well above chance (1/3), and its validation
accuracy is what transformers' greedy generate on the exported seq2seq model spells."""

import json

import pytest
import transformers

from scaletrain.cli import main
from train_utils import make_trainer, task_overrides, write_topic_task

FAMILIES = {"t5": (["model=t5_tiny", "data.tokenizer_type=unigram"], 120),
            "bart": (["model=bart_tiny", "data.tokenizer_type=bart_bpe"], 300)}  # BART reads its encoder later


@pytest.fixture(scope="module")
def topic_task(tmp_path_factory):
    return write_topic_task(tmp_path_factory.mktemp("task"))


@pytest.mark.parametrize("family", FAMILIES)
def test_encoder_decoders_learn_label_words_and_transformers_generates_the_same(tmp_path, topic_task, family):
    extra, steps = FAMILIES[family]
    overrides = task_overrides("encdec", *topic_task, *extra, "data.text_to_text=true", f"trainer.max_steps={steps}",
                               f"trainer.eval_every={steps}")
    trainer = make_trainer(tmp_path / "run", overrides)
    assert trainer.model_cfg.num_labels == 0  # no head
    trainer.train()
    assert trainer.last_eval["val_accuracy"] > 0.6, trainer.last_eval
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "hf").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    arrays, names = trainer.data.validation.arrays, trainer.data.labels.names
    records = [json.loads(line) for line in topic_task[1].read_text().splitlines()]
    correct = 0
    for row, record in enumerate(records):
        target = tokenizer(record["label"])["input_ids"]  # the label word framed as Hugging Face frames labels
        assert arrays["labels"][row, :len(target)].tolist() == target
        assert names[arrays["class_ids"][row]] == record["label"]
        assert arrays["decoder_input_ids"][row, 1:len(target)].tolist() == target[:-1]
        ids = tokenizer(record["text"], truncation=True, max_length=arrays["input_ids"].shape[1], return_tensors="pt")
        assert ids["input_ids"][0].tolist() == arrays["input_ids"][row, :ids["input_ids"].shape[1]].tolist()
        out = model.generate(**ids, max_new_tokens=arrays["labels"].shape[1] + 1, do_sample=False, num_beams=1)
        correct += tokenizer.decode(out[0], skip_special_tokens=True).strip() == record["label"]
    assert trainer.last_eval["val_accuracy"] == correct / len(records)


@pytest.mark.parametrize("extra, message", [
    (["model=gpt_tiny"], "data.text_to_text=true trains a T5 / BART to write the label words"),
    (["model=t5_tiny", "model.num_labels=3"], "has no classification head; set model.num_labels=0")])
def test_text_to_text_off_an_encoder_decoder_or_with_a_head_is_refused(tmp_path, topic_task, capsys, extra, message):
    code = main(["train", *task_overrides("encdec", *topic_task, *extra, "data.text_to_text=true"),
                 f"hydra.run.dir={tmp_path}"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and message in error and "\n" not in error, error


def _finetune_on_rank(rank, world_size, run_dir, overrides):
    trainer = make_trainer(run_dir, overrides)
    trainer.train()
    return trainer.losses, trainer.last_eval


@pytest.mark.parametrize("layout", [["parallel.dp_shard=2", "parallel.zero=3"],
                                    ["parallel.tp=2", "parallel.dp_shard=1"]])
def test_two_ranks_finetune_text_to_text_as_one_process(tmp_path, layout):
    from scaletrain.parallel.multiprocess import run_on_ranks

    small = write_topic_task(tmp_path / "task", train=40, validation=12)  # greedy decoding is L forwards a batch
    overrides = task_overrides("encdec", *small, *FAMILIES["t5"][0], "data.text_to_text=true", "optim=sgd",
                               "optim.lr=0.5", "trainer.max_steps=3", "trainer.eval_every=3", "trainer.micro_batch=4")
    single = make_trainer(tmp_path / "single", overrides)
    single.train()
    for losses, last_eval in run_on_ranks(_finetune_on_rank, 2, tmp_path / "two", overrides + layout):
        assert losses == pytest.approx(single.losses, rel=1e-5, abs=1e-6)
        assert last_eval == pytest.approx(single.last_eval, rel=1e-5, abs=1e-6)
