"""Attention-probability dropout under tensor parallelism: each tp rank's head shard draws its mask from its
own RNG stream (Attention.dropout_stream), derived from the global RNG so that the replicated regions stay
in sync, activation checkpointing recomputes the same masks, and stream 0 is the single-device behaviour."""


import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from scaletrain.models.blocks import Attention
from scaletrain.models.registry import build_model, load_model_config
from scaletrain.parallel.checkpointing import apply_activation_checkpointing
from scaletrain.parallel.multiprocess import run_on_ranks


def _attention(stream: int = 0) -> Attention:
    torch.manual_seed(1234)  # identical weights for every module built here
    attn = Attention(load_model_config("gpt_tiny", {"attn_dropout": 0.5})).train()
    attn.dropout_stream = stream
    return attn


def _input() -> torch.Tensor:
    return torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(7))  # (B, T, D)


def _run(attn: Attention, x: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """attn(x) from a fixed global seed -> (output, global CPU RNG state after the call)."""
    torch.manual_seed(seed)
    y = attn(x, is_causal=True)
    return y, torch.get_rng_state()


def test_streams_differ_and_advance_the_global_rng_alike():
    x = _input()
    y1, state1 = _run(_attention(1), x)
    y1_again, _ = _run(_attention(1), x)
    y2, state2 = _run(_attention(2), x)
    assert torch.equal(y1, y1_again)
    assert not torch.allclose(y1, y2)  # rank 0 and rank 1 heads get different masks
    assert torch.equal(state1, state2)  # ...while every rank's global RNG stays in sync
    y_eval, _ = _run(_attention(1).eval(), x)  # no dropout: no draw, same result for every stream
    y_eval2, _ = _run(_attention(2).eval(), x)
    assert torch.equal(y_eval, y_eval2)


def test_stream_zero_is_the_plain_single_device_dropout():
    attn, x = _attention(0), _input()
    y, state = _run(attn, x)
    # the unmodified forward: SDPA with dropout drawing straight from the global RNG
    torch.manual_seed(0)
    q, k, v = (proj(x).view(2, 8, -1, attn.head_dim).transpose(1, 2)
               for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    core = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=0.5)
    expected = attn.out_proj(core.transpose(1, 2).reshape(2, 8, -1))
    assert torch.equal(y, expected)
    assert torch.equal(state, torch.get_rng_state())  # no extra draw from the global RNG


def _grads(attn: Attention, x: torch.Tensor, checkpointed: bool):
    x = x.clone().requires_grad_()
    torch.manual_seed(0)
    y = checkpoint(attn, x, use_reentrant=False) if checkpointed else attn(x)
    y.square().sum().backward()
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in attn.named_parameters()}


def test_checkpoint_recompute_draws_the_same_masks():
    x = _input()
    y, x_grad, grads = _grads(_attention(3), x, checkpointed=False)
    y_ckpt, x_grad_ckpt, grads_ckpt = _grads(_attention(3), x, checkpointed=True)
    assert torch.equal(y, y_ckpt)
    assert torch.equal(x_grad, x_grad_ckpt)
    for name, grad in grads.items():
        assert torch.equal(grad, grads_ckpt[name]), name


def _model_grads(mode: str) -> dict:
    cfg = load_model_config("gpt_tiny", {"dropout": 0.1, "attn_dropout": 0.5})
    model = build_model(cfg, "cpu").train()
    for module in model.modules():
        if isinstance(module, Attention):
            module.dropout_stream = 2
    apply_activation_checkpointing(model, mode)
    torch.manual_seed(0)
    model(input_ids=torch.randint(1, 200, (2, 16))).square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_model_checkpointing_with_streams_gives_bitwise_equal_gradients(mode):
    reference, grads = _model_grads("none"), _model_grads(mode)
    for name, grad in reference.items():
        assert torch.equal(grads[name], grad), (mode, name)


