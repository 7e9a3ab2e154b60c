"""Hugging Face adapters against transformers itself: tiny randomly initialized HF models of several shapes are
converted with from_hf_model and must give the same logits (fp32, 1e-5) with padding; HF -> ours -> HF state
dicts round-trip exactly; our presets exported with to_hf_model give our logits in transformers; parameter
counts of the table presets equal those of the HF models built from to_hf_config."""

import pytest
import torch
import transformers

from scaletrain.errors import UserError
from scaletrain.models.hf import (UnsupportedHFModel, from_hf_model, hf_class_for, to_hf_config, to_hf_model,
                                  to_hf_state_dict, untie_t5_head)
from scaletrain.models.registry import build_model, count_parameters, load_model_config
from scaletrain.models.table import TABLE_MODELS

VOCAB = 96
TOL = 1e-5


@torch.no_grad()
def randomize_(hf_model, seed=0):
    """HF init leaves norms at 1/0 and biases at 0, where a swapped mapping would go unnoticed: draw every
    parameter (and BART's final_logits_bias) from its own random values."""
    generator = torch.Generator().manual_seed(seed)
    logits_bias = [(name, b) for name, b in hf_model.named_buffers() if name == "final_logits_bias"]
    for name, tensor in list(hf_model.named_parameters()) + logits_bias:
        noise = torch.randn(tensor.shape, generator=generator)
        is_norm_weight = tensor.dim() == 1 and name.endswith("weight")
        tensor.copy_(1.0 + 0.2 * noise if is_norm_weight else 0.15 * noise)
    return hf_model.eval()


def batch(length, pad_id, seed, low=4):
    """(2, length) ids with the second row right-padded by 3 pad tokens, and its 0/1 mask."""
    ids = torch.randint(low, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, -3:] = 0
    ids[1, -3:] = pad_id
    return ids, mask


def assert_close(expected, actual):
    """Every position, padded ones included: with the masks applied, both sides compute the same thing there."""
    assert expected.shape == actual.shape
    assert (expected - actual).abs().max() <= TOL


def assert_round_trip(hf_model, ours):
    expected, exported = hf_model.state_dict(), to_hf_state_dict(ours)
    assert set(exported) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(exported[key], tensor), key


# ------------------------------------------------------------------------------------------ GPT-2

GPT2_SHAPES = {
    "tied_gelu_new": dict(n_embd=32, n_layer=2, n_head=4),
    "untied_wide_mlp_exact_gelu": dict(n_embd=48, n_layer=3, n_head=3, n_inner=80, activation_function="gelu",
                                       tie_word_embeddings=False, layer_norm_epsilon=1e-6),
    "unscaled_attention_relu": dict(n_embd=32, n_layer=1, n_head=2, scale_attn_weights=False,
                                    activation_function="relu"),
}


@pytest.mark.parametrize("shape", GPT2_SHAPES)
def test_gpt2_logits_and_round_trip(shape):
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=40, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, **GPT2_SHAPES[shape])
    hf = randomize_(transformers.GPT2LMHeadModel(config))
    ours = from_hf_model(hf)
    assert not ours.training and (ours.lm_head.weight is ours.tok_embeddings.weight) == config.tie_word_embeddings
    ids, mask = batch(12, 0, seed=1)
    with torch.no_grad():
        assert_close(hf(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask))
    assert_round_trip(hf, ours)


