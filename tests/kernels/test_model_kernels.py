"""The real tiny models of all three families trained 5 steps with model.kernels=triton (interpreted on CPU)
give the losses and parameters of model.kernels=torch: the fused norms, GELU / gated GELU, residual +
dropout + norm tails and chunked cross-entropy are wired into models/blocks.py and agree with the plain ops."""

import pytest
import torch

from scaletrain.models.registry import build_model, get_spec, load_model_config

STEPS, BATCH, SEQ = 5, 2, 8


def _batch(cfg, generator):
    tokens = torch.randint(4, cfg.vocab_size, (BATCH, SEQ + 1), generator=generator)
    labels = tokens[:, 1:].clone()
    labels[0, :2] = -100  # ignored positions go through the kernel's ignore_index path
    if cfg.family == "gpt":
        return {"input_ids": tokens[:, :-1], "labels": labels}
    if cfg.family == "bert":
        return {"input_ids": tokens[:, :-1], "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long),
                "token_type_ids": torch.zeros(BATCH, SEQ, dtype=torch.long), "labels": labels}
    return {"input_ids": tokens[:, :-1], "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long),
            "decoder_input_ids": tokens[:, :-1].flip(1), "labels": labels}


def _train(name, kernels_choice):
    cfg = load_model_config(name, {"kernels": kernels_choice, "dropout": 0.0, "attn_dropout": 0.0})
    model = build_model(cfg, "cpu")
    model.init_weights(7)
    spec = get_spec(cfg.family)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = _batch(cfg, torch.Generator().manual_seed(1))  # one fixed batch: five steps visibly fit it
    losses = []
    for _ in range(STEPS):
        outputs = model(**{key: batch[key] for key in spec.input_keys if key in batch})
        loss_sum, count = spec.loss_fn(outputs, batch, kernels_choice)
        loss = loss_sum / count
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, model.state_dict()


# gpt_tiny: pre-LN LayerNorm + GELU; bert_tiny: post-LN; t5_v1_1_tiny: RMSNorm + gated GELU + cross-attention
@pytest.mark.parametrize("name", ["gpt_tiny", "bert_tiny", "t5_v1_1_tiny"])
def test_tiny_models_train_alike_with_triton_and_torch_kernels(name):
    triton_losses, triton_state = _train(name, "triton")
    torch_losses, torch_state = _train(name, "torch")
    assert torch_losses[-1] < torch_losses[0]  # it trains
    # fp32 throughout: the kernels only reorder fp32 sums, so 5 AdamW steps agree to ~1e-6
    torch.testing.assert_close(torch.tensor(triton_losses), torch.tensor(torch_losses), atol=5e-5, rtol=5e-5)
    for key, value in torch_state.items():
        torch.testing.assert_close(triton_state[key], value, atol=5e-4, rtol=5e-4, msg=lambda m: f"{key}: {m}")
