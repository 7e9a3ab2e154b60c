"""model.init_from: Hugging Face folders written by transformers itself (random weights, our trained
tokenizers) start a run whose first-step loss equals transformers' loss on the same batch (1e-5); the model
config comes from the folder, a conflicting model= is one line (exit 2); new heads are initialized and
listed; an export after zero steps gives back the source tensors bit for bit; dp2 and tp2 load what one
process loads while each rank reads only its share of the bytes; a scaletrain run folder is a source too."""

import json

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file

from scaletrain.cli import main
from scaletrain.configs.store import compose_config
from scaletrain.errors import UserError
from scaletrain.parallel.multiprocess import run_on_ranks
from scaletrain.train.trainer import Trainer
from train_utils import COMMON, full_params

VOCAB = 512
TOKENIZERS = {"gpt": "byte_bpe", "bert": "wordpiece", "t5": "unigram", "bart": "bart_bpe"}
OBJECTIVES = {"gpt": "clm", "bert": "mlm", "t5": "t5_span", "bart": "bart_denoise"}


def _hf_model(kind):
    no_dropout = dict(dropout=0.0, attention_dropout=0.0)
    if kind == "gpt":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                         eos_token_id=0)
        return transformers.GPT2LMHeadModel(config)
    if kind == "bert":
        config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                         attention_probs_dropout_prob=0.0)
        return transformers.BertForMaskedLM(config)
    if kind == "t5":
        config = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                       dropout_rate=0.0, feed_forward_proj="gated-gelu", pad_token_id=0,
                                       decoder_start_token_id=0)
        return transformers.T5ForConditionalGeneration(config)
    config = transformers.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                     decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=1, **no_dropout)
    return transformers.BartForConditionalGeneration(config)


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """kind -> a folder saved by transformers: random weights (norms and biases too) + our trained tokenizer."""
    from scaletrain.configs.schema import DataConfig
    from scaletrain.data.corpus import corpus_from_config
    from scaletrain.data.prepare import tokenizer_from_config

    root, folders = tmp_path_factory.mktemp("hf"), {}
    for kind, tokenizer_type in TOKENIZERS.items():
        data = DataConfig(tokenizer_type=tokenizer_type, tokenizer_vocab=VOCAB)
        tokenizer = tokenizer_from_config(data, corpus_from_config(data))
        model = _hf_model(kind)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
                if tensor.is_floating_point() and "position_ids" not in name:
                    tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator) + (tensor.dim() == 1) * 0.5)
        model.save_pretrained(root / kind)
        tokenizer.save(root / kind / "tokenizer.json")
        folders[kind] = root / kind
    return folders


def _overrides(kind, folder, *extra):
    return [f"model.init_from={folder}", f"data.objective={OBJECTIVES[kind]}", *COMMON, "trainer.max_steps=1",
            "optim=sgd", *extra]


def _trainer(run_dir, overrides):
    torch.set_num_threads(1)
    return Trainer(compose_config(overrides + [f"run_dir={run_dir}"]))


def _hf_loss(hf_model, micro_batches, kind):
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in micro_batches:
            inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "token_type_ids", "decoder_input_ids")
                      if key in batch}
            logits = hf_model(**inputs).logits
            total += F.cross_entropy(logits.flatten(0, 1).double(), batch["labels"].flatten(), reduction="sum",
                                     ignore_index=-100).item()
            count += int((batch["labels"] != -100).sum())
    return total / count


@pytest.mark.parametrize("kind", list(TOKENIZERS))
def test_first_step_loss_equals_transformers_loss(hf_folders, tmp_path, kind):
    trainer = _trainer(tmp_path, _overrides(kind, hf_folders[kind]))
    assert trainer.model_cfg.name.startswith("hf_") and trainer.data.tokenizer.source == str(hf_folders[kind])
    state = trainer.loader.state_dict()
    micro_batches = next(trainer.loader)
    trainer.loader.load_state_dict(state)
    assert trainer.train() == 0
    reference = getattr(transformers, json.loads((hf_folders[kind] / "config.json").read_text())["architectures"][0])
    expected = _hf_loss(reference.from_pretrained(hf_folders[kind]).eval(), micro_batches, kind)
    assert abs(trainer.losses[0] - expected) <= 1e-5


