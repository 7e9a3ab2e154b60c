"""Hugging Face adapters: a transformers model -> ours (config and weights), and ours -> a state dict (or a
model) that transformers loads with strict=True. Adapters only: no model knows about Hugging Face, and
transformers is imported inside functions so `import scaletrain.models` never needs it.

Supported: GPT2LMHeadModel, OpenAIGPTLMHeadModel (GPT-1), BertForPreTraining, BertForMaskedLM, RobertaForMaskedLM,
T5ForConditionalGeneration (v1.0: relu, tied head, rescaled decoder output; v1.1: gated-gelu, untied head),
BartForConditionalGeneration, XLNetLMHeadModel and XLNetForSequenceClassification; for export, a model with a
classification head as GPT2/Bert/Roberta/Bart/T5ForSequenceClassification.

The per-architecture adapters (configs both ways, the Links from each Hugging Face tensor to ours) are in
models/hf_families.py; this module converts with them: whole models and state dicts, the classification
heads, and the folder-level import that checkpoint/hf_io.py streams tensor by tensor."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from scaletrain.configs.schema import ModelConfig
from scaletrain.models.hf_families import (ADAPTERS, Adapter, Link, UnsupportedHFModel, from_hf_tensor,
                                           module_links, to_hf_tensor)
from scaletrain.models.init import retie_embeddings
from scaletrain.models.registry import build_model


# ------------------------------------------------------------------------- sequence classification

@dataclass(frozen=True)
class ClassifierHead:
    base: str  # the LM class whose backbone links (and config) it reuses
    prefix: str  # prepended to the base's keys: T5's backbone sits under "transformer."
    dropped: tuple[str, ...]  # key prefixes of the base's LM head, which the classification class lacks
    links: list[Link]


def _pooled(dense: str, out: str) -> list[Link]:
    """dense -> tanh -> out: our pooler.dense and classifier (RoBERTa's, BART's and T5's classification head)."""
    return module_links(dense, "pooler.dense") + module_links(out, "classifier")


CLASSIFIER_HEADS = {
    "GPT2ForSequenceClassification": ClassifierHead("GPT2LMHeadModel", "", ("lm_head",),
                                                    module_links("score", "classifier", bias=False)),
    "BertForSequenceClassification": ClassifierHead("BertForMaskedLM", "", ("cls.",),
                                                    _pooled("bert.pooler.dense", "classifier")),
    "RobertaForSequenceClassification": ClassifierHead("RobertaForMaskedLM", "", ("lm_head",),
                                                       _pooled("classifier.dense", "classifier.out_proj")),
    "BartForSequenceClassification": ClassifierHead("BartForConditionalGeneration", "", ("lm_head", "final_logits"),
                                                    _pooled("classification_head.dense", "classification_head.out_proj")),
    "T5ForSequenceClassification": ClassifierHead("T5ForConditionalGeneration", "transformer.", ("lm_head",),
                                                  _pooled("classification_head.dense", "classification_head.out_proj")),
}


def _classifier_adapter(head: ClassifierHead) -> Adapter:
    """The base LM class's backbone plus the classification head, for export (an import would lack our LM
    head's tensors: no `defaults` for them)."""
    base = ADAPTERS[head.base]

    def config_from_hf(c, tied: bool, hf_class: str) -> dict:
        fields = base.config_from_hf(c, tied, head.base)
        gpt = fields["family"] == "gpt"
        return {**fields, "num_labels": c.num_labels, "pooler": not gpt, "nsp_head": False}

    def config_to_hf(cfg: ModelConfig, hf_class: str):
        config = base.config_to_hf(cfg, head.base)
        config.num_labels = cfg.num_labels
        return config

    def links(cfg: ModelConfig) -> list[Link]:
        kept = [link for link in base.links(cfg) if not link.hf.startswith(head.dropped)]
        return [dataclasses.replace(link, hf=head.prefix + link.hf) for link in kept] + head.links

    def aliases(cfg: ModelConfig) -> dict:
        return {head.prefix + key: head.prefix + value for key, value in base.aliases(cfg).items()
                if not key.startswith(head.dropped)}

    return Adapter(config_from_hf, config_to_hf, links, aliases, untied_head=False)


ADAPTERS.update({name: _classifier_adapter(head) for name, head in CLASSIFIER_HEADS.items()})


def _adapter(hf_class: str) -> Adapter:
    if hf_class not in ADAPTERS:
        raise UnsupportedHFModel(f"Hugging Face class {hf_class} is not supported; supported classes: "
                                 f"{', '.join(ADAPTERS)}")
    return ADAPTERS[hf_class]


def hf_class_for(cfg: ModelConfig) -> str:
    """The Hugging Face class a config exports to (to_hf_config checks that it can hold it): with a
    classification head (model.num_labels > 0), the family's *ForSequenceClassification."""
    if cfg.num_labels > 0 and cfg.family != "xlnet":
        lm_class = hf_class_for(dataclasses.replace(cfg, num_labels=0))
        head = next((name for name, head in CLASSIFIER_HEADS.items() if head.base == lm_class.replace(
            "BertForPreTraining", "BertForMaskedLM")), None)
        if head is None:
            raise UnsupportedHFModel(f"model {cfg.name}: a classification head on {lm_class} cannot be exported; "
                                     f"supported: {', '.join(CLASSIFIER_HEADS)}")
        return head
    if cfg.family == "gpt":
        return "OpenAIGPTLMHeadModel" if cfg.norm_position == "post" else "GPT2LMHeadModel"
    if cfg.family == "bert":
        if cfg.positions_from_padding:
            return "RobertaForMaskedLM"
        return "BertForPreTraining" if cfg.nsp_head else "BertForMaskedLM"
    if cfg.family == "xlnet":
        return "XLNetForSequenceClassification" if cfg.num_labels > 0 else "XLNetLMHeadModel"
    return "T5ForConditionalGeneration" if cfg.position == "relative" else "BartForConditionalGeneration"


def _architecture(cfg: ModelConfig) -> dict:
    """The fields that change the function a config computes (not dropout, init, names or table metadata).
    The pooler and classifier are left out: Hugging Face's MLM classes have neither, and export drops them."""
    names = ["family", "vocab_size", "d_model", "n_layers", "n_heads", "head_dim", "ffn_dim", "position", "norm",
             "norm_position", "norm_eps", "activation", "bias", "tie_embeddings", "final_norm", "scale_attention",
             "positions_from_padding"]
    if cfg.position == "learned":
        names += ["max_seq_len", "position_offset"]
    if cfg.position == "relative":
        names += ["relative_buckets", "relative_max_distance"]
    if cfg.positions_from_padding:
        names += ["pad_token_id"]
    if cfg.num_labels > 0 and cfg.family != "xlnet":  # a classifier reads the pooler (not GPT); NSP is not exported
        names += ["num_labels"] + ([] if cfg.family == "gpt" else ["pooler"])
    if cfg.family == "bert":
        names += ["type_vocab_size", "embedding_norm"] + ([] if cfg.num_labels else ["nsp_head"])
    if cfg.family == "xlnet":
        names += ["attn_type", "bi_data", "clamp_len", "mem_len", "reuse_len", "num_labels"]
    if cfg.family == "encdec":
        names += ["decoder_layers", "embedding_norm", "scale_embeddings", "scale_decoder_output", "final_logits_bias"]
    return {name: getattr(cfg, name) for name in names}


def to_hf_config(cfg: ModelConfig):
    """Our config -> the matching transformers config; a UserError names the first field it cannot hold."""
    hf_class = hf_class_for(cfg)
    adapter = ADAPTERS[hf_class]
    hf_config = adapter.config_to_hf(cfg, hf_class)
    # read it back: whatever did not survive the round trip has no equivalent in the HF class
    expected = _architecture(cfg)
    found = _architecture(_config_from_hf(hf_config, cfg.tie_embeddings, hf_class))
    for name, value in expected.items():
        if found[name] != value:
            fix = ("finetune with model.pooler=true (its head is dense + tanh + out_proj)" if name == "pooler"
                   else f"supported: {', '.join(ADAPTERS)}")
            raise UnsupportedHFModel(f"model {cfg.name}: {name}={value!r} cannot be exported as {hf_class} "
                                     f"(which has {name}={found[name]!r}); {fix}")
    return hf_config


def _config_from_hf(hf_config, tied: bool, hf_class: str) -> ModelConfig:
    fields = ADAPTERS[hf_class].config_from_hf(hf_config, tied, hf_class)
    # the checkpoint's vocab is final: padding it again would change the shapes (1 marks "already padded")
    return ModelConfig(name=f"hf_{hf_config.model_type}", pad_vocab_multiple=1, **fields)


def _head_is_tied(hf_model) -> bool:
    head = hf_model.get_output_embeddings()  # None for a class without an LM head (classification)
    return head is None or head.weight is hf_model.get_input_embeddings().weight


def from_hf_model(hf_model) -> nn.Module:
    """A transformers model -> our model with the same config, weights, dtype, device and train/eval mode."""
    hf_class = type(hf_model).__name__
    cfg = config_from_hf(hf_model.config, hf_class, _head_is_tied(hf_model))
    hf_state = hf_model.state_dict()
    state = state_from_hf(cfg, hf_class, set(hf_state), hf_state.__getitem__)
    first = next(iter(hf_state.values()))
    model = _load(cfg, state, first.device, first.dtype)
    return model.train(hf_model.training)


def _load(cfg: ModelConfig, state: dict, device: torch.device, dtype: torch.dtype) -> nn.Module:
    model = build_model(cfg, device="meta")
    model.to_empty(device=device)
    if cfg.tie_embeddings:
        retie_embeddings(model)  # to_empty gives the tied head a parameter of its own
    model.to(dtype)
    for module in model.modules():  # computed buffers (sinusoidal tables); loaded buffers are overwritten
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()
    for names in _shared_parameter_names(model):  # our state dict lists a tied tensor under each name
        given = [state[name] for name in names if name in state]
        state.update({name: given[0] for name in names})
    model.load_state_dict(state, strict=True)
    return model


def _shared_parameter_names(model: nn.Module) -> list[list[str]]:
    by_tensor: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(param), []).append(name)
    return [names for names in by_tensor.values() if len(names) > 1]