def test_dtype_and_training_mode_carry_over_and_bf16_round_trips_exactly():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=1, n_head=4,
                                     bos_token_id=0, eos_token_id=0)
    hf = randomize_(transformers.GPT2LMHeadModel(config)).to(torch.bfloat16).train()
    ours = from_hf_model(hf)
    assert ours.training and {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    assert_round_trip(hf, ours)


def test_gpt1_post_ln_logits_and_round_trip():
    config = transformers.OpenAIGPTConfig(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=4,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = randomize_(transformers.OpenAIGPTLMHeadModel(config))
    ours = from_hf_model(hf)
    assert ours.cfg.norm_position == "post" and ours.final_norm is None and ours.cfg.activation == "gelu_tanh"
    ids, mask = batch(12, 0, seed=9)
    with torch.no_grad():
        assert_close(hf(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask))
    assert_round_trip(hf, ours)


# ---------------------------------------------------------------------------------- BERT, RoBERTa

BERT_CONFIG = dict(vocab_size=VOCAB, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def test_bert_pretraining_mlm_nsp_and_pooler_match():
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=24, **BERT_CONFIG)
    hf = randomize_(transformers.BertForPreTraining(config))
    ours = from_hf_model(hf)
    ids, mask = batch(12, 0, seed=2)
    types = torch.zeros_like(ids)
    types[:, 5:] = 1
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, token_type_ids=types)
        mlm, nsp = ours(ids, token_type_ids=types, attention_mask=mask)
        pooled = ours.pooler(ours.hidden_states(ids, types, mask))
        expected_pooled = hf.bert(ids, attention_mask=mask, token_type_ids=types).pooler_output
    assert_close(expected.prediction_logits, mlm)
    assert_close(expected.seq_relationship_logits, nsp)
    assert_close(expected_pooled, pooled)
    assert_round_trip(hf, ours)


def test_bert_masked_lm_of_another_shape_matches():
    config = transformers.BertConfig(hidden_size=48, num_hidden_layers=3, num_attention_heads=3,
                                     intermediate_size=96, type_vocab_size=3, hidden_act="gelu_new",
                                     layer_norm_eps=1e-7, max_position_embeddings=16, **BERT_CONFIG)
    hf = randomize_(transformers.BertForMaskedLM(config))
    ours = from_hf_model(hf)
    assert ours.pooler is None and ours.nsp_head is None
    ids, mask = batch(16, 0, seed=3)
    types = torch.randint(0, 3, ids.shape, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask, token_type_ids=types).logits
        assert_close(expected, ours(ids, token_type_ids=types, attention_mask=mask)[0])
    assert_round_trip(hf, ours)


@pytest.mark.parametrize("pad_id", [1, 3])
def test_roberta_positions_count_from_the_padding_index(pad_id):
    config = transformers.RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=64, type_vocab_size=1, pad_token_id=pad_id,
                                        max_position_embeddings=14 + pad_id + 1, layer_norm_eps=1e-5,
                                        **BERT_CONFIG)
    hf = randomize_(transformers.RobertaForMaskedLM(config))
    ours = from_hf_model(hf)
    assert ours.cfg.position_offset == pad_id + 1 and ours.cfg.max_seq_len == 14
    ids, mask = batch(14, pad_id, seed=5)
    with torch.no_grad():
        assert_close(hf(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask)[0])
    assert_round_trip(hf, ours)


# --------------------------------------------------------------------------------------- T5, BART

def encdec_logits(hf, ours, pad_id):
    ids, mask = batch(11, pad_id, seed=6)
    dec, dec_mask = batch(8, pad_id, seed=7)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec,
                      decoder_attention_mask=dec_mask).logits
        actual = ours(ids, dec, attention_mask=mask, decoder_attention_mask=dec_mask)
    return expected, actual


T5_SHAPES = {
    "v1_0_relu_tied": dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj="relu"),
    # inner width 4 x 16 = 64 != d_model, deeper decoder, untied head without output rescaling
    "v1_1_gated_gelu_untied": dict(d_model=32, d_kv=16, d_ff=48, num_layers=2, num_decoder_layers=3, num_heads=4,
                                   feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}


@pytest.mark.parametrize("shape", T5_SHAPES)
def test_t5_decoder_logits_and_round_trip(shape):
    kwargs = T5_SHAPES[shape]
    config = transformers.T5Config(vocab_size=VOCAB, relative_attention_num_buckets=8,
                                   relative_attention_max_distance=16, dropout_rate=0.0, **kwargs)
    hf = transformers.T5ForConditionalGeneration(config)
    if kwargs.get("tie_word_embeddings") is False:
        untie_t5_head(hf)  # what loading a v1.1 checkpoint does in transformers 5
    hf = randomize_(hf)
    ours = from_hf_model(hf)
    assert ours.cfg.scale_decoder_output == (shape == "v1_0_relu_tied")
    assert ours.cfg.tie_embeddings == (shape == "v1_0_relu_tied")
    assert_close(*encdec_logits(hf, ours, pad_id=0))
    assert_round_trip(hf, ours)


@pytest.mark.parametrize("scale_embedding", [False, True])
def test_bart_decoder_logits_with_final_logits_bias_and_round_trip(scale_embedding):
    config = transformers.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=3,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                                     decoder_ffn_dim=48, max_position_embeddings=20, dropout=0.0,
                                     attention_dropout=0.0, activation_dropout=0.0, scale_embedding=scale_embedding)
    hf = randomize_(transformers.BartForConditionalGeneration(config))
    assert hf.final_logits_bias.abs().sum() > 0
    ours = from_hf_model(hf)
    assert_close(*encdec_logits(hf, ours, pad_id=1))
    assert_round_trip(hf, ours)


# ------------------------------------------------------------------------------------------ export

# preset -> overrides; "gpt1" and "roberta" are gpt_tiny and bert_tiny reshaped
EXPORTS = {"gpt_tiny": {}, "bert_tiny": {}, "t5_tiny": {}, "t5_v1_1_tiny": {}, "bart_tiny": {},
           "gpt1": dict(norm_position="post", final_norm=False, activation="gelu_tanh"),
           "roberta": dict(position_offset=2, positions_from_padding=True, type_vocab_size=1, pad_token_id=1,
                           norm_eps=1e-5, nsp_head=False, pooler=False)}


