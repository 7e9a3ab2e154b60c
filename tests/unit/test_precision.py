import pytest
import torch

from scaletrain.train.precision import LossScaler, autocast, grads_are_finite


def test_scale_trajectory_matches_torch_grad_scaler():
    # The reference: torch.amp.GradScaler on CPU, fed the same overflow pattern.
    pattern = [False, True, False, False, False, True, True, False, False, False, False]
    reference = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
    ours = LossScaler(enabled=True, init_scale=1024.0, growth_interval=3)
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([param], lr=0.1)
    for overflow in pattern:
        reference.scale(torch.ones(()))
        param.grad = torch.full((3,), float("inf") if overflow else 1.0)
        reference.unscale_(optimizer)
        reference.step(optimizer)
        reference.update()
        ours.update(found_overflow=overflow)
        assert ours.scale == reference.get_scale()


def test_unscale_divides_and_detects_overflow():
    scaler = LossScaler(enabled=True, init_scale=8.0)
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))]
    params[0].grad, params[1].grad = torch.tensor([8.0, 16.0]), torch.tensor([4.0, 0.0, -8.0])
    assert scaler.scale_loss(torch.tensor(2.0)).item() == 16.0
    scaler.unscale_(params)
    assert params[0].grad.tolist() == [1.0, 2.0] and params[1].grad.tolist() == [0.5, 0.0, -1.0]
    assert grads_are_finite(params)
    params[1].grad[1] = float("nan")
    assert not grads_are_finite(params)


def test_disabled_scaler_is_the_identity_and_state_round_trips():
    off = LossScaler(enabled=False)
    off.update(found_overflow=True)
    assert off.scale == 1.0 and off.scale_loss(torch.tensor(3.0)).item() == 3.0
    on = LossScaler(enabled=True, init_scale=64.0, growth_interval=2)
    on.update(False)
    on.update(True)
    on.update(False)
    restored = LossScaler(enabled=True)
    restored.load_state_dict(on.state_dict())
    assert (restored.scale, restored.clean_steps) == (32.0, 1)


@pytest.mark.parametrize("precision,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                             ("fp16", torch.float16)])
def test_autocast_runs_matmuls_in_the_low_precision_and_keeps_fp32_params(precision, dtype):
    layer = torch.nn.Linear(4, 4)
    with autocast(precision, "cpu"):
        out = layer(torch.randn(2, 4))
    assert out.dtype == dtype and layer.weight.dtype == torch.float32
