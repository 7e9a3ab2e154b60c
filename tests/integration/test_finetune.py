"""Finetuning is training: data.task=classification | regression on the trainer. Each family learns a tiny
topic task well above chance (1/3); metrics reach metrics.jsonl and final_metrics.json; dp2 and tp2 give the
losses of one process; a resume mid-finetune is exact; keep_best keeps the best checkpoint besides the last."""

import json

import pytest

from scaletrain.checkpoint.manager import read_manifest
from scaletrain.cli import main
from scaletrain.data.tasks import read_label_file
from scaletrain.parallel.multiprocess import run_on_ranks
from train_utils import make_trainer, stop_after, task_overrides, write_topic_task

FAMILIES = {  # BERT's post-LN stack with its tanh pooler needs a larger step to move in 40 steps
    "gpt": ["model=gpt_tiny"], "bert": ["model=bert_tiny", "optim.lr=1e-2"],
    "t5": ["model=t5_tiny", "data.tokenizer_type=unigram", "model.pooler=true"],  # export needs HF's pooled head
    "bart": ["model=bart_tiny", "data.tokenizer_type=bart_bpe", "model.pooler=true"],
    "xlnet": ["model=xlnet_tiny"]}  # left-padded: its summary reads the last position (<cls>)


@pytest.fixture(scope="module")
def topic_task(tmp_path_factory):
    return write_topic_task(tmp_path_factory.mktemp("task"))


def _overrides(family, task, *extra):
    base = "encdec" if family in ("t5", "bart") else family
    return task_overrides(base, *task, *FAMILIES[family], *extra)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_learns_a_topic_task(tmp_path, topic_task, family):
    trainer = make_trainer(tmp_path, _overrides(family, topic_task, "trainer.max_steps=40", "trainer.eval_every=20"))
    assert trainer.model_cfg.num_labels == 3  # from the data
    trainer.train()
    assert trainer.last_eval["val_accuracy"] > 0.6, trainer.last_eval
    evals = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if "val_accuracy" in r]
    assert [r["step"] for r in evals] == [20, 40] and {"val_f1", "val_mcc", "val_loss"} <= set(evals[-1])
    final = json.loads((tmp_path / "final_metrics.json").read_text())
    assert final["val_accuracy"] == evals[-1]["val_accuracy"] and "val_ppl" not in final
    step = tmp_path / "checkpoints" / "step-000040"
    assert read_label_file(step) == {0: "food", 1: "music", 2: "sports"}
    assert read_manifest(step)["config"]["model"]["num_labels"] == 3


def test_regression_learns_a_count(tmp_path):
    """STS-style: the target is how many music words a line holds (0, 1 or 2); MSE, Pearson and Spearman."""
    rows = []
    for i in range(240):
        music = i % 3
        words = ["the", "a", "of", "and", "to", "in"] + ["guitar", "song"][:music] + ["bread", "cheese"][:2 - music]
        words = words[i % 5:] + words[:i % 5]
        rows.append(json.dumps({"text": " ".join(words), "score": float(music)}))
    (tmp_path / "sts.jsonl").write_text("\n".join(rows) + "\n")
    trainer = make_trainer(tmp_path, task_overrides(
        "gpt", tmp_path / "sts.jsonl", tmp_path / "sts.jsonl", "data.task=regression", "data.label_field=score",
        "model=gpt_tiny", "trainer.max_steps=40", "trainer.eval_every=40", "checkpoint.keep_best=val_pearson"))
    assert trainer.model_cfg.num_labels == 1
    trainer.train()
    assert trainer.last_eval["val_pearson"] > 0.8 and trainer.last_eval["val_spearman"] > 0.8, trainer.last_eval


SGD = ["optim=sgd", "optim.lr=0.5", "trainer.max_steps=3", "trainer.micro_batch=2", "trainer.eval_every=3"]


def _finetune_on_rank(rank, world_size, run_dir, overrides):
    trainer = make_trainer(run_dir, overrides)
    trainer.train()
    return trainer.losses, trainer.last_eval


@pytest.mark.parametrize("family, layout", [("gpt", ["parallel.dp_shard=2"]),
                                             ("bert", ["parallel.dp_shard=2", "parallel.zero=3"]),
                                             ("bert", ["parallel.dp_shard=2", "parallel.zero=3",
                                                       "parallel.engine=deepspeed"]),
                                             ("gpt", ["parallel.tp=2", "parallel.dp_shard=1"]),
                                             ("xlnet", ["parallel.tp=2", "parallel.dp_shard=1"])])
