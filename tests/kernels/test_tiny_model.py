"""A tiny model trained 5 steps with the Triton kernels (interpreted) gives the losses of the torch impl.

The model is built here from the ops, the way models/blocks.py will call them: a two-block pre-norm
transformer whose block tails use the fused residual + dropout + norm (the norm is the next sublayer's
input norm), bias + GELU (or gated GELU with RMSNorm, T5 v1.1 style) in the MLP, and the vocab-chunked
cross-entropy on the logits."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import scaletrain.kernels as kernels

VOCAB, WIDTH, HEADS, SEQ, BATCH, STEPS = 61, 48, 4, 8, 2, 5


class TinyBlock(nn.Module):
    def __init__(self, gated: bool):
        super().__init__()
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH, bias=False)
        self.out_proj = nn.Linear(WIDTH, WIDTH, bias=False)
        self.out_bias = nn.Parameter(0.02 * torch.randn(WIDTH))  # applied inside the fused residual op
        self.mlp_norm_weight = nn.Parameter(1 + 0.1 * torch.randn(WIDTH))
        self.mlp_norm_bias = None if gated else nn.Parameter(0.02 * torch.randn(WIDTH))
        self.fc_in = nn.Linear(WIDTH, 3 * WIDTH, bias=False)
        self.fc_in_bias = None if gated else nn.Parameter(0.02 * torch.randn(3 * WIDTH))
        self.fc_gate = nn.Linear(WIDTH, 3 * WIDTH, bias=False) if gated else None
        self.fc_out = nn.Linear(3 * WIDTH, WIDTH, bias=False)
        self.fc_out_bias = nn.Parameter(0.02 * torch.randn(WIDTH))
        self.gated = gated

    def forward(self, normed, residual, next_norm_weight, next_norm_bias, impl):
        norm_kind = "rmsnorm" if self.gated else "layernorm"
        batch, seq, _ = normed.shape
        q, k, v = self.qkv(normed).view(batch, seq, 3, HEADS, WIDTH // HEADS).transpose(1, 3).unbind(2)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, heads, T, head_dim)
        attended = self.out_proj(attended.transpose(1, 2).reshape(batch, seq, WIDTH))
        normed, residual = kernels.residual_dropout_norm(
            attended, residual, self.out_bias, 0.0, self.training, self.mlp_norm_weight, self.mlp_norm_bias,
            1e-5, norm_kind, impl=impl)
        if self.gated:
            hidden = kernels.gated_gelu(self.fc_gate(normed), self.fc_in(normed), impl=impl)
        else:
            hidden = kernels.bias_gelu(self.fc_in(normed), self.fc_in_bias, "tanh", impl=impl)
        return kernels.residual_dropout_norm(
            self.fc_out(hidden), residual, self.fc_out_bias, 0.0, self.training, next_norm_weight, next_norm_bias,
            1e-5, norm_kind, impl=impl)


class TinyTransformer(nn.Module):
    def __init__(self, gated: bool):
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, WIDTH)
        self.pos_embeddings = nn.Embedding(SEQ, WIDTH)
        # norm_weights[i] normalizes the input of block i; the last one is the final norm
        self.norm_weights = nn.ParameterList([nn.Parameter(1 + 0.1 * torch.randn(WIDTH)) for _ in range(3)])
        self.norm_biases = None if gated else nn.ParameterList(
            [nn.Parameter(0.02 * torch.randn(WIDTH)) for _ in range(3)])
        self.layers = nn.ModuleList([TinyBlock(gated) for _ in range(2)])
        self.lm_head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.gated = gated

    def norm_bias(self, index):
        return None if self.norm_biases is None else self.norm_biases[index]

    def forward(self, input_ids, labels, impl):
        residual = self.tok_embeddings(input_ids) + self.pos_embeddings(torch.arange(input_ids.shape[1]))
        if self.gated:
            normed = kernels.rms_norm(residual, self.norm_weights[0], 1e-5, impl=impl)
        else:
            normed = kernels.layer_norm(residual, self.norm_weights[0], self.norm_bias(0), 1e-5, impl=impl)
        for index, block in enumerate(self.layers):
            normed, residual = block(normed, residual, self.norm_weights[index + 1], self.norm_bias(index + 1), impl)
        loss_sum = kernels.cross_entropy(self.lm_head(normed), labels, impl=impl)
        return loss_sum / (labels != -100).sum()


def _train(impl, gated):
    torch.manual_seed(0)
    model = TinyTransformer(gated)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    # One fixed batch, so five steps visibly memorize it.
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    labels = tokens[:, 1:].clone()
    labels[0, :2] = -100
    losses = []
    for _ in range(STEPS):
        loss = model(tokens[:, :-1], labels, impl)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, model.state_dict()


@pytest.mark.parametrize("gated", [False, True], ids=["gpt_layernorm_gelu", "t5_rmsnorm_gated_gelu"])
def test_five_steps_with_triton_kernels_match_torch(gated):
    triton_losses, triton_state = _train("triton", gated)
    torch_losses, torch_state = _train("torch", gated)
    assert torch_losses[-1] < torch_losses[0] - 0.1  # it trains
    # fp32 throughout: the fused kernels only reorder fp32 sums, so 5 AdamW steps agree to ~1e-6.
    torch.testing.assert_close(torch.tensor(triton_losses), torch.tensor(torch_losses), atol=2e-5, rtol=2e-5)
    for name, value in torch_state.items():
        torch.testing.assert_close(triton_state[name], value, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")
