"""Layouts composed with the rest of the system against a single process: activation checkpointing (full
and selective) under 2-D dp x tp, HSDP x tp on 8 ranks, FSDP2 CPU offload, and bf16 mixed precision."""

import pytest
import torch

from scaletrain.models.registry import load_model_config
from scaletrain.parallel.equivalence import RunSpec, run_layout
from scaletrain.parallel.multiprocess import run_on_ranks

from test_zero_equivalence import assert_equivalent, reference


def _run_cases(rank, world_size, model_cfg, cases):
    results = [run_layout(model_cfg, layout, world_size, RunSpec(model_cfg, **kwargs)) for layout, kwargs in cases]
    return results if rank == 0 else None


def test_activation_checkpointing_and_offload_keep_results_exact():
    cfg = load_model_config("gpt_tiny")
    cases = [("dp2_tp2", dict(activation_checkpointing="full")),
             ("dp2_tp2_sp_zero1", dict(activation_checkpointing="selective")),
             ("dp4_zero3", dict(extra={"offload": "cpu"}))]
    for (layout, kwargs), result in zip(cases, run_on_ranks(_run_cases, 4, cfg, cases)[0]):
        assert_equivalent(result, reference(cfg.name), f"{layout} {kwargs}")


def test_hsdp_x_tp_on_8_ranks():
    cfg = load_model_config("t5_tiny")
    result = run_on_ranks(_run_cases, 8, cfg, [("hsdp2x2_tp2", {})])[0][0]
    assert_equivalent(result, reference(cfg.name), "hsdp2x2_tp2")


def test_bf16_mixed_precision_keeps_fp32_master_weights_close_to_fp32():
    cfg = load_model_config("gpt_tiny")
    cases = [("dp2_zero3", dict(precision="bf16", dtype=torch.float32)),
             ("dp2_zero3", dict(precision="bf16", dtype=torch.float32, extra={"reduce_dtype": "param"}))]
    expected = reference(cfg.name)
    for result in run_on_ranks(_run_cases, 2, cfg, cases)[0]:
        assert all(p.dtype == torch.float32 for p in result["params"].values())  # sharded masters stay fp32
        assert result["losses"] == pytest.approx(expected["losses"], rel=1e-3)
        assert result["losses"] != pytest.approx(expected["losses"], rel=1e-7)  # bf16 compute really happened