def test_two_ranks_finetune_as_one_process(tmp_path, topic_task, family, layout):
    single = make_trainer(tmp_path / "single", _overrides(family, topic_task, *SGD))
    single.train()
    for losses, last_eval in run_on_ranks(_finetune_on_rank, 2, tmp_path / "two",
                                          _overrides(family, topic_task, *SGD, *layout)):
        assert losses == pytest.approx(single.losses, rel=1e-5, abs=1e-6)
        assert last_eval == pytest.approx(single.last_eval, rel=1e-5, abs=1e-6)


def test_resume_mid_finetune_is_exact(tmp_path, topic_task):
    overrides = _overrides("gpt", topic_task, "optim=sgd", "trainer.max_steps=6")
    straight = make_trainer(tmp_path / "straight", overrides)
    straight.train()
    first = make_trainer(tmp_path / "resumed", overrides)
    stop_after(first, 3)
    first.train()
    second = make_trainer(tmp_path / "resumed", overrides)
    second.train()
    assert first.losses + second.losses == straight.losses


def test_keep_best_keeps_the_best_checkpoint_besides_the_last(tmp_path, topic_task):
    trainer = make_trainer(tmp_path, _overrides("gpt", topic_task, "trainer.max_steps=40", "trainer.eval_every=4",
                                                "checkpoint.keep=1", "checkpoint.every=8",
                                                "checkpoint.keep_best=val_accuracy"))
    trainer.train()
    evals = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    accuracies = {r["step"]: r["val_accuracy"] for r in evals if "val_accuracy" in r}
    best = max(accuracies.values())
    best_step = min(step for step, value in accuracies.items() if value == best)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*"))
    assert kept == sorted({f"step-{best_step:06d}", "step-000040"}), (kept, accuracies)
    final = json.loads((tmp_path / "final_metrics.json").read_text())
    assert final["best_val_accuracy"] == best and final["best_step"] == best_step


@pytest.mark.parametrize("record, extra, message", [
    ({"text": "a", "y": 1}, [], "has no field 'label'"),
    ({"text": "a", "label": "p"}, ["parallel.pp=2", "launcher.nproc_per_node=2"], "needs parallel.pp=1"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, record, extra, message):
    (tmp_path / "task.jsonl").write_text(json.dumps(record) + "\n")
    task = tmp_path / "task.jsonl"
    code = main(["train", *task_overrides("gpt", task, task, "model=gpt_tiny", *extra), f"hydra.run.dir={tmp_path}"])
    error = capsys.readouterr().err
    assert code == 2 and message in error and len(error.strip().splitlines()) == 1, error


ROBERTA = ["model.positions_from_padding=true", "model.type_vocab_size=1", "model.position_offset=2",
           "model.pad_token_id=1", "model.nsp_head=false", "data.tokenizer_type=bart_bpe"]


@pytest.mark.parametrize("family, extra", [*((family, []) for family in FAMILIES), ("bert", ROBERTA)])
def test_export_gives_a_sequence_classifier_with_equal_logits(tmp_path, topic_task, family, extra):
    import torch
    import transformers

    trainer = make_trainer(tmp_path / "run", _overrides(family, topic_task, "trainer.max_steps=4", *extra))
    trainer.train()
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    hf_model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert hf_model.config.id2label == {0: "food", 1: "music", 2: "sports"}
    batch = {k: torch.from_numpy(v[:8]) for k, v in trainer.data.validation.arrays.items()}
    trainer.model.eval()
    with torch.no_grad():
        ours = trainer.model.classify(**{k: v for k, v in batch.items() if k != "labels"})
        segments = {"token_type_ids": batch["token_type_ids"]} if family == "xlnet" else {}
        theirs = hf_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **segments).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")  # frames and pads a text as we do
    assert tokenizer.padding_side == ("left" if family == "xlnet" else "right")
    for row, line in enumerate(topic_task[1].read_text().splitlines()[:8]):
        encoded = tokenizer(json.loads(line)["text"], truncation=True, max_length=batch["input_ids"].shape[1])
        length = int(batch["attention_mask"][row].sum())
        kept = slice(-length, None) if family == "xlnet" else slice(0, length)
        assert encoded["input_ids"] == batch["input_ids"][row, kept].tolist()
