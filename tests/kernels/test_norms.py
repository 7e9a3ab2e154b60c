"""LayerNorm / RMSNorm: Triton (interpreted) and torch impls against an fp32 reference, forward and backward."""

import pytest
import torch

import scaletrain.kernels as kernels

# (atol, rtol) against the fp32 reference computed from the same low-precision inputs. The kernels compute
# in fp32 and round once on store, so the error is ~1 ulp of the output: 2**-8 (bf16), 2**-11 (fp16).
TOLERANCES = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (3e-2, 2e-2), torch.float16: (4e-3, 4e-3)}
# widths: a power of two, not a power of two, wider than one warp; rows 21 / 5 / 33 are ragged vs any block
SHAPES = [(3, 7, 64), (5, 100), (1, 33, 384)]


def _leaves(*tensors, dtype):
    return [t.to(dtype).requires_grad_() for t in tensors]


def _run(fn, inputs, dy):
    out = fn(*inputs)
    grads = torch.autograd.grad(out, inputs, dy)
    return [out, *grads]


def _reference(fn, inputs, dy):
    fp32_inputs = [t.detach().float().requires_grad_() for t in inputs]
    return _run(fn, fp32_inputs, dy.float())


def _assert_matches(actual, expected, dtype):
    atol, rtol = TOLERANCES[dtype]
    for name, a, e in zip(("output", "grad input", "grad weight", "grad bias"), actual, expected):
        assert a.dtype == dtype, name
        torch.testing.assert_close(a.float(), e, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_layer_norm_matches_fp32_reference(shape, dtype):
    # (impl="torch" is F.layer_norm itself, whose bf16 weight grad is rounded per row block: not tested here)
    generator = torch.Generator().manual_seed(0)
    width = shape[-1]
    x = torch.randn(shape, generator=generator) * 2 + 0.5
    weight = 1 + 0.2 * torch.randn(width, generator=generator)
    bias = 0.2 * torch.randn(width, generator=generator)
    dy = torch.randn(shape, generator=generator).to(dtype)
    inputs = _leaves(x, weight, bias, dtype=dtype)

    actual = _run(lambda x, w, b: kernels.layer_norm(x, w, b, 1e-5, impl="triton"), inputs, dy)
    expected = _reference(lambda x, w, b: torch.nn.functional.layer_norm(x, (width,), w, b, 1e-5), inputs, dy)
    _assert_matches(actual, expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_rms_norm_matches_fp32_reference(impl, shape, dtype):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=generator) * 2 + 0.5
    weight = 1 + 0.2 * torch.randn(shape[-1], generator=generator)
    dy = torch.randn(shape, generator=generator).to(dtype)
    inputs = _leaves(x, weight, dtype=dtype)

    def analytic_rms_norm(x, w):  # written out here, independent of kernels/reference.py
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * w

    actual = _run(lambda x, w: kernels.rms_norm(x, w, 1e-6, impl=impl), inputs, dy)
    _assert_matches(actual, _reference(analytic_rms_norm, inputs, dy), dtype)


def test_layer_norm_without_bias_and_weight_grad_summed_over_programs():
    # 37 rows over 4 backward programs: 10 + 10 + 10 + 7 rows, so the partial sums are ragged too.
    x = torch.randn(37, 40, dtype=torch.float64).float().requires_grad_()
    weight = torch.randn(40).requires_grad_()
    dy = torch.randn(37, 40)
    out = kernels.layer_norm(x, weight, None, 1e-5, impl="triton")
    dx, dweight = torch.autograd.grad(out, (x, weight), dy)
    x_ref, weight_ref = x.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    out_ref = torch.nn.functional.layer_norm(x_ref, (40,), weight_ref, None, 1e-5)
    dx_ref, dweight_ref = torch.autograd.grad(out_ref, (x_ref, weight_ref), dy.double())
    torch.testing.assert_close(out.double(), out_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx.double(), dx_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dweight.double(), dweight_ref, atol=1e-5, rtol=1e-5)


def test_non_contiguous_input_is_handled():
    x = torch.randn(6, 2, 50).transpose(0, 1).requires_grad_()  # (2, 6, 50), not contiguous
    weight, bias = torch.randn(50), torch.randn(50)
    out = kernels.layer_norm(x, weight, bias, 1e-5, impl="triton")
    torch.testing.assert_close(out, torch.nn.functional.layer_norm(x, (50,), weight, bias, 1e-5),
                               atol=1e-5, rtol=1e-5)