@pytest.mark.parametrize("name", EXPORTS)
def test_our_presets_exported_to_transformers_give_our_logits(name):
    cfg = load_model_config({"roberta": "bert_tiny", "gpt1": "gpt_tiny"}.get(name, name), EXPORTS[name])
    ours = build_model(cfg, device="cpu").eval()
    with torch.no_grad():  # our init leaves norms at 1/0 too
        for param in ours.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())))
        if not cfg.tie_embeddings:  # T5 v1.1's head is drawn with std 1: keep logits O(1) for the fp32 bound
            ours.lm_head.weight.mul_(0.2)
    hf = to_hf_model(ours)
    assert type(hf).__name__ == hf_class_for(cfg)
    ids, mask = batch(12, cfg.pad_token_id, seed=8)
    with torch.no_grad():
        if cfg.family == "gpt":
            expected, actual = ours(ids, attention_mask=mask), hf(ids, attention_mask=mask).logits
        elif cfg.family == "bert":
            output = hf(ids, attention_mask=mask)
            actual = output.prediction_logits if cfg.nsp_head else output.logits
            expected = ours(ids, attention_mask=mask)[0]
        else:
            actual, expected = encdec_logits(hf, ours, cfg.pad_token_id)
    assert_close(expected, actual)
    back = from_hf_model(hf)  # and the weights come back unchanged
    for key, tensor in ours.state_dict().items():
        assert torch.equal(back.state_dict()[key], tensor), key


def test_bert_without_nsp_exports_as_masked_lm_without_its_pooler():
    ours = build_model(load_model_config("bert_tiny", dict(nsp_head=False)), device="cpu")
    state = to_hf_state_dict(ours)
    assert hf_class_for(ours.cfg) == "BertForMaskedLM" and not any("pooler" in key for key in state)


# ------------------------------------------------------------------------------------ param counts

def hf_reference_count(cfg):
    """Parameters of the HF model built (on meta) from the exported config, tied tensors once."""
    with torch.device("meta"):
        hf = getattr(transformers, hf_class_for(cfg))(to_hf_config(cfg))
    if not cfg.tie_embeddings:
        untie_t5_head(hf)
    return sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("name", [n for n in TABLE_MODELS if not n.startswith("transformer_")])
def test_table_parameter_counts_equal_the_hugging_face_models(name):
    cfg = load_model_config(name)
    ours = build_model(cfg, device="meta")
    # Hugging Face's MLM classes hold no pooler; its BertForPreTraining holds one and the NSP head
    expected = count_parameters(ours, include_pooler=cfg.nsp_head or cfg.family != "bert")
    assert hf_reference_count(cfg) == expected


# ------------------------------------------------------------------------------------------ errors

def test_unsupported_class_names_itself_and_the_supported_ones():
    hf = transformers.GPT2Model(transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2,
                                                        bos_token_id=0, eos_token_id=0))
    with pytest.raises(UnsupportedHFModel) as error:
        from_hf_model(hf)
    message = str(error.value)
    assert "GPT2Model is not supported" in message and "T5ForConditionalGeneration" in message
    assert "\n" not in message and isinstance(error.value, UserError)


@pytest.mark.parametrize("build, expected", [
    (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0,
        scale_attn_by_inverse_layer_idx=True)), "scale_attn_by_inverse_layer_idx=True"),
    (lambda: transformers.BartForConditionalGeneration(transformers.BartConfig(
        vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=4, encoder_ffn_dim=32, decoder_ffn_dim=32)), "encoder_attention_heads=2"),
    (lambda: transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
        feed_forward_proj="gated-silu")), "feed_forward_proj='gated-silu'"),
    (lambda: transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        tie_word_embeddings=False)), "untied"),
])
def test_unsupported_configs_raise_one_line_user_errors(build, expected):
    with pytest.raises(UnsupportedHFModel, match=expected) as error:
        from_hf_model(build())
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name, overrides, expected", [
    ("transformer_tiny", {}, "position='sinusoidal' cannot be exported as BartForConditionalGeneration"),
    ("gpt_tiny", dict(norm_position="post"), "final_norm=True cannot be exported as OpenAIGPTLMHeadModel"),
    ("gpt_tiny", dict(norm_position="post", final_norm=False, activation="gelu"),
     "activation='gelu' has no OpenAIGPTLMHeadModel equivalent"),
    ("gpt_tiny", dict(activation="gated_gelu"), "activation='gated_gelu' has no GPT2LMHeadModel equivalent"),
    ("bert_tiny", dict(tie_embeddings=False), "tie_embeddings=False"),
])
def test_configs_without_a_hugging_face_equivalent_refuse_to_export(name, overrides, expected):
    cfg = load_model_config(name, overrides)
    with pytest.raises(UnsupportedHFModel, match=expected):
        to_hf_config(cfg)
    with pytest.raises(UnsupportedHFModel, match=expected):
        to_hf_state_dict(build_model(cfg, device="cpu"))


def test_importing_the_models_does_not_import_transformers():
    import subprocess
    import sys
    code = "import sys, scaletrain.models.hf, scaletrain.models.registry; print('transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
