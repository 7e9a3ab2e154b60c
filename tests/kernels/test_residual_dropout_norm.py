"""Fused residual-add + dropout + norm: the Triton kernel's Philox mask reproduced in torch, so forward and
backward are compared element by element; dropout statistics; p=0 / eval against the unfused composition."""

import math

import pytest
import torch

import scaletrain.kernels as kernels
from scaletrain.kernels import reference

# (atol, rtol) against fp32 math on the same rounded inputs and the same keep mask.
TOLERANCES = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (5e-2, 2e-2), torch.float16: (8e-3, 4e-3)}


def _inputs(shape, dtype, with_residual, with_bias, with_norm_bias, seed=0):
    generator = torch.Generator().manual_seed(seed)
    width = shape[-1]
    tensors = {
        "x": torch.randn(shape, generator=generator),
        "residual": torch.randn(shape, generator=generator) if with_residual else None,
        "bias": 0.5 * torch.randn(width, generator=generator) if with_bias else None,
        "weight": 1 + 0.2 * torch.randn(width, generator=generator),
        "norm_bias": 0.2 * torch.randn(width, generator=generator) if with_norm_bias else None,
    }
    leaves = {k: v.to(dtype).requires_grad_() for k, v in tensors.items() if v is not None}
    upstream = (torch.randn(shape, generator=generator).to(dtype), torch.randn(shape, generator=generator).to(dtype))
    return leaves, upstream


def _forward_backward(fn, leaves, upstream):
    normed, new_residual = fn(**{k: leaves.get(k) for k in ("x", "residual", "bias", "weight", "norm_bias")})
    objective = (normed.float() * upstream[0].float()).sum() + (new_residual.float() * upstream[1].float()).sum()
    grads = torch.autograd.grad(objective, list(leaves.values()))
    return [normed, new_residual], dict(zip(leaves, grads))


def _the_seed_the_kernel_draws(torch_seed):
    torch.manual_seed(torch_seed)
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,norm_kind,with_residual,with_bias", [
    ((3, 7, 64), "layernorm", True, True),
    ((5, 100), "rmsnorm", True, False),
    ((19, 48), "layernorm", False, True),  # the first block: no residual stream yet
])
def test_dropout_path_matches_reference_with_the_same_mask(shape, norm_kind, with_residual, with_bias, dtype):
    p, eps = 0.3, 1e-5
    with_norm_bias = norm_kind == "layernorm"
    leaves, upstream = _inputs(shape, dtype, with_residual, with_bias, with_norm_bias)

    torch.manual_seed(123)
    actual_outputs, actual_grads = _forward_backward(
        lambda **t: kernels.residual_dropout_norm(p=p, training=True, eps=eps, norm_kind=norm_kind, impl="triton", **t),
        leaves, upstream)

    rows = math.prod(shape[:-1])
    keep = reference.dropout_keep_mask(_the_seed_the_kernel_draws(123), (rows, shape[-1]), p).reshape(shape)
    fp32_leaves = {k: v.detach().float().requires_grad_() for k, v in leaves.items()}
    expected_outputs, expected_grads = _forward_backward(
        lambda **t: reference.residual_dropout_norm(p=p, training=True, eps=eps, norm_kind=norm_kind,
                                                    keep_mask=keep, **t),
        fp32_leaves, upstream)

    atol, rtol = TOLERANCES[dtype]
    for name, a, e in zip(("normed", "new_residual"), actual_outputs, expected_outputs):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), e, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")
    for name in leaves:
        torch.testing.assert_close(actual_grads[name].float(), expected_grads[name], atol=atol, rtol=rtol,
                                   msg=lambda m: f"grad {name}: {m}")


