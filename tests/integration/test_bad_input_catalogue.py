"""A catalogue of bad input through the real CLI (one subprocess each, run three at a time): every case
exits 2 with one `error:` line on stderr and no traceback, and the verified contents of a good run folder
and of a good prepared data folder, which many cases aim at, are byte-for-byte unchanged afterwards."""

import concurrent.futures
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from scaletrain.cli import main
from train_utils import cli_env, make_trainer, tiny_overrides

TRAIN = tiny_overrides("gpt", "trainer.max_steps=1")
LONG_PROMPT = " ".join(["word"] * 400)  # past gpt_tiny's context

# name -> argv after `scaletrain`; {run} is a good run folder, {data} a good prepared folder, {file} a
# plain file, {empty} an empty folder, {tmp} a scratch folder of the case
CASES = {
    "batch_not_divisible": ["train", *TRAIN, "trainer.global_batch=5"],
    "unknown_model": ["train", *TRAIN, "model=no_such_model"],
    "unknown_key": ["train", *TRAIN, "trainer.no_such_field=1"],
    "unknown_added_key": ["train", *TRAIN, "+trainer.extra_key=1"],
    "unknown_nested_group": ["train", *TRAIN, "launcher=nope"],
    "unknown_experiment": ["train", *TRAIN, "experiment=nope"],
    "bad_choice": ["train", *TRAIN, "optim.schedule=cubic"],
    "objective_for_other_family": ["train", *TRAIN, "data.objective=mlm"],
    "log_every_zero": ["train", *TRAIN, "trainer.log_every=0"],
    "eval_batches_zero": ["train", *TRAIN, "trainer.eval_batches=0"],
    "negative_lr": ["train", *TRAIN, "optim.lr=-1"],
    "negative_steps": ["train", *TRAIN, "trainer.max_steps=-5"],
    "keep_zero": ["train", *TRAIN, "checkpoint.keep=0"],
    "not_an_integer": ["train", *TRAIN, "trainer.seq_len=abc"],
    "malformed_override": ["train", *TRAIN, "=3"],
    "bad_precision": ["train", *TRAIN, "precision=fp8"],
    "bad_sweep_point": ["train", "-m", *TRAIN, "optim.lr=1e-3,-1"],
    "vocab_below_tokenizer": ["train", *TRAIN, "model.vocab_size=256"],
    "byte_bpe_vocab_too_small": ["train", *TRAIN, "data.tokenizer_vocab=100", "model.vocab_size=100"],
    "pp_split_out_of_range": ["train", *TRAIN, "parallel.pp=2", "parallel.pp_split=[9]", "launcher.nproc_per_node=2"],
    "export_hf_without_final_save": ["train", *TRAIN, "checkpoint.export_hf=true", "checkpoint.save_final=false"],
    "missing_resume_path": ["train", *TRAIN, "resume=/no/such/checkpoint"],
    "missing_corpus": ["train", *TRAIN, "data.corpus=/no/such/corpus"],
    "missing_init_from": ["train", *TRAIN, "model.init_from=/no/such/model"],
    "init_from_other_architecture": ["train", *TRAIN, "model.init_from={run}", "model=gpt_tiny", "model.n_layers=3"],
    "fresh_start_in_used_folder": ["train", *TRAIN, "resume=none", "hydra.run.dir={run}"],
    "run_dir_under_a_file": ["train", *TRAIN, "hydra.run.dir={file}/run"],
    "resume_into_another_architecture": ["train", *TRAIN, "model.n_layers=3", "hydra.run.dir={run}"],
    "checkpoints_is_a_file": ["train", *TRAIN, "hydra.run.dir={blocked}"],
    "metrics_file_is_a_folder": ["train", *TRAIN, "hydra.run.dir={tmp}/run"],
    "prepared_folder_without_metadata": ["train", *TRAIN, "data.prepared={empty}"],
    "plan_bad_tokens": ["plan", "model=gpt3_175b", "--tokens", "abc"],
    "table_unknown_cluster": ["table", "--cluster", "nope"],
    "scaling_fit_missing_sweep": ["scaling", "fit", "/no/such/sweep"],
    "data_unknown_option": ["data", "prepare", "--out", "{tmp}/out", "--bogus"],
    "data_missing_corpus": ["data", "prepare", "--out", "{tmp}/out", "--corpus", "/no/such/corpus"],
    "unknown_command": ["nosuchcommand"],
    "export_missing_source": ["export", "/no/such/run", "--out", "{tmp}/out"],
    "export_folder_without_checkpoint": ["export", "{empty}", "--out", "{tmp}/out"],
    "export_into_a_non_empty_folder": ["export", "{run}", "--out", "{data}"],
    "generate_without_prompt": ["generate", "{run}"],
    "generate_zero_new_tokens": ["generate", "{run}", "--prompt", "a", "--max-new-tokens", "0"],
    "generate_negative_temperature": ["generate", "{run}", "--prompt", "a", "--temperature", "-1"],
    "generate_prompt_past_the_context": ["generate", "{run}", "--prompt", LONG_PROMPT],
    "generate_missing_prompts_file": ["generate", "{run}", "--prompts", "/no/such/prompts.txt"],
    "generate_missing_model": ["generate", "/no/such/model", "--prompt", "a"],
    "fill_mask_on_a_gpt": ["fill-mask", "{run}", "a [MASK] b"],
    "fill_mask_without_a_mask": ["fill-mask", "{run}", "no mask here"],
}


HYDRA_NOTES = (".hydra", "train.log")  # rewritten / appended by every launch in the folder, by design

