"""FlexAttention (model.attention=flex) against SDPA with the dense float mask, on the CPU forward.

torch 2.13 has no FlexAttention backward on the CPU, so the backward (and the compiled kernel) is checked by
the GPU tests (tests/gpu/test_flex_gpu.py, `pytest -m gpu`); here the unfused reference forward must give
SDPA's outputs for every mask the models build: causal, padding, T5's bias, cross-attention, a KV-cache
offset, whole models, and tensor parallel with the heads (and T5's bias) sharded."""

import dataclasses

import pytest
import torch

from scaletrain.configs.schema import TrainConfig, validate_cross_fields
from scaletrain.errors import ConfigError
from scaletrain.models.blocks import attention_backend, attention_bias, attention_core, mask_backend
from scaletrain.models.flex import FlexBias
from scaletrain.models.registry import build_model, load_model_config
from scaletrain.parallel import materialize

MASK_CASES = {  # name: (causal, padded, biased, q_len, k_len)
    "causal_padding": (True, True, False, 12, 12),
    "padding": (False, True, False, 12, 12),
    "t5_encoder": (False, True, True, 12, 12),
    "t5_decoder": (True, False, True, 12, 12),
    "cross_attention": (False, True, False, 7, 12),
    "kv_cache_offset": (True, True, False, 3, 12),
}


@pytest.mark.parametrize("case", list(MASK_CASES))
def test_flex_forward_equals_sdpa_dense_mask(case):
    causal, padded, biased, q_len, k_len = MASK_CASES[case]
    g = torch.Generator().manual_seed(0)
    B, H, Dh = 3, 4, 8
    q = torch.randn(B, H, q_len, Dh, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, H, k_len, Dh, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.ones(B, k_len, dtype=torch.long)
    mask[1, k_len - 4:] = 0  # right padding: every query row still sees a key
    mask = mask if padded else None
    position_bias = torch.randn(1, H, q_len, k_len, generator=g, dtype=torch.float64) if biased else None
    args = (mask, causal, q_len, k_len, torch.float64, q.device, position_bias)
    flex_bias = attention_bias(*args, backend="flex")
    assert isinstance(flex_bias, FlexBias)
    dense = attention_bias(*args, backend="sdpa")
    for scale in (None, 1.0):  # T5 does not scale its scores
        expected = attention_core(q, k, v, dense, False, 0.0, scale, 0)
        got = attention_core(q, k, v, flex_bias, False, 0.0, scale, 0)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def _model(name: str, attention: str, seed: int = 3):
    cfg = dataclasses.replace(load_model_config(name), attention=attention, dropout=0.0, attn_dropout=0.0)
    model = build_model(cfg, "meta").to(torch.float64)
    materialize(model, "cpu", seed)
    return model.eval()


def _batch(family: str, vocab: int, B: int = 2, T: int = 10) -> dict:
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, T - 3:] = 0
    if family == "gpt":
        return {"input_ids": ids, "attention_mask": mask}
    if family == "bert":
        return {"input_ids": ids, "attention_mask": mask}
    return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": torch.randint(3, vocab, (B, 6), generator=g),
            "decoder_attention_mask": torch.tensor([[1] * 6, [1] * 4 + [0] * 2])}


def _outputs(model, batch):
    out = model(**batch)
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("name", ["gpt_tiny", "bert_tiny", "t5_tiny", "t5_v1_1_tiny", "bart_tiny"])
def test_whole_models_give_the_same_logits_under_flex(name):
    sdpa, flex = _model(name, "sdpa"), _model(name, "flex")
    batch = _batch(sdpa.cfg.family, sdpa.cfg.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(_outputs(flex, batch), _outputs(sdpa, batch), rtol=1e-9, atol=1e-9)


TP_MODELS = ["gpt_tiny", "bert_tiny", "t5_tiny"]


def _tp_logits(rank, world_size):
    from scaletrain.parallel.equivalence import build_parallel_model, layout_config

    logits = {}
    for name in TP_MODELS:
        cfg = dataclasses.replace(load_model_config(name), attention="flex", dropout=0.0, attn_dropout=0.0)
        model, _, _ = build_parallel_model(cfg, layout_config("tp2"), world_size, dtype=torch.float64, seed=3)
        with torch.no_grad():
            out = _outputs(model.eval(), _batch(cfg.family, cfg.vocab_size))
        logits[name] = out.full_tensor() if hasattr(out, "full_tensor") else out
    return logits


def test_tensor_parallel_heads_and_t5_bias_sharded_under_flex():
    from scaletrain.parallel import padded_model_config
    from scaletrain.parallel.multiprocess import run_on_ranks

    logits = run_on_ranks(_tp_logits, 2)[0]
    for name in TP_MODELS:  # against one process with SDPA, at the same padded vocab
        cfg = padded_model_config(dataclasses.replace(load_model_config(name), attention="sdpa", dropout=0.0,
                                                      attn_dropout=0.0), 2)
        reference = build_model(cfg, "meta").to(torch.float64)
        materialize(reference, "cpu", 3)
        with torch.no_grad():
            expected = _outputs(reference.eval(), _batch(cfg.family, cfg.vocab_size))
        torch.testing.assert_close(logits[name], expected, rtol=1e-9, atol=1e-9, msg=name)


def test_backend_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert attention_backend("auto", cpu) == "sdpa"  # no FlexAttention backward on the CPU
    assert attention_backend("auto", cuda) == "flex"
    assert attention_backend("sdpa", cuda) == "sdpa"
    cfg = dataclasses.replace(load_model_config("t5_tiny"), attention="flex", attn_dropout=0.1)
    assert mask_backend(cfg, cuda, training=True) == "sdpa"  # FlexAttention cannot drop out probabilities
    assert mask_backend(cfg, cuda, training=False) == "flex"


def test_training_with_flex_on_the_cpu_is_refused_up_front_and_at_run_time():
    cfg = TrainConfig(model=dataclasses.replace(load_model_config("gpt_tiny"), attention="flex"))
    with pytest.raises(ConfigError, match="model.attention=flex cannot train on the CPU"):
        validate_cross_fields(cfg, 1)
    model = _model("gpt_tiny", "flex").train()
    batch = _batch("gpt", model.cfg.vocab_size)
    with pytest.raises(ConfigError, match="no backward on the CPU"):
        model(**batch)
