"""bias + GELU (exact, tanh) and gated GELU: Triton (interpreted) and torch impls against fp32 references."""

import math

import pytest
import torch

import scaletrain.kernels as kernels

# (atol, rtol) against float64 math on the same rounded inputs: one rounding of the output / grads on store.
# The references run in float64: torch 2.13's fp32 erf on 2 CPU threads was seen to return wrong values
# for a third of the elements, intermittently, after other tests had run in the same process.
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (4e-2, 2e-2), torch.float16: (4e-3, 4e-3)}
# widths 300 (> one 128-column tile, ragged) and 49; rows 37 and 70 are ragged vs the 32-row tiles
SHAPES = [(37, 300), (2, 35, 49)]


def _gelu_formula(x, approximate):  # written out, independent of torch's and the kernels' gelu
    if approximate == "tanh":
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _check(actual, expected, dtype, names):
    atol, rtol = TOLERANCES[dtype]
    for name, a, e in zip(names, actual, expected):
        assert a.dtype == dtype, name
        torch.testing.assert_close(a.float(), e.float(), atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def _value_and_grads(fn, inputs, dy):
    out = fn(*inputs)
    return [out, *torch.autograd.grad(out, inputs, dy)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_bias_gelu_matches_formula(impl, approximate, shape, dtype):
    generator = torch.Generator().manual_seed(2)
    x = (3 * torch.randn(shape, generator=generator)).to(dtype).requires_grad_()  # covers both tails
    bias = torch.randn(shape[-1], generator=generator).to(dtype).requires_grad_()
    dy = torch.randn(shape, generator=generator).to(dtype)

    actual = _value_and_grads(lambda x, b: kernels.bias_gelu(x, b, approximate, impl=impl), [x, bias], dy)
    x64, bias64 = x.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    expected = _value_and_grads(lambda x, b: _gelu_formula(x + b, approximate), [x64, bias64], dy.double())
    _check(actual, expected, dtype, ("output", "grad input", "grad bias"))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_without_bias(approximate):
    x = (3 * torch.randn(5, 77)).requires_grad_()
    actual = _value_and_grads(lambda x: kernels.bias_gelu(x, None, approximate, impl="triton"), [x], torch.ones(5, 77))
    x64 = x.detach().double().requires_grad_()
    expected = _value_and_grads(lambda x: _gelu_formula(x, approximate), [x64], torch.ones(5, 77, dtype=torch.float64))
    _check(actual, expected, torch.float32, ("output", "grad input"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(3, 5, 96), (1, 1300)])  # 1300 elements: two 1024-element blocks, ragged
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_gated_gelu_matches_formula(impl, shape, dtype):
    generator = torch.Generator().manual_seed(3)
    gate = (3 * torch.randn(shape, generator=generator)).to(dtype).requires_grad_()
    up = torch.randn(shape, generator=generator).to(dtype).requires_grad_()
    dy = torch.randn(shape, generator=generator).to(dtype)

    actual = _value_and_grads(lambda g, u: kernels.gated_gelu(g, u, impl=impl), [gate, up], dy)
    leaves = [t.detach().double().requires_grad_() for t in (gate, up)]
    expected = _value_and_grads(lambda g, u: _gelu_formula(g, "tanh") * u, leaves, dy.double())
    _check(actual, expected, dtype, ("output", "grad gate", "grad up"))


def test_extreme_inputs_stay_finite():
    x = torch.tensor([[-1e4, -30.0, -5.0, 0.0, 5.0, 30.0, 1e4]]).requires_grad_()
    for approximate in ("none", "tanh"):
        out = kernels.bias_gelu(x, None, approximate, impl="triton")
        (grad,) = torch.autograd.grad(out.sum(), x)
        torch.testing.assert_close(out, torch.nn.functional.gelu(x, approximate=approximate), atol=1e-5, rtol=1e-5)
        assert torch.isfinite(grad).all()