# what each case's one line must say: the case hits the check it is about, not some earlier one
EXPECTED = {
    'batch_not_divisible': 'trainer.global_batch=5 is not divisible',
    'unknown_model': "Could not find 'model/no_such_model' -- available model presets",
    'unknown_key': "unknown config key 'trainer.no_such_field'",
    'unknown_added_key': "unknown config key 'trainer.extra_key'",
    'unknown_nested_group': 'available launcher presets: local',
    'unknown_experiment': 'available experiment presets',
    'bad_choice': "optim.schedule='cubic' is not one of",
    'objective_for_other_family': 'data.objective=mlm does not train a gpt model',
    'log_every_zero': 'trainer.log_every=0 must be positive',
    'eval_batches_zero': 'trainer.eval_batches=0 must be positive',
    'negative_lr': 'optim.lr=-1.0 must be positive',
    'negative_steps': 'trainer.max_steps=-5 must be >= 0',
    'keep_zero': 'checkpoint.keep=0 must be positive',
    'not_an_integer': 'could not be converted to Integer',
    'malformed_override': "malformed override '=3'",
    'bad_precision': "precision='fp8' is not one of",
    'bad_sweep_point': 'optim.lr=-1.0 must be positive (sweep point',
    'vocab_below_tokenizer': 'model.vocab_size=256 is smaller than data.tokenizer_vocab=512',
    'byte_bpe_vocab_too_small': 'too small for a byte_bpe tokenizer',
    'pp_split_out_of_range': 'parallel.pp_split=[9] must list',
    'export_hf_without_final_save': 'checkpoint.save_final=false skips',
    'missing_resume_path': 'resume=/no/such/checkpoint: the path does not exist',
    'missing_corpus': 'data.corpus path /no/such/corpus does not exist',
    'missing_init_from': 'model.init_from /no/such/model does not exist',
    'init_from_other_architecture': 'n_layers=3 (source: 2)',
    'fresh_start_in_used_folder': 'resume=none but',
    'run_dir_under_a_file': 'which is a f',
    'prepared_folder_without_metadata': 'has no complete metadata.json',
    'resume_into_another_architecture': 'holds a different architecture',
    'checkpoints_is_a_file': 'checkpoints is a file, not a folder',
    'metrics_file_is_a_folder': 'cannot write (metrics.jsonl): Is a directory',
    'plan_bad_tokens': "argument --tokens: invalid float value: 'abc'",
    'table_unknown_cluster': 'available cluster presets',
    'scaling_fit_missing_sweep': '/no/such/sweep is not a folder',
    'data_unknown_option': 'unrecognized arguments: --bogus',
    'data_missing_corpus': 'data.corpus path /no/such/corpus does not exist',
    'unknown_command': "unknown command 'nosuchcommand'",
    'export_missing_source': '/no/such/run does not exist',
    'export_folder_without_checkpoint': 'is neither a run folder',
    'export_into_a_non_empty_folder': 'exists and is not empty',
    'generate_without_prompt': 'no prompt given',
    'generate_zero_new_tokens': '--max-new-tokens=0 must be at least 1',
    'generate_negative_temperature': '--temperature=-1.0 must be positive',
    'generate_prompt_past_the_context': "longer than the model's context of 64",
    'generate_missing_prompts_file': '--prompts /no/such/prompts.txt is not a file',
    'generate_missing_model': '/no/such/model does not exist',
    'fill_mask_on_a_gpt': 'fill-mask needs a masked language model',
    'fill_mask_without_a_mask': 'the text has no mask token',
}


def _contents(folder: Path) -> dict[str, str]:
    """What a failed command must not touch: everything but Hydra's own per-launch notes and the log."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.parts[len(folder.parts)] not in HYDRA_NOTES}


def _run(argv: list[str], places: dict[str, Path], scratch: Path) -> subprocess.CompletedProcess:
    scratch.mkdir()
    (scratch / "run" / "metrics.jsonl").mkdir(parents=True)  # only the metrics_file_is_a_folder case looks
    args = [arg.format(tmp=scratch, **places) for arg in argv]
    return subprocess.run([sys.executable, "-m", "scaletrain.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=scratch, env=cli_env())


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    root = tmp_path_factory.mktemp("catalogue")
    places = {"run": root / "run", "data": root / "data", "file": root / "a_file", "empty": root / "empty",
              "blocked": root / "blocked"}
    assert make_trainer(places["run"], TRAIN).train() == 0
    assert main(["data", "prepare", "--out", str(places["data"]), "--tokenizer-vocab", "512", "--no-progress"]) == 0
    places["file"].write_text("not a folder\n")
    places["empty"].mkdir()
    places["blocked"].mkdir()
    (places["blocked"] / "checkpoints").write_text("a file where the checkpoints folder should be\n")
    before = {name: _contents(places[name]) for name in ("run", "data")}
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = {name: pool.submit(_run, argv, places, root / f"case-{name}") for name, argv in CASES.items()}
        results = {name: future.result() for name, future in futures.items()}
    return results, before, places


def test_the_catalogue_holds_at_least_forty_kinds_of_bad_input():
    assert len(CASES) >= 40 and set(EXPECTED) == set(CASES)


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_one_error_line_exit_2_and_loses_nothing(catalogue, name):
    results, before, places = catalogue
    result = results[name]
    # log records ([time][logger][LEVEL]) may precede the failure; the failure itself is one line
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("[20")]
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    assert EXPECTED[name] in lines[0], lines[0]
    for folder in ("run", "data"):
        assert _contents(places[folder]) == before[folder], f"{name} changed the good {folder} folder"
