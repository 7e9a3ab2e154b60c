"""Fused ops for the transformer hot paths, each selectable per run by `model.kernels`.

Every op takes `impl`, the value `resolve_impl(cfg.model.kernels, device)` returns once per model:
  triton   the fused Triton kernels (CUDA, or the CPU interpreter under TRITON_INTERPRET=1);
  torch    the reference PyTorch implementation (kernels/reference.py);
  compile  torch.compile of the reference.
The Triton modules are imported only when used, so CPU-only runs never import triton."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os

import torch

from scaletrain.errors import ConfigError
from scaletrain.kernels import reference
from scaletrain.kernels.cross_entropy import CrossEntropy, check_arguments

IMPLS = ("triton", "torch", "compile")
KERNEL_CHOICES = ("auto",) + IMPLS


@functools.lru_cache(maxsize=None)
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_impl(kernels: str, device) -> str:
    """model.kernels -> the impl every op of the model uses: auto is Triton on CUDA, the reference elsewhere."""
    device_type = torch.device(device).type
    if kernels == "auto":
        return "triton" if device_type == "cuda" and _triton_installed() else "torch"
    if kernels == "triton":
        if not _triton_installed():
            raise ConfigError("model.kernels=triton needs the triton package; install it or use model.kernels=torch")
        if device_type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ConfigError(f"model.kernels=triton needs a CUDA device (the model is on {device_type}); use "
                              "model.kernels=auto or torch, or set TRITON_INTERPRET=1 to run the interpreter")
        return "triton"
    if kernels in ("torch", "compile"):
        return kernels
    raise ConfigError(f"model.kernels={kernels!r} is not one of {', '.join(KERNEL_CHOICES)}")


_TRITON_MODULE = {"layer_norm": "triton_norm", "rms_norm": "triton_norm", "residual_dropout_norm": "triton_norm",
                  "bias_gelu": "triton_gelu", "gated_gelu": "triton_gelu", "cross_entropy": "triton_cross_entropy"}


def _unknown_impl(impl: str) -> ConfigError:
    return ConfigError(f"kernel impl={impl!r} is not one of {', '.join(IMPLS)}; resolve model.kernels with "
                       "scaletrain.kernels.resolve_impl")


def _plain_tensors(*tensors) -> bool:
    # Triton kernels take plain tensors. Tensor subclasses (DTensor in tensor / sequence parallel regions)
    # take the reference path, whose ops their dispatch already implements.
    return all(t is None or type(t) in (torch.Tensor, torch.nn.Parameter) for t in tensors)


@functools.lru_cache(maxsize=None)
def _compiled(function_name: str):
    return torch.compile(getattr(reference, function_name))


def _implementation(function_name: str, impl: str, *tensors):
    if impl == "triton":
        if _plain_tensors(*tensors):
            return getattr(importlib.import_module(f"scaletrain.kernels.{_TRITON_MODULE[function_name]}"),
                           function_name)
        return getattr(reference, function_name)
    if impl == "torch":
        return getattr(reference, function_name)
    if impl == "compile":
        return _compiled(function_name)
    raise _unknown_impl(impl)


def layer_norm(x, weight, bias=None, eps: float = 1e-5, impl: str = "torch"):
    return _implementation("layer_norm", impl, x, weight, bias)(x, weight, bias, eps)


def rms_norm(x, weight, eps: float = 1e-6, impl: str = "torch"):
    return _implementation("rms_norm", impl, x, weight)(x, weight, eps)


def bias_gelu(x, bias=None, approximate: str = "none", impl: str = "torch"):
    """gelu(x + bias); approximate is "none" (erf) or "tanh", as in torch.nn.functional.gelu."""
    if approximate not in ("none", "tanh"):
        raise ConfigError(f"bias_gelu approximate={approximate!r} must be 'none' or 'tanh'")
    return _implementation("bias_gelu", impl, x, bias)(x, bias, approximate)


def gated_gelu(gate, up, impl: str = "torch"):
    """T5 v1.1 feed-forward activation: gelu_tanh(gate) * up."""
    return _implementation("gated_gelu", impl, gate, up)(gate, up)


def residual_dropout_norm(x, residual, bias=None, p: float = 0.0, training: bool = True, weight=None,
                          norm_bias=None, eps: float = 1e-5, norm_kind: str = "layernorm", impl: str = "torch"):
    """Megatron's fused block tail: new_residual = residual + dropout(x + bias); returns
    (norm(new_residual), new_residual). residual may be None (the first block: new_residual is the branch)."""
    if norm_kind not in ("layernorm", "rmsnorm"):
        raise ConfigError(f"norm_kind={norm_kind!r} must be 'layernorm' or 'rmsnorm'")
    if weight is None:
        raise ConfigError("residual_dropout_norm needs the norm weight")
    implementation = _implementation("residual_dropout_norm", impl, x, residual, bias, weight, norm_bias)
    return implementation(x, residual, bias, p, training, weight, norm_bias, eps, norm_kind)


def _vocab_parallel_from_dtensor(logits, labels, tp_group):
    """DTensor logits sharded over the vocab on a 1-D mesh (a tensor-parallel lm_head's output) -> the local
    shard and the mesh's process group, so the loss runs vocab-parallel; other layouts are gathered."""
    from torch.distributed.tensor import DTensor, Shard

    if isinstance(labels, DTensor):
        labels = labels.full_tensor()
    if not isinstance(logits, DTensor):
        return logits, labels, tp_group
    mesh, placement = logits.device_mesh, logits.placements[0]
    vocab_sharded = mesh.ndim == 1 and isinstance(placement, Shard) and placement.dim % logits.ndim == logits.ndim - 1
    if not vocab_sharded:
        return logits.full_tensor(), labels, tp_group
    if logits.shape[-1] % mesh.size() != 0:
        raise ConfigError(f"vocab-parallel cross_entropy needs the vocab ({logits.shape[-1]}) divisible by the "
                          f"tensor-parallel degree ({mesh.size()}); pad the vocab (model.pad_vocab_multiple)")
    return logits.to_local(), labels, mesh.get_group()


def cross_entropy(logits, labels, ignore_index: int = -100, label_smoothing: float = 0.0,
                  reduction: str = "sum", impl: str = "torch", tp_group=None):
    """Softmax cross-entropy in fp32 over logits (..., V) without materializing the fp32 softmax; returns
    an fp32 loss (summed by default: the trainer divides by the global token count). With tp_group, logits
    are this rank's equal vocab shard (rank r holds [r * V_local, (r + 1) * V_local)); DTensor logits
    sharded over the vocab find their group themselves."""
    check_arguments(logits, labels, label_smoothing, reduction)
    if not _plain_tensors(logits, labels):
        logits, labels, tp_group = _vocab_parallel_from_dtensor(logits, labels, tp_group)
    if impl == "triton" and _plain_tensors(logits, labels):
        backend = importlib.import_module(f"scaletrain.kernels.{_TRITON_MODULE['cross_entropy']}")
    elif impl == "compile" and tp_group is None:
        return _compiled("cross_entropy")(logits, labels, ignore_index, label_smoothing, reduction)
    elif impl in IMPLS:  # torch; compile with tp_group (the all-reduces stay eager); triton on a DTensor
        backend = reference
    else:
        raise _unknown_impl(impl)
    return CrossEntropy.apply(logits, labels, ignore_index, label_smoothing, reduction, tp_group, backend)


__all__ = ["IMPLS", "KERNEL_CHOICES", "resolve_impl", "layer_norm", "rms_norm", "bias_gelu", "gated_gelu",
           "residual_dropout_norm", "cross_entropy"]