def test_mask_is_reproducible_and_keeps_the_right_fraction():
    x = torch.ones(32, 256)
    weight = torch.ones(256)
    outputs = []
    for _ in range(2):
        torch.manual_seed(7)
        _, new_residual = kernels.residual_dropout_norm(x, None, None, 0.25, True, weight, None, 1e-5,
                                                        "rmsnorm", impl="triton")
        outputs.append(new_residual)
    assert torch.equal(outputs[0], outputs[1])
    kept = outputs[0] != 0
    # 8192 Bernoulli(0.75) draws: standard deviation of the fraction is 0.0048; 5 sigma is 0.024.
    assert abs(kept.float().mean().item() - 0.75) < 0.024
    torch.testing.assert_close(outputs[0][kept], torch.full_like(outputs[0][kept], 1 / 0.75))
    torch.manual_seed(8)
    _, other = kernels.residual_dropout_norm(x, None, None, 0.25, True, weight, None, 1e-5, "rmsnorm", impl="triton")
    assert not torch.equal(other, outputs[0])  # a different torch seed draws a different mask


@pytest.mark.parametrize("p,training", [(0.0, True), (0.5, False)])
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_without_dropout_equals_the_unfused_composition(impl, p, training):
    leaves, upstream = _inputs((2, 9, 40), torch.float32, True, True, True, seed=5)
    actual_outputs, actual_grads = _forward_backward(
        lambda **t: kernels.residual_dropout_norm(p=p, training=training, eps=1e-5, norm_kind="layernorm",
                                                  impl=impl, **t), leaves, upstream)

    def unfused(x, residual, bias, weight, norm_bias):
        new_residual = residual + (x + bias)
        return torch.nn.functional.layer_norm(new_residual, (40,), weight, norm_bias, 1e-5), new_residual

    expected_outputs, expected_grads = _forward_backward(unfused, leaves, upstream)
    for a, e in zip(actual_outputs, expected_outputs):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)
    for name in leaves:
        torch.testing.assert_close(actual_grads[name], expected_grads[name], atol=1e-5, rtol=1e-5)


def test_torch_impl_dropout_statistics():
    torch.manual_seed(0)
    _, new_residual = kernels.residual_dropout_norm(torch.ones(128, 128), None, None, 0.4, True, torch.ones(128),
                                                    None, 1e-5, "rmsnorm", impl="torch")
    # 16384 draws of Bernoulli(0.6): 5 sigma of the kept fraction is 0.019.
    assert abs((new_residual != 0).float().mean().item() - 0.6) < 0.019


def test_fp32_residual_stream_with_bf16_branch():
    # Megatron's fp32 residual connection: the new residual keeps fp32, the normed output is bf16.
    leaves, upstream = _inputs((6, 40), torch.float32, True, True, True, seed=6)
    leaves["x"] = leaves["x"].detach().to(torch.bfloat16).requires_grad_()
    upstream = (upstream[0].to(torch.bfloat16), upstream[1])
    outputs, grads = _forward_backward(
        lambda **t: kernels.residual_dropout_norm(p=0.0, training=True, eps=1e-5, norm_kind="layernorm",
                                                  impl="triton", **t), leaves, upstream)
    assert outputs[0].dtype == torch.bfloat16 and outputs[1].dtype == torch.float32
    assert grads["x"].dtype == torch.bfloat16 and grads["residual"].dtype == torch.float32
    fp32_leaves = {k: v.detach().float().requires_grad_() for k, v in leaves.items()}
    expected_outputs, expected_grads = _forward_backward(
        lambda **t: reference.residual_dropout_norm(p=0.0, training=True, eps=1e-5, norm_kind="layernorm", **t),
        fp32_leaves, upstream)
    torch.testing.assert_close(outputs[1], expected_outputs[1], atol=1e-6, rtol=1e-6)  # fp32 stream: exact
    torch.testing.assert_close(outputs[0].float(), expected_outputs[0], atol=3e-2, rtol=2e-2)  # bf16 rounding
    torch.testing.assert_close(grads["residual"], expected_grads["residual"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads["x"].float(), expected_grads["x"], atol=3e-2, rtol=2e-2)
