"""The short sample printed at the end of a run: a GPT continues a validation prompt (top-k sampling from
a generator of its own, so the training RNG is untouched); an encoder-decoder fills in the masked spans of
a validation input greedily. No KV cache: a few dozen tokens of a small model, once per run."""

from __future__ import annotations

import torch

from scaletrain.configs.schema import ModelConfig, TrainConfig
from scaletrain.data.loader import validation_batches
from scaletrain.inference.generate import full_logits

PROMPT_TOKENS = 16
TOP_K = 40
TEMPERATURE = 0.8


@torch.no_grad()
def _continue_gpt(model, model_cfg: ModelConfig, prompt: torch.Tensor, new_tokens: int, seed: int) -> torch.Tensor:
    generator = torch.Generator(device=prompt.device).manual_seed(seed)
    ids = prompt[None]  # (1, T)
    context = model_cfg.max_seq_len if model_cfg.position == "learned" else 4096
    for _ in range(new_tokens):
        logits = full_logits(model(ids[:, -context:]))[0, -1].float() / TEMPERATURE  # (V,)
        top = torch.topk(logits, TOP_K)
        choice = torch.multinomial(torch.softmax(top.values, dim=-1), 1, generator=generator)
        ids = torch.cat([ids, top.indices[choice][None]], dim=1)
    return ids[0, prompt.numel():]


@torch.no_grad()
def _fill_spans(model, batch: dict, new_tokens: int, stop_id: int) -> torch.Tensor:
    inputs = {"input_ids": batch["input_ids"][:1], "attention_mask": batch.get("attention_mask")}
    if inputs["attention_mask"] is not None:
        inputs["attention_mask"] = inputs["attention_mask"][:1]
    decoded = batch["decoder_input_ids"][:1, :1]  # the decoder start token
    for _ in range(new_tokens):
        logits = full_logits(model(decoder_input_ids=decoded, **inputs))[0, -1]
        next_id = logits.argmax()[None, None]
        decoded = torch.cat([decoded, next_id], dim=1)
        if next_id.item() == stop_id:
            break
    return decoded[0, 1:]


def generate_sample(model, model_cfg: ModelConfig, data, objective, cfg: TrainConfig, device) -> str:
    """Every rank runs the forwards (sharded models need all of them); the text is the same everywhere."""
    tokenizer, was_training = data.tokenizer, model.training
    model.eval()
    try:
        if model_cfg.family == "gpt":
            prompt = torch.as_tensor(data.validation.tokens[:PROMPT_TOKENS].astype("int64"), device=device)
            new = _continue_gpt(model, model_cfg, prompt, cfg.trainer.sample_tokens, cfg.seed)
            return f"{tokenizer.decode(prompt.tolist())!r} -> {tokenizer.decode(new.tolist())!r}"
        batch = next(validation_batches(data.validation, objective, cfg.trainer.seq_len, 1, 0, 1, 1, cfg.seed))
        batch = {k: v.to(device) for k, v in batch.items()}
        new = _fill_spans(model, batch, cfg.trainer.sample_tokens, getattr(objective, "eos_id", tokenizer.pad_id))
        source = batch["input_ids"][0][batch["input_ids"][0] != tokenizer.pad_id]
        return f"{tokenizer.decode(source.tolist())[:200]!r} -> {tokenizer.decode(new.tolist())!r}"
    finally:
        model.train(was_training)
