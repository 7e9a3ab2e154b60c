"""Vocab-chunked cross-entropy: Triton (interpreted) and torch impls against F.cross_entropy on fp32 logits,
and the tensor-parallel form on 2 gloo ranks against the unsharded reference."""

import pytest
import torch
import torch.nn.functional as F

import scaletrain.kernels as kernels
from scaletrain.errors import ConfigError
from scaletrain.kernels import reference
from scaletrain.parallel.multiprocess import run_on_ranks

# (atol, rtol). The loss is formed in fp32 from the rounded logits in every dtype: the summed loss agrees
# to fp32 accumulation error. The grad is rounded once to the logits dtype on store.
LOSS_TOLERANCE = (1e-4, 1e-5)
GRAD_TOLERANCES = {torch.float32: (1e-6, 1e-5), torch.bfloat16: (4e-3, 1e-2), torch.float16: (5e-4, 1e-3)}


def _reference(logits, labels, ignore_index, label_smoothing, reduction, upstream):
    logits32 = logits.detach().float().requires_grad_()
    loss = F.cross_entropy(logits32.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=ignore_index,
                           label_smoothing=label_smoothing, reduction=reduction)
    loss = loss.reshape(labels.shape) if reduction == "none" else loss
    (grad,) = torch.autograd.grad((loss * upstream).sum(), logits32)
    return loss, grad


def _case(rows_shape, vocab, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = (4 * torch.randn(*rows_shape, vocab, generator=generator)).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, rows_shape, generator=generator)
    labels.view(-1)[::5] = -100  # every fifth position ignored
    return logits, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [97, 300])  # 300 > the 128-wide interpreter chunk: three chunks, ragged
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_cross_entropy_matches_reference(impl, label_smoothing, vocab, dtype):
    logits, labels = _case((3, 7), vocab, dtype)
    loss = kernels.cross_entropy(logits, labels, label_smoothing=label_smoothing, impl=impl)
    (grad,) = torch.autograd.grad(loss * 0.5, logits)
    expected_loss, expected_grad = _reference(logits, labels, -100, label_smoothing, "sum", 0.5)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(loss, expected_loss, atol=LOSS_TOLERANCE[0], rtol=LOSS_TOLERANCE[1])
    atol, rtol = GRAD_TOLERANCES[dtype]
    torch.testing.assert_close(grad.float(), expected_grad, atol=atol, rtol=rtol)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_reductions_and_custom_ignore_index(impl, reduction):
    logits, labels = _case((2, 9), 150, torch.float32, seed=1)
    labels[labels == -100] = 7  # class 7 plays the ignored label here
    upstream = torch.rand(labels.shape) if reduction == "none" else torch.tensor(1.5)
    loss = kernels.cross_entropy(logits, labels, ignore_index=7, label_smoothing=0.05, reduction=reduction, impl=impl)
    (grad,) = torch.autograd.grad((loss * upstream).sum(), logits)
    expected_loss, expected_grad = _reference(logits, labels, 7, 0.05, reduction, upstream)
    torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # fp32 writes the gradient in place
