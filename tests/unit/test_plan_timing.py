"""The ZeRO-2/3 time model against hand-counted FSDP collectives: one gradient reduce-scatter per step (pp or
not), plus the 16-bit parameter all-gathers that recur per micro-batch."""

import pytest

from scaletrain.configs.schema import ClusterConfig, ModelConfig
from scaletrain.plan.memory import Layout
from scaletrain.plan.timing import step_time

CFG = ModelConfig(name="m", vocab_size=512, d_model=64, n_layers=4, n_heads=4, max_seq_len=128)
CLUSTER = ClusterConfig(inter_node_gbps=1.0)  # gpus_per_node=0: dp crosses nodes, 1 GB/s
PSI = 1e9  # the first stage's parameters, passed in so the volumes are round numbers


def dp_comm(zero: int, pp: int) -> float:
    layout = Layout(pp=pp, dp=8, zero=zero, micro_batch=1)
    # dp 8 x 4 micro-batches; no overlap, so dp_comm_s is the whole volume over the link
    return step_time(CFG, layout, CLUSTER, global_batch=32, seq=128, precision="fp32", dp_overlap=0.0,
                     first_stage_params=PSI).dp_comm_s


@pytest.mark.parametrize("zero, pp, extra_gathers", [
    (2, 1, 3),  # FSDP reshards after each backward: each of the 4 forwards gathers; the ring counts one
    (2, 2, 0),  # the schedules keep the stage gathered after backward: one gather, one reduce-scatter a step
    (3, 1, 7),  # a forward and a backward gather per micro-batch: 8
    (3, 2, 4),  # the first forward and each of the 4 backwards: 5
])
def test_fsdp_collectives_per_step(zero, pp, extra_gathers):
    # all-reduce of fp32 gradients: 2 (d-1)/d x 4 B x 1e9 over 1 GB/s = 7 s (the reduce-scatter + one gather);
    # one fp32 all-gather of the parameters: (d-1)/d x 4 B x 1e9 / 1 GB/s = 3.5 s
    assert dp_comm(0, pp) == pytest.approx(7.0)
    assert dp_comm(zero, pp) == pytest.approx(7.0 + 3.5 * extra_gathers)


def test_xlnet_step_flops_are_the_two_streams_mfu_counts():
    """The planner's XLNet forward is train/metrics.py's (content over T rows, query over M, relative
    positions), not a single-stream encoder's: at seq 512, M = 90 query rows add about a quarter."""
    import dataclasses

    from scaletrain.models.registry import load_model_config
    from scaletrain.plan.timing import model_forward_flops
    from scaletrain.train.metrics import forward_flops

    cfg = load_model_config("xlnet_large")
    assert model_forward_flops(cfg, 8 * 512, 512) == forward_flops(cfg, 8, 512, 90)
    single_stream = dataclasses.replace(cfg, family="bert", position="learned", type_vocab_size=0)
    assert 1.2 < model_forward_flops(cfg, 8 * 512, 512) / model_forward_flops(single_stream, 8 * 512, 512) < 1.3
