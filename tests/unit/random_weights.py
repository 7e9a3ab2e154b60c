"""Shared by the Hugging Face parity tests of tiny random models."""

import pytest
import torch


@torch.no_grad()
def randomized(model, seed=0, scale=0.3):
    """Every parameter drawn at random, norms off 1 and biases off 0: HF's init leaves norms at 1 and biases at
    0, so a swapped or skipped tensor would go unnoticed."""
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in model.named_parameters():
        noise = torch.randn(tensor.shape, generator=generator)
        tensor.copy_(1.0 + 0.2 * noise if tensor.dim() == 1 and name.endswith("weight") else scale * noise)
    return model.eval()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls: a second intra-op thread only adds synchronisation (50x slower on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
