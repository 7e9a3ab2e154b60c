"""Model names and families -> classes, losses and input keys; YAML loading; parameter counting."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from scaletrain.configs import CONFIG_DIR, available
from scaletrain.configs.schema import ModelConfig
from scaletrain.errors import ConfigError, UserError, one_line
from scaletrain.models.bert import BERT
from scaletrain.models.blocks import IGNORE_INDEX, cross_entropy_sum
from scaletrain.models.encdec import EncoderDecoder
from scaletrain.models.gpt import GPT
from scaletrain.models.xlnet import XLNet


class UnknownModel(UserError):
    pass


def lm_loss(outputs: torch.Tensor, batch: dict, kernels_choice: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """GPT and encoder-decoder: logits (B, T, V) against already-shifted labels (B, T), -100 ignored."""
    return cross_entropy_sum(outputs, batch["labels"], kernels_choice)


def bert_loss(outputs, batch: dict, kernels_choice: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """MLM over the masked tokens, plus NSP when the batch has next_sentence_label.

    Normalisation: each sequence's NSP prediction counts as one more predicted position, so the trainer's
    division by the global count gives (sum of MLM losses + sum of NSP losses) / (masked tokens + sequences).
    This stays exact under any data-parallel split or accumulation (BERT's own "mean MLM + mean NSP" does
    not: its NSP weight would depend on the masked-token count of each micro-batch)."""
    mlm_logits, nsp_logits = outputs
    labels = batch["labels"]
    if mlm_logits.shape[:-1] != labels.shape:  # the head scored only the labelled positions: (N, V)
        labels = labels[labels != IGNORE_INDEX]
    loss_sum, count = cross_entropy_sum(mlm_logits, labels, kernels_choice)
    if nsp_logits is not None and "next_sentence_label" in batch:
        nsp_sum, nsp_count = cross_entropy_sum(nsp_logits, batch["next_sentence_label"])
        loss_sum, count = loss_sum + nsp_sum, count + nsp_count
    return loss_sum, count


def classification_loss(logits: torch.Tensor, batch: dict, kernels_choice: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """classify() logits (B, K) against class ids (B,), -100 ignored (validation padding): summed, counted."""
    return cross_entropy_sum(logits, batch["labels"], kernels_choice)


def regression_loss(predictions: torch.Tensor, batch: dict, kernels_choice: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Squared error of classify()'s one output (B, 1) against float targets (B,), NaN ignored: summed, counted."""
    labels = batch["labels"]
    valid = ~labels.isnan()
    error = torch.where(valid, predictions.squeeze(-1).float() - labels.nan_to_num(), 0.0)  # (B,)
    return (error * error).sum(), valid.sum()


TASK_LOSSES = {"classification": classification_loss, "regression": regression_loss}  # data.task -> loss_fn


@dataclass(frozen=True)
class FamilySpec:
    model_cls: type
    loss_fn: Callable
    input_keys: tuple  # batch keys passed to forward/classify as keyword arguments, when present


FAMILY_SPECS = {
    "gpt": FamilySpec(GPT, lm_loss, ("input_ids", "attention_mask")),
    # labels: the MLM head scores only the labelled positions (BERT.forward)
    "bert": FamilySpec(BERT, bert_loss, ("input_ids", "token_type_ids", "attention_mask", "labels")),
    "encdec": FamilySpec(EncoderDecoder, lm_loss,
                         ("input_ids", "decoder_input_ids", "attention_mask", "decoder_attention_mask")),
    # plm batches: logits (B, num_predict, V) of the query stream against labels (B, num_predict)
    "xlnet": FamilySpec(XLNet, lm_loss, ("input_ids", "token_type_ids", "attention_mask", "perm_mask",
                                         "target_mapping")),
}

# modules that are not part of the backbone the papers count (the pooler is counted unless asked otherwise)
HEAD_MODULES = ("mlm_head", "nsp_head", "classifier")


def get_spec(family: str) -> FamilySpec:
    if family not in FAMILY_SPECS:
        raise ConfigError(f"model.family={family!r} is not one of {', '.join(FAMILY_SPECS)}")
    return FAMILY_SPECS[family]


def build_model(cfg: ModelConfig, device: str | torch.device = "meta") -> nn.Module:
    """Builds on `device` without initializing; on meta, follow with to_empty() and init_weights(seed)."""
    with torch.device(device):
        model = get_spec(cfg.family).model_cls(cfg)
    if torch.device(device).type != "meta":
        model.init_weights(0)
    return model


def count_parameters(model: nn.Module, include_heads: bool = True, include_pooler: bool = True,
                     exclude: tuple = ()) -> int:
    """Parameters counted once each (tied embeddings once). include_heads=False drops the MLM/NSP/
    classification heads (Hugging Face's BertModel count); `exclude` drops further top-level modules."""
    skipped = tuple(exclude) + (() if include_heads else HEAD_MODULES) + (() if include_pooler else ("pooler",))
    return sum(p.numel() for name, p in model.named_parameters() if name.split(".")[0] not in skipped)


def load_model_config(name: str, overrides: dict | None = None) -> ModelConfig:
    """configs/model/<name>.yaml onto the typed ModelConfig with plain OmegaConf (no Hydra app)."""
    path = CONFIG_DIR / "model" / f"{name}.yaml"
    if not path.is_file():
        raise UnknownModel(f"unknown model {name!r}; available models: {', '.join(available('model'))}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path), overrides or {})
        return OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except (OmegaConfBaseException, ValueError, TypeError) as error:
        raise ConfigError(f"configs/model/{name}.yaml: {one_line(error)}") from None
