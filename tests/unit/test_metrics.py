import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from scaletrain.models.registry import build_model, load_model_config
from scaletrain.train.metrics import Throughput, batch_flops, forward_flops, peak_memory_bytes, training_flops


def _inputs(family, batch, seq_len, decoder_len):
    input_ids = torch.randint(1, 200, (batch, seq_len))
    if family == "encdec":
        return {"input_ids": input_ids, "decoder_input_ids": torch.randint(1, 200, (batch, decoder_len))}
    if family == "bert":
        return {"input_ids": input_ids, "token_type_ids": torch.zeros_like(input_ids)}
    return {"input_ids": input_ids}


def _scalar(outputs):
    if isinstance(outputs, tuple):  # BERT: MLM logits and NSP logits both reach the loss
        return sum(out.float().sum() for out in outputs if out is not None)
    return outputs.float().sum()


@pytest.mark.parametrize("name", ["gpt_tiny", "bert_tiny", "t5_tiny"])
def test_formula_matches_torch_flop_counter(name):
    # The math SDPA backend decomposes attention into counted bmm's (the fused CPU kernel is not counted).
    cfg = load_model_config(name)
    model = build_model(cfg, "cpu")
    batch = _inputs(cfg.family, 2, 16, 8)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as forward_counter:
        model(**batch)
    assert forward_flops(cfg, 2, 16, 8) == forward_counter.get_total_flops()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as train_counter:
        _scalar(model(**batch)).backward()
    assert batch_flops(cfg, batch) == train_counter.get_total_flops()


def test_bert_counts_the_mlm_head_on_the_labelled_positions_it_scores():
    cfg = load_model_config("bert_tiny")
    model = build_model(cfg, "cpu")
    batch = _inputs("bert", 2, 16, 0)
    batch["labels"] = torch.full((2, 16), -100)
    batch["labels"][0, [2, 5, 9]], batch["labels"][1, 4] = 7, 8
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as train_counter:
        _scalar(model(**batch)).backward()
    assert batch_flops(cfg, batch) == train_counter.get_total_flops()
    assert batch_flops(cfg, batch) < training_flops(cfg, 2, 16)  # 4 of 32 positions reach the head


def test_gpt_formula_matches_the_palm_count():
    # PaLM appendix B: 6 N + 12 L H Q T per token, N = non-embedding parameters + the output projection.
    cfg = load_model_config("gpt_tiny")
    T, d, L = 32, cfg.d_model, cfg.n_layers
    n_matmul_params = L * (4 * d * d + 2 * d * cfg.ffn_dim) + d * cfg.padded_vocab_size()
    palm = 6 * n_matmul_params * T + 12 * L * cfg.n_heads * cfg.head_dim * T * T
    assert training_flops(cfg, 1, T) == palm


def test_throughput_reports_rates_and_mfu():
    meter = Throughput(peak_tflops=4.0, world_size=2)
    meter.add(tokens=1000, flops=int(6e12), seconds=0.5)
    meter.add(tokens=1000, flops=int(2e12), seconds=0.5)
    report = meter.report()  # 8 TFLOP in 1 s over 2 devices: 4 TFLOP/s each, all of the peak
    assert report == {"tokens_per_s": 2000.0, "tflops": 4.0, "mfu": 1.0}
    assert meter.tokens == 0 and Throughput(peak_tflops=0.0).report()["mfu"] is None


def test_peak_memory_is_at_least_a_large_allocation():
    block = torch.ones(64, 1024, 1024)  # 256 MiB touched
    assert peak_memory_bytes(torch.device("cpu")) >= block.numel() * 4


def _xlnet_batch(cfg, batch, seq_len, num_predict, generator):
    perm_mask = (torch.rand(batch, seq_len, seq_len, generator=generator) < 0.3).float()
    mapping = torch.zeros(batch, num_predict, seq_len)
    mapping[:, torch.arange(num_predict), torch.arange(num_predict) * 2] = 1.0
    return {"input_ids": torch.randint(1, cfg.vocab_size, (batch, seq_len), generator=generator),
            "token_type_ids": (torch.arange(seq_len) >= seq_len // 2).long().expand(batch, seq_len),
            "perm_mask": perm_mask, "target_mapping": mapping}


@pytest.mark.parametrize("attn_type", ["bi", "uni"])
def test_xlnet_flops_count_both_streams_against_torch_flop_counter(attn_type):
    """Counted by torch: everything the model runs, less its last content stream (q projection, attention at
    T positions over T keys, out projection and MLP, written out here), which the output never reads and
    backward never visits. model.mem_len (kept memory) changes nothing: training passes no mems."""
    cfg = load_model_config("xlnet_tiny", {"attn_type": attn_type, "mem_len": 8})
    model = build_model(cfg, "cpu")
    B, T, M = 2, 12, 4
    batch = _xlnet_batch(cfg, B, T, M, torch.Generator().manual_seed(0))
    d, a, f = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.ffn_dim
    R = 2 * T if attn_type == "bi" else T + 1
    unread = B * T * (2 * d * a + (4 * T * a + 2 * R * a + 4 * a) + 2 * a * d + 2 * 2 * d * f)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as forward_counter:
        model(**batch)
    assert forward_flops(cfg, B, T, M) + unread == forward_counter.get_total_flops()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as train_counter:
        model(**batch).sum().backward()
    assert batch_flops(cfg, batch) + unread == train_counter.get_total_flops()
    assert forward_flops(cfg, B, T, M) == forward_flops(load_model_config("xlnet_tiny", {"attn_type": attn_type}),
                                                        B, T, M)


def test_xlnet_flops_with_memory_attend_over_memory_and_tokens():
    """With mems of P rows the keys and values cover P + T rows and the positions P + 2T distances; without a
    target_mapping there is only the content stream, scored on all T tokens. (Segment scores are counted:
    every XLNet batch of the trainer has token types.)"""
    cfg = load_model_config("xlnet_tiny")
    model = build_model(cfg, "cpu")
    B, T, P = 2, 10, 6
    ids = torch.randint(1, cfg.vocab_size, (B, T))
    mems = [torch.randn(B, P, cfg.d_model) for _ in range(cfg.n_layers)]
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(ids, token_type_ids=torch.zeros_like(ids), mems=mems)
    assert forward_flops(cfg, B, T, memory=P) == counter.get_total_flops()
    d, a, f, V, L = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.ffn_dim, cfg.padded_vocab_size(), cfg.n_layers
    K, R = P + T, P + 2 * T
    per_layer = 2 * 2 * K * d * a + T * (2 * d * a + 4 * K * a + 2 * R * a + 4 * a + 2 * a * d + 2 * 2 * d * f)
    assert forward_flops(cfg, B, T, memory=P) == B * (L * per_layer + T * 2 * d * V) + L * 2 * R * d * a