def _full(tensor: torch.Tensor) -> torch.Tensor:
    # a DTensor (FSDP2 / tensor parallel) gathers its shards; every rank must call this together
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def to_hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our model -> the state dict of hf_class_for(model.cfg), loadable with strict=True into a model built from
    to_hf_config(model.cfg), tied keys included. The pooler of a BERT without NSP and any classifier are
    dropped: the Hugging Face MLM classes have neither."""
    cfg = model.cfg
    hf_class = hf_class_for(cfg)
    to_hf_config(cfg)  # raises when the class cannot hold this config
    adapter = ADAPTERS[hf_class]
    ours = model.state_dict()
    hf_state = {}
    for link in adapter.links(cfg):
        missing = [name for name in link.ours if name not in ours]
        if missing:
            raise UnsupportedHFModel(f"model {cfg.name} has no {missing[0]}; export the whole model, not a "
                                     f"pipeline stage")
        hf_state[link.hf] = to_hf_tensor(link, [_full(ours[name]).detach() for name in link.ours])
    for alias, key in adapter.aliases(cfg).items():
        hf_state[alias] = hf_state[key]
    return hf_state


def to_hf_model(model: nn.Module):
    """Our model -> a transformers model with the same weights, on the same device and dtype, in eval mode."""
    import transformers
    cfg = model.cfg
    hf_class = hf_class_for(cfg)
    state = to_hf_state_dict(model)
    first = next(iter(state.values()))
    with torch.device(first.device):
        hf_model = getattr(transformers, hf_class)(to_hf_config(cfg)).to(first.dtype)
    if hf_class == "T5ForConditionalGeneration" and not cfg.tie_embeddings:
        untie_t5_head(hf_model)
    hf_model.load_state_dict(state, strict=True)
    return hf_model.eval()


def untie_t5_head(hf_model) -> None:
    """transformers 5 always ties T5's lm_head at construction (loading a v1.1 checkpoint unties it); give a
    freshly built v1.1 model its own head, as its checkpoints have."""
    hf_model.lm_head.weight = nn.Parameter(hf_model.shared.weight.detach().clone())
    getattr(hf_model, "all_tied_weights_keys", {}).pop("lm_head.weight", None)


# ------------------------------------------------------------------- folder-level import (checkpoint/hf_io.py)

def config_from_hf(hf_config, hf_class: str, tied: bool) -> ModelConfig:
    """A transformers config of `hf_class` -> our ModelConfig (vocab final: pad_vocab_multiple=1)."""
    adapter = _adapter(hf_class)
    if not tied and not adapter.untied_head:
        raise UnsupportedHFModel(f"{hf_class} with an output projection untied from the input embeddings is not "
                                 f"supported; use tie_word_embeddings=True")
    return _config_from_hf(hf_config, tied, hf_class)


def untied_head_key(hf_class: str) -> str | None:
    """The Hugging Face key of an output projection the class may hold apart from the input table."""
    return "lm_head.weight" if _adapter(hf_class).untied_head else None


def state_from_hf(cfg: ModelConfig, hf_class: str, hf_keys: set[str],
                  read: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict from Hugging Face tensors, read one at a time with `read(hf_key)`; `hf_keys` are all the
    keys the source holds: one without a scaletrain equivalent is an error (a variant we do not support)."""
    adapter = _adapter(hf_class)
    links = check_hf_keys(cfg, hf_class, hf_keys)
    state = dict(adapter.defaults(cfg))  # our tensors the HF class lacks (XLNet), then every linked tensor
    for link in links:
        state.update(zip(link.ours, from_hf_tensor(link, read(link.hf))))
    return state