def test_export_after_zero_steps_gives_back_the_source_tensors(hf_folders, tmp_path):
    for kind in ("gpt", "t5"):  # tied head; untied head, gated MLP, two stacks
        trainer = _trainer(tmp_path / kind, _overrides(kind, hf_folders[kind]))
        trainer.save()  # step 0: nothing trained
        trainer.checkpoints.close()
        assert main(["export", str(tmp_path / kind), "--out", str(tmp_path / f"{kind}-out")]) == 0
        source = load_file(hf_folders[kind] / "model.safetensors")
        exported = load_file(tmp_path / f"{kind}-out" / "model.safetensors")
        assert set(exported) == set(source)
        for key, tensor in source.items():
            assert torch.equal(exported[key], tensor), key


def test_model_preset_that_differs_names_the_fields_and_exits_2(hf_folders, tmp_path, capsys):
    code = main(["train", f"model.init_from={hf_folders['gpt']}", "model=gpt_tiny", "model.n_layers=3",
                 f"hydra.run.dir={tmp_path}"])
    error = capsys.readouterr().err
    assert code == 2 and "n_layers=3 (source: 2)" in error and len(error.strip().splitlines()) == 1
    with pytest.raises(UserError, match="does not exist"):
        _trainer(tmp_path, _overrides("gpt", tmp_path / "nowhere"))


def test_a_scaletrain_run_is_a_source_with_a_fresh_optimizer(hf_folders, tmp_path):
    first = _trainer(tmp_path / "first", _overrides("gpt", hf_folders["gpt"], "trainer.max_steps=2"))
    assert first.train() == 0
    second = _trainer(tmp_path / "second", _overrides("gpt", tmp_path / "first"))
    assert second.state.step == 0 and second.schedule.state_dict() == _trainer(
        tmp_path / "third", _overrides("gpt", hf_folders["gpt"])).schedule.state_dict()
    assert second.data.tokenizer.hash == first.data.tokenizer.hash
    for name, tensor in full_params(first).items():
        assert torch.equal(dict(second.model.named_parameters())[name], tensor), name


def test_heads_the_source_lacks_are_initialized_and_listed(hf_folders, tmp_path, caplog):
    # BertForMaskedLM has neither a pooler nor a classifier: a finetuning run asks for both
    plain = _trainer(tmp_path / "plain", _overrides("bert", hf_folders["bert"]))
    with caplog.at_level("INFO", logger="scaletrain.checkpoint.init_from"):
        headed = _trainer(tmp_path / "headed", _overrides("bert", hf_folders["bert"], "model.num_labels=3",
                                                          "model.pooler=true"))
    new = headed.init_report["new"]
    assert new == ["classifier.bias", "classifier.weight", "pooler.dense.bias", "pooler.dense.weight"]
    assert "new heads initialized: " + ", ".join(new) in caplog.text
    ours, loaded = dict(headed.model.named_parameters()), dict(plain.model.named_parameters())
    assert ours["classifier.weight"].shape == (3, 32) and ours["classifier.weight"].std() > 0
    for name, tensor in loaded.items():
        assert torch.equal(ours[name], tensor), name
    with pytest.raises(UserError, match="missing from the source: .*layers"):  # not a head: refused
        _trainer(tmp_path / "deeper", _overrides("bert", hf_folders["bert"], "model.n_layers=3"))


def _loaded_on_ranks(rank, world_size, tmp_path, folder, layout):
    trainer = _trainer(tmp_path / "ranks", _overrides("bert", folder, *layout))
    return full_params(trainer), trainer.init_report["bytes_read"]


@pytest.mark.parametrize("layout", [["parallel.dp_shard=2", "parallel.zero=3"], ["parallel.tp=2", "parallel.dp_shard=1"]],
                         ids=["dp2_zero3", "tp2"])
def test_dp2_and_tp2_load_what_one_process_loads_reading_a_share_each(hf_folders, tmp_path, layout):
    single = _trainer(tmp_path / "single", _overrides("bert", hf_folders["bert"]))
    expected, total = full_params(single), single.init_report["bytes_read"]
    results = run_on_ranks(_loaded_on_ranks, 2, tmp_path, hf_folders["bert"], layout, timeout=240)
    for params, bytes_read in results:
        assert set(params) == set(expected)
        for name, tensor in expected.items():
            assert torch.equal(params[name], tensor), name
        # each rank reads its shard: about half (tp replicates the norms and biases of the row-parallel layers)
        assert bytes_read <= 0.6 * total, (bytes_read, total)
    print(f"init_from bytes read per rank ({layout}): {[r[1] for r in results]} of {total} in one process")
