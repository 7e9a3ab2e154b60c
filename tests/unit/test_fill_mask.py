"""Fill-mask against transformers' fill-mask pipeline on tiny random BERT and RoBERTa models saved as Hugging
Face folders with a tokenizer of ours: the same top-k tokens with probabilities within 1e-4, every mask of
the text filled independently; the CLI prints the table, accepts [MASK] and <mask>, and refuses bad input
(no mask, a GPT, a folder without a checkpoint) with one line and exit code 2."""

import pytest
import transformers

from scaletrain.checkpoint.hf_io import hf_tokenizer
from scaletrain.cli import main
from scaletrain.data.tokenizer import train_tokenizer
from scaletrain.inference.cli import input_encoder
from scaletrain.inference.fill_mask import fill_mask
from scaletrain.inference.load import load_model
from scaletrain.models.hf import from_hf_model

from random_weights import one_thread, randomized  # noqa: F401 (autouse fixture)

TEXTS = ["the university of minnesota is located in minneapolis, minnesota.",
         "paris is the capital of france and the largest city of the country.",
         "the river flows through the city and the university stands on both banks.",
         "students of the university study languages, history and the sciences."] * 20


def save_masked_lm(folder, kind):
    """A random BertForMaskedLM (wordpiece, [MASK]) or RobertaForMaskedLM (byte BPE, <mask>) and our tokenizer
    trained on TEXTS, written as a Hugging Face folder."""
    tokenizer = train_tokenizer("wordpiece" if kind == "bert" else "bart_bpe", TEXTS, 512)
    shape = dict(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if kind == "bert":
        hf = transformers.BertForMaskedLM(transformers.BertConfig(max_position_embeddings=64, pad_token_id=0, **shape))
    else:
        hf = transformers.RobertaForMaskedLM(transformers.RobertaConfig(
            max_position_embeddings=66, pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1, **shape))
    hf = randomized(hf)
    hf.save_pretrained(folder)
    hf_tokenizer(tokenizer, from_hf_model(hf).cfg, 64).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("fill_mask")
    return {kind: save_masked_lm(root / kind, kind) for kind in ("bert", "roberta")}


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_top_k_equals_the_transformers_pipeline(folders, kind):
    mask = "[MASK]" if kind == "bert" else "<mask>"
    text = f"the university of {mask} is located in {mask}, minnesota."
    expected = transformers.pipeline("fill-mask", model=str(folders[kind]), device="cpu")(text, top_k=6)
    loaded = load_model(folders[kind])
    ours = fill_mask(loaded.model, input_encoder(loaded)(text), loaded.tokenizer.role_id("mask"), top_k=6)
    assert len(ours) == len(expected) == 2
    for our_block, their_block in zip(ours, expected):
        assert [token for token, _ in our_block] == [entry["token"] for entry in their_block]
        for (_, probability), entry in zip(our_block, their_block):
            assert abs(probability - entry["score"]) <= 1e-4
    assert ours[0] != ours[1]  # each mask has its own distribution


def test_cli_prints_the_table_for_either_mask_spelling(folders, capsys):
    for kind, spelling in [("bert", "<mask>"), ("roberta", "[MASK]")]:  # the other family's spelling
        assert main(["fill-mask", str(folders[kind]), f"paris is the {spelling} of france.", "--top-k", "3"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0] == f"paris is the {spelling} of france."
        assert lines[1].split() == ["rank", "token", "probability"] and len(lines) == 5
        probabilities = [float(line.split()[-1]) for line in lines[2:]]
        assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1


def test_bad_input_is_one_line_and_exit_code_2(folders, tmp_path, capsys):
    gpt = tmp_path / "gpt"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=512, n_positions=32, n_embd=32, n_layer=1,
                                                         n_head=2, bos_token_id=0, eos_token_id=0)).save_pretrained(gpt)
    train_tokenizer("byte_bpe", TEXTS, 512).save(gpt / "tokenizer.json")
    (tmp_path / "empty").mkdir()
    capsys.readouterr()  # the progress bars of saving
    cases = [(["fill-mask", str(folders["bert"]), "no mask here"], "no mask token"),
             (["fill-mask", str(gpt), "a [MASK] text"], "masked language model"),
             (["fill-mask", str(tmp_path / "empty"), "a [MASK] text"], "neither a run folder"),
             (["generate", str(folders["bert"]), "--prompt", "hello"], "use scaletrain fill-mask"),
             (["generate", str(tmp_path / "empty"), "--prompt", "hello"], "neither a run folder")]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
