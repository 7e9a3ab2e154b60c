"""Generation against Hugging Face's generate on tiny random GPT-2, T5 and BART models imported with
from_hf_model: greedy and beam search token for token (batched, padded prompts, stop at eos); the KV cache
against recomputing the whole prefix; the sampling filters against transformers' own logits warpers."""

import pytest
import torch
import transformers

from scaletrain.errors import InputError
from scaletrain.inference.generate import GenerationConfig, filter_logits, generate
from scaletrain.models.hf import from_hf_model

from random_weights import one_thread, randomized  # noqa: F401 (autouse fixture)

VOCAB = 64
PROMPTS = [[5, 9, 11, 3, 7, 20], [8, 30, 2], [12, 40, 41, 13]]  # unequal lengths: padding in every batch
NO_EXTRAS = dict(forced_bos_token_id=None, forced_eos_token_id=None, no_repeat_ngram_size=0, repetition_penalty=1.0,
                 min_length=0, length_penalty=1.0, early_stopping=False)


def gpt2():
    return randomized(transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=48, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0)))


def t5():
    return randomized(transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
        feed_forward_proj="relu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)))


def bart():
    return randomized(transformers.BartForConditionalGeneration(transformers.BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=48,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None)))


MODELS = {"gpt2": gpt2, "t5": t5, "bart": bart}


def hf_generate(hf, prompts, eos, new_tokens, num_beams=1):
    """Hugging Face's tokens, as our generate returns them: new tokens only, cut after the first eos."""
    pad = hf.config.pad_token_id
    encoder_decoder = hf.config.is_encoder_decoder
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):  # decoders pad on the left, encoders on the right
        columns = slice(0, len(p)) if encoder_decoder else slice(width - len(p), width)
        ids[row, columns], mask[row, columns] = torch.tensor(p), 1
    out = hf.generate(ids, attention_mask=mask, do_sample=False, num_beams=num_beams, max_new_tokens=new_tokens,
                      eos_token_id=eos, pad_token_id=pad, **NO_EXTRAS)
    out = out[:, 1:] if encoder_decoder else out[:, width:]  # drop the decoder start / the prompt
    rows = []
    for row in out.tolist():
        if eos in row:
            row = row[: row.index(eos) + 1]
        elif len(row) < new_tokens:  # beam search pads a hypothesis shorter than the longest
            row = [t for t in row if t != pad]
        rows.append(row)
    return rows


def config_for(hf, **overrides):
    c = hf.config
    start = c.decoder_start_token_id if c.is_encoder_decoder else None
    return GenerationConfig(pad_token_id=c.pad_token_id, decoder_start_token_id=start, **overrides)


def stopping_token(hf, ours, new_tokens):
    """A token one row greedily produces and another never does, so that with it as eos one row stops early
    while another runs to max_new_tokens (random tiny models repeat a few tokens)."""
    rows = generate(ours, PROMPTS, config_for(hf, max_new_tokens=new_tokens))
    return next(t for row in rows for t in row if any(t not in other for other in rows))


@pytest.mark.parametrize("family", MODELS)
def test_greedy_equals_hugging_face_token_for_token(family):
    hf = MODELS[family]()
    ours = from_hf_model(hf)
    new_tokens = 12
    eos = stopping_token(hf, ours, new_tokens)
    ours_tokens = generate(ours, PROMPTS, config_for(hf, max_new_tokens=new_tokens, eos_token_id=eos))
    assert ours_tokens == hf_generate(hf, PROMPTS, eos, new_tokens)
    assert any(row[-1] == eos and len(row) < new_tokens for row in ours_tokens)  # a row stopped at eos
    assert any(len(row) == new_tokens for row in ours_tokens)  # and the batch went on for the others


@pytest.mark.parametrize("family", MODELS)
def test_beam_search_equals_hugging_face(family):
    hf = MODELS[family]()
    ours = from_hf_model(hf)
    new_tokens = 10
    eos = stopping_token(hf, ours, new_tokens)
    ours_tokens = generate(ours, PROMPTS, config_for(hf, max_new_tokens=new_tokens, eos_token_id=eos, num_beams=3))
    assert ours_tokens == hf_generate(hf, PROMPTS, eos, new_tokens, num_beams=3)


@pytest.mark.parametrize("family", MODELS)
@pytest.mark.parametrize("beams", [1, 3])
def test_the_cache_gives_the_tokens_of_recomputing_the_prefix(family, beams):
    hf = MODELS[family]()
    ours = from_hf_model(hf)
    cached = generate(ours, PROMPTS, config_for(hf, max_new_tokens=14, num_beams=beams))
    recomputed = generate(ours, PROMPTS, config_for(hf, max_new_tokens=14, num_beams=beams, use_cache=False))
    assert cached == recomputed


def test_cross_attention_keys_and_values_are_computed_once():
    ours = from_hf_model(t5())
    calls = []
    cross_k = ours.decoder.layers["0"].cross_attn.k_proj
    handle = cross_k.register_forward_hook(lambda module, args, output: calls.append(args[0].shape))
    generate(ours, PROMPTS, GenerationConfig(max_new_tokens=6, decoder_start_token_id=0))
    handle.remove()
    assert calls == [torch.Size([3, 6, 32])]  # the encoder output of the batch, once


def test_sampling_filters_equal_the_transformers_warpers():
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1)) * 3
    for temperature, top_k, top_p in [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.8), (1.3, 10, 0.6), (1.0, 0, 0.01)]:
        expected = TemperatureLogitsWarper(temperature)(None, logits.clone())
        if top_k:
            expected = TopKLogitsWarper(top_k)(None, expected)
        if top_p < 1.0:
            expected = TopPLogitsWarper(top_p)(None, expected)
        actual = filter_logits(logits, temperature, top_k, top_p)
        assert torch.equal(torch.isinf(actual), torch.isinf(expected))
        kept = ~torch.isinf(actual)
        assert torch.allclose(actual[kept], expected[kept])


def test_sampling_is_seeded_and_top_k_one_is_greedy():
    hf = gpt2()
    ours = from_hf_model(hf)
    sampled = [generate(ours, PROMPTS, config_for(hf, max_new_tokens=10, do_sample=True, seed=s)) for s in (3, 3, 4)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]
    top_one = generate(ours, PROMPTS, config_for(hf, max_new_tokens=10, do_sample=True, top_k=1, temperature=0.5))
    assert top_one == generate(ours, PROMPTS, config_for(hf, max_new_tokens=10))


def test_a_prompt_longer_than_the_context_is_an_input_error():
    hf = gpt2()  # 48 positions
    ours = from_hf_model(hf)
    with pytest.raises(InputError, match="longer than the model's context of 48"):
        generate(ours, [list(range(1, 50))], config_for(hf))
    with pytest.raises(InputError, match="--max-new-tokens 8 or less"):
        generate(ours, [list(range(1, 41))], config_for(hf, max_new_tokens=9))