def check_hf_keys(cfg: ModelConfig, hf_class: str, hf_keys: set[str]) -> list[Link]:
    """The class's links for this config, once the source's keys are checked: a key without a scaletrain
    equivalent (a variant we do not support) or a missing one is an UnsupportedHFModel."""
    adapter = _adapter(hf_class)
    links, aliases = adapter.links(cfg), adapter.aliases(cfg)
    unknown = sorted(set(hf_keys) - {link.hf for link in links} - set(aliases))
    if unknown:
        raise UnsupportedHFModel(f"{hf_class}: weights {', '.join(unknown[:3])} have no scaletrain equivalent; "
                                 f"this variant of the class is not supported")
    missing = sorted(link.hf for link in links if link.hf not in hf_keys)
    if missing:
        raise UnsupportedHFModel(f"{hf_class}: the weights lack {', '.join(missing[:3])}"
                                 f"{f' (+{len(missing) - 3} more)' if len(missing) > 3 else ''}; the folder does "
                                 f"not hold a complete {hf_class}")
    return links


def split_hf_tensor(link: Link, tensor: torch.Tensor) -> list[torch.Tensor]:
    """One Hugging Face tensor -> the one or more of ours it holds (transposed / split as the link says)."""
    return from_hf_tensor(link, tensor)


def architecture_fields(cfg: ModelConfig) -> dict:
    """The fields that change the function a config computes (dropout, init and names aside)."""
    return _architecture(cfg)


def model_from_tensors(cfg: ModelConfig, state: dict, device: torch.device | str = "cpu",
                       dtype: torch.dtype | None = None) -> nn.Module:
    """Our model built from a full state dict (tied names may be given once), strict, in eval mode."""
    dtype = dtype or next(iter(state.values())).dtype
    return _load(cfg, dict(state), torch.device(device), dtype).eval()
