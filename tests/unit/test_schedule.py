import math

import pytest
import torch

from scaletrain.configs.schema import OptimConfig
from scaletrain.train.schedule import LRSchedule, lr_at


def _cfg(schedule, warmup=10, lr=1.0, min_ratio=0.1):
    return OptimConfig(schedule=schedule, warmup_steps=warmup, lr=lr, min_lr_ratio=min_ratio)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant", "inverse_sqrt"])
def test_warmup_is_linear_and_reaches_the_peak(schedule):
    cfg = _cfg(schedule)
    assert [lr_at(s, cfg, 110) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert lr_at(10, cfg, 110) == pytest.approx(1.0)


def test_cosine_midpoint_and_floor():
    cfg = _cfg("cosine")
    assert lr_at(60, cfg, 110) == pytest.approx(0.55)  # halfway: (peak + floor) / 2
    assert lr_at(35, cfg, 110) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert lr_at(110, cfg, 110) == pytest.approx(0.1) and lr_at(500, cfg, 110) == pytest.approx(0.1)


def test_linear_and_constant():
    assert lr_at(60, _cfg("linear"), 110) == pytest.approx(0.55)
    assert lr_at(110, _cfg("linear"), 110) == pytest.approx(0.1)
    assert lr_at(99, _cfg("constant"), 110) == 1.0


def test_inverse_sqrt_matches_the_transformer_formula():
    d_model, warmup = 512, 4000
    cfg = _cfg("inverse_sqrt", warmup=warmup, lr=d_model**-0.5 * warmup**-0.5)
    for step in (4000, 9000, 16000, 100000):
        vaswani = d_model**-0.5 * min(step**-0.5, step * warmup**-1.5)
        assert lr_at(step, cfg, 0) == pytest.approx(vaswani)


def test_schedule_sets_group_lrs_and_resumes():
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))]
    optimizer = torch.optim.SGD([{"params": params[:1]}, {"params": params[1:], "lr_scale": 0.5}], lr=9.0)
    schedule = LRSchedule(optimizer, _cfg("cosine"), 110)
    assert [g["lr"] for g in optimizer.param_groups] == [0.1, 0.05]
    for _ in range(60):
        schedule.step()
    state = schedule.state_dict()
    resumed = LRSchedule(torch.optim.SGD(params, lr=9.0), _cfg("cosine"), 110)
    resumed.load_state_dict(state)
    assert resumed.lr == schedule.lr == pytest.approx(0.55)
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(0.55)