def _tp_streams_and_rng(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh

    from scaletrain.parallel.tensor import apply_tensor_parallel, padded_model_config

    cfg = padded_model_config(load_model_config("gpt_tiny", {"dropout": 0.1, "attn_dropout": 0.5}), world_size)
    model = build_model(cfg, "cpu").train()
    apply_tensor_parallel(model, init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",)))
    torch.manual_seed(0)  # the trainer seeds all tp ranks of a replica alike
    model(input_ids=torch.randint(1, 200, (2, 16)))
    streams = [m.dropout_stream for m in model.modules() if isinstance(m, Attention)]
    return streams, torch.get_rng_state()


def test_tensor_parallel_gives_each_rank_its_stream():
    (streams0, state0), (streams1, state1) = run_on_ranks(_tp_streams_and_rng, 2)
    assert streams0 and set(streams0) == {1} and set(streams1) == {2}
    assert torch.equal(state0, state1)  # the replicated residual dropout stays in sync across tp ranks


def _residual_dropout_mask(rank, world_size, sequence_parallel):
    """The first block's residual dropout mask on this rank's piece of the stream."""
    from torch.distributed.device_mesh import init_device_mesh

    from scaletrain.parallel.tensor import apply_tensor_parallel, padded_model_config

    cfg = padded_model_config(load_model_config("gpt_tiny", {"dropout": 0.5, "attn_dropout": 0.0}), world_size)
    model = build_model(cfg, "cpu").train()
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    apply_tensor_parallel(model, mesh, sequence_parallel)
    masks = []

    def record(module, inputs, output):
        local = [t.to_local() if hasattr(t, "to_local") else t for t in (inputs[0], output)]
        masks.append((local[1] == 0) & (local[0] != 0))

    model.layers["0"].dropout.register_forward_hook(record)
    torch.manual_seed(0)  # the trainer seeds all tp ranks of a replica alike
    model(input_ids=torch.randint(1, 200, (2, 16)))
    return masks[0]


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_sequence_parallel_shards_get_their_own_residual_masks(sequence_parallel):
    mask0, mask1 = run_on_ranks(_residual_dropout_mask, 2, sequence_parallel)
    assert 0.3 < mask0.float().mean() < 0.7
    if sequence_parallel:  # (B, T/2, D) shards of one stream: independent masks, not one pattern twice
        assert mask0.shape == (2, 8, mask0.shape[-1]) and not torch.equal(mask0, mask1)
    else:  # replicated (B, T, D) activations: every tp rank must drop the same elements
        assert mask0.shape == (2, 16, mask0.shape[-1]) and torch.equal(mask0, mask1)


def test_dtensor_rng_tracker_on_a_gpu_mesh_is_built_without_the_world_state_sync(monkeypatch):
    # No GPU here: the tracker class is replaced by a recorder, to check what parallel/tensor.py asks for.
    # torch's lazy default (run_state_sync=True) would broadcast rank 0's CUDA RNG state to every rank.
    from types import SimpleNamespace

    from torch.distributed.tensor import _random

    from scaletrain.parallel import tensor

    built = []
    monkeypatch.setattr(_random, "_rng_tracker", None)
    monkeypatch.setattr(_random, "is_rng_supported_mesh", lambda mesh: True)
    monkeypatch.setattr(_random, "OffsetBasedRNGTracker",
                        lambda mesh, run_state_sync: built.append(run_state_sync) or "tracker")
    tensor._keep_each_ranks_rng(SimpleNamespace(device_type="cpu"))
    assert built == [] and _random._rng_tracker is None  # CPU meshes have no DTensor RNG
    tensor._keep_each_ranks_rng(SimpleNamespace(device_type="cuda"))
    assert built == [False] and _random._rng_tracker == "tracker"
    tensor._keep_each_ranks_rng(SimpleNamespace(device_type="cuda"))  # an existing tracker is kept
    assert built == [False]
