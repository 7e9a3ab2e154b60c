"""trainer.eval_tasks beyond a GPT in dp / tp: a GPT under pipeline parallelism (pp2, pp2 x dp2, ZBV), and a
BERT and a RoBERTa (cloze), a T5 and a BART (multiple choice) under ZeRO-3 and tp2, score what one process
scores, and what `scaletrain eval --tasks` gives on the final checkpoint."""

import json

import pytest

from scaletrain.cli import main
from scaletrain.parallel.multiprocess import run_on_ranks
from test_eval import CLOZE, ENCDEC, MC, _write
from train_utils import make_trainer, tiny_overrides

TASK_RUN = ["optim=sgd", "optim.lr=0.5", "trainer.max_steps=2", "optim.warmup_steps=0", "trainer.eval_every=2",
            "trainer.eval_shots=1"]


def _train_on_rank(rank, world_size, run_dir, overrides):
    trainer = make_trainer(run_dir, overrides)
    trainer.train()
    return trainer.last_eval, trainer.eval_prompts


def _task_scores(last_eval: dict) -> dict:
    return {k: v for k, v in last_eval.items() if k.startswith("task/")}


def _assert_same_scores(results, single, name):
    """Every rank logs one process's task scores, and every choice's log-likelihood agrees."""
    for last_eval, prompts in results:
        assert _task_scores(last_eval) == _task_scores(single.last_eval)
        for ours, theirs in zip(prompts[name], single.eval_prompts[name]):
            assert ours["loglikelihoods"] == pytest.approx(theirs["loglikelihoods"], rel=1e-5, abs=1e-5)


def _assert_cli_gives(run_dir, task, trainer, name, tmp_path):
    """scaletrain eval --tasks on the run's final checkpoint (any layout, read by one process) gives the scores
    the trainer logged at its last evaluation."""
    out = tmp_path / f"out-{run_dir.name}"
    assert main(["eval", str(run_dir), "--tasks", str(task), "--shots", "1", "--seed", str(trainer.cfg.seed),
                 "--seq-len", str(trainer.cfg.trainer.seq_len), "--out", str(out)]) == 0
    result = json.loads((out / f"{name}.json").read_text())
    final = json.loads((run_dir / "final_metrics.json").read_text())
    for metric in ("acc", "acc_norm"):
        assert result[metric] == final[f"task/{name}/{metric}"]


@pytest.mark.parametrize("ranks, model, layout", [
    (2, [], ["parallel.pp=2", "parallel.dp_shard=1"]),
    (4, [], ["parallel.pp=2", "parallel.dp_replicate=2", "parallel.dp_shard=1"]),
    (2, ["model.n_layers=4"], ["parallel.pp=2", "parallel.pp_virtual=2", "parallel.pp_schedule=zbv",
                               "parallel.dp_shard=1"])], ids=["pp2", "pp2_dp2", "pp2_zbv"])
def test_eval_tasks_through_the_pipeline_score_as_one_process(tmp_path, ranks, model, layout):
    mc = _write(tmp_path / "colors.jsonl", MC)
    # micro_batch 1: pp2 x dp2 still has the 2 micro-batches 1F1B needs
    overrides = tiny_overrides("gpt", *model, *TASK_RUN, "trainer.micro_batch=1", f"trainer.eval_tasks=[{mc}]")
    single = make_trainer(tmp_path / "single", overrides)
    single.train()
    assert {"task/colors/acc", "task/colors/acc_norm"} <= set(single.last_eval)
    _assert_same_scores(run_on_ranks(_train_on_rank, ranks, tmp_path / "pp", overrides + layout), single, "colors")
    _assert_cli_gives(tmp_path / "pp", mc, single, "colors", tmp_path)


ROBERTA = ["model=roberta_base", "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.d_ff=64",
           "model.vocab_size=512", "model.max_seq_len=128", "model.dropout=0.0", "model.attn_dropout=0.0",
           "data=roberta_mlm", "data.tokenizer_vocab=512"]  # a tiny RoBERTa: byte BPE, <mask>, no NSP
FAMILIES = {"bert": tiny_overrides("bert")[:5] + ["model.nsp_head=false"], "roberta": ROBERTA, **ENCDEC}


@pytest.mark.parametrize("family", ["bert", "roberta", "t5", "bart"])
def test_eval_tasks_of_encoders_and_encoder_decoders_under_zero3_and_tp2(tmp_path, family):
    name, records = ("cloze", CLOZE) if family in ("bert", "roberta") else ("colors", MC)
    task = _write(tmp_path / f"{name}.jsonl", records)
    # seq_len 64: a 1-shot prompt must fit whole in an encoder's window
    overrides = FAMILIES[family] + tiny_overrides("gpt")[3:] + TASK_RUN + [f"trainer.eval_tasks=[{task}]",
                                                                          "trainer.seq_len=64"]
    single = make_trainer(tmp_path / "single", overrides)
    single.train()
    assert {f"task/{name}/acc", f"task/{name}/acc_norm"} <= set(single.last_eval)
    _assert_cli_gives(tmp_path / "single", task, single, name, tmp_path)
    for layout, folder in ((["parallel.dp_shard=2", "parallel.zero=3"], "zero3"),
                           (["parallel.tp=2", "parallel.dp_shard=1"], "tp2")):
        _assert_same_scores(run_on_ranks(_train_on_rank, 2, tmp_path / folder, overrides + layout), single, name)


@pytest.mark.parametrize("family, extra, message", [
    ("xlnet", [], "this run is family xlnet, data.task=lm (XLNet's permutation LM has no few-shot scoring here)"),
    ("bert", ["parallel.pp=2", "parallel.dp_shard=1", "launcher.nproc_per_node=2"],
     "under pipeline parallelism (parallel.pp=2) scores a GPT only"),
    ("gpt", ["parallel.pp=2", "parallel.dp_shard=1", "launcher.nproc_per_node=2", "+generation"],
     "is a generation task, which parallel.pp=2 does not decode"),
    ("encdec", ["+generation"], "family encdec scores multiple-choice tasks only"),
    ("encdec", ["trainer.eval_shots=3"], "more than the encoder's window of 32; use fewer --shots")])
def test_eval_tasks_that_cannot_be_scored_here_are_refused_in_one_line(tmp_path, capsys, family, extra, message):
    generation = "+generation" in extra
    task = _write(tmp_path / "task.jsonl", [{"context": "a dog", "answer": "ran"}] if generation else MC)
    extra = [e for e in extra if e != "+generation"]
    code = main(["train", *tiny_overrides(family, f"trainer.eval_tasks=[{task}]", "trainer.eval_every=5", *extra),
                 f"hydra.run.dir={tmp_path / 'run'}"])
    error = capsys.readouterr().err.strip()
    assert code == 2 and message in error and "\n" not in error, error