def test_torch_impl_chunks_rows_without_changing_the_result(monkeypatch, dtype):
    logits, labels = _case((5, 8), 64, dtype, seed=2)
    expected_loss, expected_grad = _reference(logits, labels, -100, 0.1, "sum", 1.0)
    monkeypatch.setitem(reference._CROSS_ENTROPY_CHUNK, "cpu", 3 * 64)  # 3 rows per chunk: 14 chunks, last ragged
    loss = kernels.cross_entropy(logits, labels, label_smoothing=0.1, impl="torch")
    (grad,) = torch.autograd.grad(loss, logits)
    assert grad.dtype == dtype
    torch.testing.assert_close(loss, expected_loss, atol=1e-4, rtol=1e-5)  # fp32 statistics either way
    grad_tolerance = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-3, rtol=1e-2)
    torch.testing.assert_close(grad.float(), expected_grad, **grad_tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_shard_statistics_match_the_torch_backend(dtype):
    # The vocab-parallel path feeds per-shard statistics into all-reduces (tested on gloo below with the
    # torch backend); here the Triton backend's shard statistics and shard grads, with the labels on this
    # shard, on the other shard and ignored, must equal the torch backend's.
    from scaletrain.kernels import triton_cross_entropy

    logits, labels = _case((4, 5), 2 * 70, dtype, seed=3)
    logits2d, labels1d = logits.detach().reshape(-1, 140), labels.reshape(-1)
    for vocab_start in (0, 70):
        shard = logits2d[:, vocab_start:vocab_start + 70].contiguous()
        stats = triton_cross_entropy.cross_entropy_row_stats(shard, labels1d, vocab_start, True)
        expected = reference.cross_entropy_row_stats(shard, labels1d, vocab_start, True)
        torch.testing.assert_close(stats, expected, atol=1e-4, rtol=1e-5)
        lse = torch.logsumexp(logits2d.float(), dim=-1)
        row_scale = torch.where(labels1d != -100, 2.0, 0.0)
        grad = triton_cross_entropy.cross_entropy_logits_grad(shard, labels1d, lse, row_scale, vocab_start, 140, 0.1)
        expected_grad = reference.cross_entropy_logits_grad(shard, labels1d, lse, row_scale, vocab_start, 140, 0.1)
        atol, rtol = GRAD_TOLERANCES[dtype]  # both round an fp32 grad once: at most 1 ulp apart
        torch.testing.assert_close(grad.float(), expected_grad.float(), atol=atol, rtol=rtol)


def _vocab_parallel_rank(rank, world_size, label_smoothing):
    import torch.distributed as dist

    logits, labels = _case((3, 6), 2 * 45, torch.float32, seed=4)
    local = logits.detach()[..., rank * 45:(rank + 1) * 45].clone().requires_grad_()
    loss = kernels.cross_entropy(local, labels, label_smoothing=label_smoothing, impl="torch",
                                 tp_group=dist.group.WORLD)
    (grad,) = torch.autograd.grad(loss, local)
    return loss.detach(), grad


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_vocab_parallel_on_two_ranks_matches_unsharded(label_smoothing, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")  # the gloo workers' forkserver outlives this module
    results = run_on_ranks(_vocab_parallel_rank, 2, label_smoothing)
    logits, labels = _case((3, 6), 90, torch.float32, seed=4)
    expected_loss, expected_grad = _reference(logits, labels, -100, label_smoothing, "sum", 1.0)
    for rank, (loss, grad) in enumerate(results):
        torch.testing.assert_close(loss, expected_loss, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(grad, expected_grad[..., rank * 45:(rank + 1) * 45], atol=1e-6, rtol=1e-5)


def _dtensor_rank(rank, world_size, impl):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    def no_gather(self, *args, **kwargs):
        raise AssertionError("the vocab-sharded logits were gathered")

    DTensor.full_tensor = no_gather  # this worker process only
    mesh = init_device_mesh("cpu", (world_size,))
    logits, labels = _case((2, 5), 2 * 40, torch.float32, seed=5)
    sharded = distribute_tensor(logits.detach(), mesh, [Shard(-1)]).requires_grad_()
    loss = kernels.cross_entropy(sharded, labels, label_smoothing=0.1, impl=impl)
    loss.backward()
    return loss.detach(), sharded.grad.to_local()


def test_vocab_sharded_dtensor_logits_run_vocab_parallel(monkeypatch):
    # A tensor-parallel lm_head hands the loss DTensor logits sharded over the vocab; the op finds the
    # group itself and never gathers the full logits.
    monkeypatch.delenv("TRITON_INTERPRET")
    results = run_on_ranks(_dtensor_rank, 2, "torch")
    logits, labels = _case((2, 5), 80, torch.float32, seed=5)
    expected_loss, expected_grad = _reference(logits, labels, -100, 0.1, "sum", 1.0)
    for rank, (loss, grad) in enumerate(results):
        assert grad.shape == (2, 5, 40)
        torch.testing.assert_close(loss, expected_loss, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(grad, expected_grad[..., rank * 40:(rank + 1) * 40], atol=1e-6, rtol=1e-5)


def test_bad_arguments_raise_user_errors():
    logits, labels = _case((2, 3), 10, torch.float32)
    with pytest.raises(ConfigError, match="reduction"):
        kernels.cross_entropy(logits, labels, reduction="avg")
    with pytest.raises(ConfigError, match="label_smoothing"):
        kernels.cross_entropy(logits, labels, label_smoothing=1.0)
    with pytest.raises(ConfigError, match="labels.shape"):
        kernels.cross_entropy(logits, labels[:, :2])
