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
