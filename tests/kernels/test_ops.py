"""The op layer: model.kernels resolution, the compile impl, argument errors."""

import pytest
import torch

import scaletrain.kernels as kernels
from scaletrain.errors import ConfigError, UserError


def test_resolve_impl(monkeypatch):
    assert kernels.resolve_impl("auto", "cpu") == "torch"
    assert kernels.resolve_impl("torch", "cpu") == "torch"
    assert kernels.resolve_impl("compile", torch.device("cpu")) == "compile"
    assert kernels.resolve_impl("auto", "cuda") == "triton"  # triton is installed here
    assert kernels.resolve_impl("triton", "cuda:0") == "triton"
    assert kernels.resolve_impl("triton", "cpu") == "triton"  # the interpreter is on in kernel tests
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ConfigError, match="model.kernels=triton needs a CUDA device"):
        kernels.resolve_impl("triton", "cpu")
    with pytest.raises(UserError, match="model.kernels='fast' is not one of auto, triton, torch, compile"):
        kernels.resolve_impl("fast", "cpu")


def test_unresolved_impl_is_a_user_error():
    with pytest.raises(ConfigError, match="resolve_impl"):
        kernels.layer_norm(torch.randn(2, 4), torch.ones(4), None, 1e-5, impl="auto")
    with pytest.raises(ConfigError, match="approximate"):
        kernels.bias_gelu(torch.randn(2, 4), None, "erf")
    with pytest.raises(ConfigError, match="norm_kind"):
        kernels.residual_dropout_norm(torch.randn(2, 4), None, None, 0.0, False, torch.ones(4), None, 1e-5, "batchnorm")


def test_compile_impl_matches_torch_impl():
    # One test for the compile path: the first torch.compile of a process costs ~20 s on CPU.
    torch.manual_seed(0)
    x = torch.randn(2, 5, 24, requires_grad=True)
    weight = torch.randn(24, requires_grad=True)
    labels = torch.tensor([[3, 7, -100, 1, 0], [23, 5, 5, -100, 9]])
    outputs = {}
    for impl in ("torch", "compile"):
        normed = kernels.rms_norm(x, weight, 1e-6, impl=impl)
        loss = kernels.cross_entropy(normed, labels, label_smoothing=0.1, reduction="mean", impl=impl)
        outputs[impl] = (loss, *torch.autograd.grad(loss, (x, weight)))
    for compiled, eager in zip(outputs["compile"], outputs["torch"]):
        torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


class _MarkedTensor(torch.Tensor):
    """Stands in for DTensor: any tensor subclass."""


def test_tensor_subclasses_take_the_reference_path(monkeypatch):
    from scaletrain.kernels import triton_norm

    def no_triton(*args, **kwargs):
        raise AssertionError("a tensor subclass reached a Triton kernel")

    monkeypatch.setattr(triton_norm, "layer_norm", no_triton)
    x = torch.randn(3, 16).as_subclass(_MarkedTensor)
    weight, bias = torch.randn(16), torch.randn(16)
    out = kernels.layer_norm(x, weight, bias, 1e-5, impl="triton")
    torch.testing.assert_close(out.as_subclass(torch.Tensor),
                               torch.nn.functional.layer_norm(x.as_subclass(torch.Tensor), (16,), weight, bias))
    with pytest.raises(AssertionError, match="subclass reached"):  # the same call on a plain tensor does
        kernels.layer_norm(x.as_subclass(torch.Tensor), weight, bias, 1e-5, impl="triton")
