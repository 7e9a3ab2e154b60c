"""`scaletrain export`: a tiny run of every family the zoo shares with transformers is exported, and the
folder is what a transformers user expects: the Auto* class loads it with no missing or unexpected keys,
its logits equal our model's on the same tokens (fp32, 1e-4), the pipeline runs, and the tokenizer adds
the special tokens the objective trained with, knows its mask token and model_max_length."""

import json

import pytest
import torch
import transformers

from scaletrain.cli import main
from scaletrain.inference.load import load_model
from train_utils import make_trainer, tiny_overrides

ROBERTA = ["model=bert_tiny", "model.vocab_size=512", "data=roberta_mlm", "data.tokenizer_vocab=512",
           "model.positions_from_padding=true", "model.position_offset=2", "model.pad_token_id=1",
           "model.type_vocab_size=1", "model.nsp_head=false", "model.pooler=false"]
BART = ["model=bart_tiny", "model.vocab_size=512", "data=bart_denoise", "data.tokenizer_vocab=512"]
T5 = tiny_overrides("encdec")[:5]
# name -> (overrides, Auto class, pipeline task, what the tokenizer puts around "a b")
RUNS = {
    "gpt": (tiny_overrides("gpt")[:3], transformers.AutoModelForCausalLM, "text-generation", ("", "")),
    "bert_nsp": (tiny_overrides("bert")[:6], transformers.AutoModelForPreTraining, None, ("[CLS]", "[SEP]")),
    "bert": (tiny_overrides("bert")[:5] + ["model.nsp_head=false"], transformers.AutoModelForMaskedLM, "fill-mask",
             ("[CLS]", "[SEP]")),
    "roberta": (ROBERTA, transformers.AutoModelForMaskedLM, "fill-mask", ("<s>", "</s>")),
    "t5_v1_0": (T5, transformers.AutoModelForSeq2SeqLM, "text2text-generation", ("", "</s>")),
    "t5_v1_1": (["model=t5_v1_1_tiny"] + T5[1:], transformers.AutoModelForSeq2SeqLM, "text2text-generation",
                ("", "</s>")),
    "bart": (BART, transformers.AutoModelForSeq2SeqLM, "text2text-generation", ("<s>", "</s>")),
    "xlnet": (tiny_overrides("xlnet")[:5], transformers.AutoModelForCausalLM, "text-generation", ("", "[CLS]")),
}
STEPS = ["trainer.max_steps=1", "optim.warmup_steps=0"] + tiny_overrides("gpt")[3:]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (run folder, exported folder); one tiny step each, exported through the CLI."""
    root, folders = tmp_path_factory.mktemp("export"), {}
    for name, (overrides, _, _, _) in RUNS.items():
        extra = ["checkpoint.export_hf=true"] if name == "bart" else []  # the trainer's own export, too
        trainer = make_trainer(root / name, overrides + STEPS + extra)
        assert trainer.train() == 0
        assert main(["export", str(root / name), "--out", str(root / f"{name}-hf")]) == 0
        folders[name] = (root / name, root / f"{name}-hf")
    return folders


def _inputs(loaded, family, length=10):
    ids = torch.randint(5, loaded.tokenizer.vocab_size, (2, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    ids[1, -3:] = loaded.model_cfg.pad_token_id if family != "gpt" else 0
    return ids, mask


def _logits(model, ids, mask, family, hf):
    if family == "encdec":
        decoder = ids[:, :6]
        out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder) if hf else model(ids, decoder, mask)
    else:
        out = model(input_ids=ids, attention_mask=mask) if hf else model(ids, attention_mask=mask)
    if hf:
        return out.logits if hasattr(out, "logits") else out.prediction_logits
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("name", RUNS)
def test_export_loads_in_transformers_with_our_logits(exported, name):
    run, folder = exported[name]
    _, auto_class, _, _ = RUNS[name]
    hf_model, info = auto_class.from_pretrained(folder, output_loading_info=True)
    assert {key: value for key, value in info.items() if value} == {}
    ours = load_model(run)
    ids, mask = _inputs(ours, ours.family)
    with torch.no_grad():
        expected, actual = _logits(ours.model, ids, mask, ours.family, False), _logits(hf_model.eval(), ids, mask,
                                                                                       ours.family, True)
    assert expected.shape == actual.shape
    assert (expected - actual).abs().max() <= 1e-4


@pytest.mark.parametrize("name", RUNS)
def test_exported_tokenizer_and_config_name_the_run_special_tokens(exported, name):
    run, folder = exported[name]
    _, _, task, (first, last) = RUNS[name]
    files = {path.name for path in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json"} <= files
    assert ("generation_config.json" in files) == (task not in (None, "fill-mask"))  # generative classes only
    tokenizer, ours = transformers.AutoTokenizer.from_pretrained(folder), load_model(run)
    config = json.loads((folder / "config.json").read_text())
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("a b")["input_ids"])
    assert tokens[0] == first if first else tokens[0] not in tokenizer.all_special_tokens
    assert tokens[-1] == last if last else tokens[-1] not in tokenizer.all_special_tokens
    family = ours.family
    if family == "gpt":
        assert tokenizer.model_max_length == config["n_positions"] == ours.model_cfg.max_seq_len
        assert config["eos_token_id"] == ours.tokenizer.eod_id == tokenizer.eos_token_id
    if family == "bert":
        pair = tokenizer("a", "b")  # segment ids reach the model when it has a segment embedding
        assert pair.get("token_type_ids") == ([0, 0, 0, 1, 1] if ours.model_cfg.type_vocab_size > 1 else None)
        assert tokenizer.mask_token_id == ours.tokenizer.special_id("mask") == config["mask_token_id"]
        assert tokenizer.pad_token_id == config["pad_token_id"]
        assert config["max_position_embeddings"] == ours.model_cfg.max_seq_len + ours.model_cfg.position_offset
    if name.startswith("t5"):
        assert config["decoder_start_token_id"] == tokenizer.pad_token_id == ours.tokenizer.pad_id
        assert tokenizer.model_max_length == 32  # the run's trainer.seq_len
    if family == "xlnet":  # the plm objective's A <sep> B <sep> <cls>, types 0 1 2; padded on the left
        pair = tokenizer("a", "b")
        assert tokenizer.convert_ids_to_tokens(pair["input_ids"]) == ["a", "[SEP]", "b", "[SEP]", "[CLS]"]
        assert pair["token_type_ids"] == [0, 0, 1, 1, 2] and tokenizer.padding_side == "left"
    if name == "bart":
        assert config["decoder_start_token_id"] == config["eos_token_id"] == tokenizer.eos_token_id
        assert tokenizer.mask_token_id == ours.tokenizer.special_id("mask")


@pytest.mark.parametrize("name", [name for name, run in RUNS.items() if run[2]])
def test_pipeline_runs_on_the_exported_folder(exported, name):
    _, folder = exported[name]
    task = RUNS[name][2]
    if task == "text2text-generation":  # removed in transformers 5: what the pipeline did, by hand
        model = transformers.AutoModelForSeq2SeqLM.from_pretrained(folder)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        out = model.generate(**tokenizer(["the", "a b c"], return_tensors="pt", padding=True), max_new_tokens=4,
                             do_sample=False)
        assert out.shape[0] == 2 and (out[:, 0] == model.config.decoder_start_token_id).all()
        assert all(isinstance(text, str) for text in tokenizer.batch_decode(out, skip_special_tokens=True))
        return
    pipe = transformers.pipeline(task, model=str(folder), device="cpu")
    if task == "fill-mask":
        results = pipe(f"the {pipe.tokenizer.mask_token} of", top_k=3)
        assert len(results) == 3 and all(0 <= r["score"] <= 1 for r in results)
    else:
        assert isinstance(pipe("the", max_new_tokens=4, do_sample=False)[0]["generated_text"], str)


def test_export_refuses_a_non_empty_folder_and_shards_above_the_limit(exported, tmp_path, capsys):
    run, folder = exported["gpt"]
    assert main(["export", str(run), "--out", str(folder)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["export", str(run), "--out", str(tmp_path / "sharded"), "--max-shard-size", "20KB"]) == 0
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sharded")
    original = transformers.AutoModelForCausalLM.from_pretrained(folder)
    for key, tensor in original.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], tensor), key
    # a sharded folder reads back through load_model as well
    assert load_model(tmp_path / "sharded").hf_class == "GPT2LMHeadModel"


def test_export_hf_at_the_end_of_a_run_writes_what_the_cli_writes(exported):
    run, folder = exported["bart"]
    [step] = (run / "checkpoints").glob("step-*")
    by_trainer = run / "hf" / step.name
    assert sorted(p.name for p in by_trainer.iterdir()) == sorted(p.name for p in folder.iterdir())
    ours = transformers.AutoModelForSeq2SeqLM.from_pretrained(by_trainer).state_dict()
    for key, tensor in transformers.AutoModelForSeq2SeqLM.from_pretrained(folder).state_dict().items():
        assert torch.equal(ours[key], tensor), key


@pytest.mark.parametrize("extra, named", [(["checkpoint.save_final=false"], "checkpoint.save_final"),
                                          (["model.norm=rmsnorm"], "norm='rmsnorm'")])
def test_export_hf_that_cannot_happen_is_refused_before_the_run(extra, named):
    from scaletrain.configs.store import compose_config
    from scaletrain.errors import UserError
    from scaletrain.train.main import validate

    with pytest.raises(UserError, match=named):
        validate(compose_config(tiny_overrides("gpt") + ["checkpoint.export_hf=true", *extra]))


@pytest.mark.parametrize("name", ["gpt", "t5_v1_0", "bart"])
def test_generate_from_a_trained_run_prints_what_transformers_decodes_from_the_export(exported, name, capsys):
    run, folder = exported[name]
    assert main(["generate", str(run), "--prompt", "the a", "--prompt", "b", "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr().out.splitlines()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    auto = RUNS[name][1]
    model = auto.from_pretrained(folder).eval()
    for index, prompt in enumerate(["the a", "b"]):
        ids = tokenizer(prompt, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=5, do_sample=False, num_beams=1,
                             pad_token_id=model.generation_config.pad_token_id, forced_eos_token_id=None)
        new = out[0, (ids["input_ids"].shape[1] if name == "gpt" else 1):]
        assert printed[2 * index] == f"[{index + 1}] {prompt}"
        assert printed[2 * index + 1] == f"  -> {tokenizer.decode(new, skip_special_tokens=True)}"
