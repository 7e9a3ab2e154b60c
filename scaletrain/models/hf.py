"""Hugging Face adapters: a transformers model -> ours (config and weights), and ours -> a state dict (or a
model) that transformers loads with strict=True. Adapters only: no model knows about Hugging Face, and
transformers is imported inside functions so `import scaletrain.models` never needs it.

Supported: GPT2LMHeadModel, OpenAIGPTLMHeadModel (GPT-1), BertForPreTraining, BertForMaskedLM, RobertaForMaskedLM,
T5ForConditionalGeneration (v1.0: relu, tied head, rescaled decoder output; v1.1: gated-gelu, untied head),
BartForConditionalGeneration, XLNetLMHeadModel and XLNetForSequenceClassification; for export, a model with a
classification head as GPT2/Bert/Roberta/Bart/T5ForSequenceClassification.

An architecture is a list of Links, one per Hugging Face tensor, each naming the one or more of our tensors
it holds. GPT-2 fuses q, k and v into one Conv1D (`c_attn`) whose weight is stored (in, out), the transpose
of nn.Linear's (out, in); every other link is a plain copy. Tensors that Hugging Face's state dict repeats
under a second key (tied embeddings, the MLM decoder bias) are aliases."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from scaletrain.configs.schema import ModelConfig
from scaletrain.errors import UserError
from scaletrain.models.init import retie_embeddings
from scaletrain.models.registry import build_model


class UnsupportedHFModel(UserError):
    pass


@dataclass(frozen=True)
class Link:
    hf: str
    ours: tuple[str, ...]
    conv1d: bool = False  # GPT-2 Conv1D: weight stored (in, out)
    heads: int = 0  # XLNet einsum weight (D, H, Dh) with H = heads: an input projection, or the output one
    output_projection: bool = False


def _from_hf_tensor(link: Link, tensor: torch.Tensor) -> list[torch.Tensor]:
    if link.heads:  # (D, H, Dh) -> nn.Linear's (H*Dh, D) for q/k/v/r, (D, H*Dh) for o
        flat = tensor.reshape(tensor.shape[0], -1)
        return [flat if link.output_projection else flat.t()]
    if link.conv1d and tensor.dim() == 2:
        tensor = tensor.t()  # (in, out) -> (out, in)
    return list(tensor.chunk(len(link.ours), dim=0))  # fused (3*inner, ...) -> q, k, v


def _to_hf_tensor(link: Link, tensors: list[torch.Tensor]) -> torch.Tensor:
    tensor = torch.cat(tensors, dim=0) if len(tensors) > 1 else tensors[0]
    if link.heads:
        flat = tensor if link.output_projection else tensor.t()
        return flat.reshape(flat.shape[0], link.heads, -1).contiguous()
    return tensor.t().contiguous() if link.conv1d and tensor.dim() == 2 else tensor


def _module(hf: str, ours: str, bias: bool = True, conv1d: bool = False) -> list[Link]:
    """weight (and bias) of one Linear / Embedding / norm."""
    return [Link(f"{hf}.{n}", (f"{ours}.{n}",), conv1d) for n in (("weight", "bias") if bias else ("weight",))]


def _attention(hf: str, ours: str, names: tuple[str, str, str, str], bias: bool) -> list[Link]:
    """Separate q, k, v, out projections (BERT query/key/value/output.dense, T5 q/k/v/o, BART *_proj)."""
    links = []
    for theirs, mine in zip(names, ("q_proj", "k_proj", "v_proj", "out_proj")):
        links += _module(f"{hf}.{theirs}", f"{ours}.{mine}", bias)
    return links


# ------------------------------------------------------------------------------------ activations

HF_TO_OUR_ACTIVATION = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
OUR_TO_HF_ACTIVATION = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}


def _activation(name: str, hf_class: str) -> str:
    if name not in HF_TO_OUR_ACTIVATION:
        raise UnsupportedHFModel(f"{hf_class} with activation {name!r} is not supported; "
                                 f"use one of {', '.join(HF_TO_OUR_ACTIVATION)}")
    return HF_TO_OUR_ACTIVATION[name]


def _hf_activation(cfg: ModelConfig, hf_class: str) -> str:
    if cfg.activation not in OUR_TO_HF_ACTIVATION:
        raise UnsupportedHFModel(f"model {cfg.name}: activation={cfg.activation!r} has no {hf_class} equivalent; "
                                 f"use one of {', '.join(OUR_TO_HF_ACTIVATION)}")
    return OUR_TO_HF_ACTIVATION[cfg.activation]


def _require(hf_config, hf_class: str, **expected) -> None:
    for attr, value in expected.items():
        actual = getattr(hf_config, attr, value)
        if actual != value:
            raise UnsupportedHFModel(f"{hf_class} with {attr}={actual!r} is not supported; scaletrain needs "
                                     f"{attr}={value!r}")


# ------------------------------------------------------------------------------------------ GPT-2

def _gpt2_config(c, tied: bool, hf_class: str) -> dict:
    _require(c, hf_class, scale_attn_by_inverse_layer_idx=False, add_cross_attention=False)
    return dict(family="gpt", vocab_size=c.vocab_size, d_model=c.n_embd, n_layers=c.n_layer, n_heads=c.n_head,
                d_ff=c.n_inner or 4 * c.n_embd, max_seq_len=c.n_positions, position="learned", norm="layernorm",
                norm_position="pre", norm_eps=c.layer_norm_epsilon,
                activation=_activation(c.activation_function, hf_class), bias=True, tie_embeddings=tied,
                scale_attention=c.scale_attn_weights, init_scheme="gpt2", init_std=c.initializer_range,
                dropout=c.resid_pdrop, attn_dropout=c.attn_pdrop)


def _gpt2_hf_config(cfg: ModelConfig, hf_class: str):
    import transformers
    special = 50256 if cfg.vocab_size > 50256 else None  # GPT-2's <|endoftext|>, when the vocab has it
    return transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.d_model, n_layer=cfg.n_layers,
        n_head=cfg.n_heads, n_inner=cfg.ffn_dim, activation_function=_hf_activation(cfg, hf_class),
        resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.attn_dropout,
        layer_norm_epsilon=cfg.norm_eps, initializer_range=cfg.init_std, scale_attn_weights=cfg.scale_attention,
        tie_word_embeddings=cfg.tie_embeddings, bos_token_id=special, eos_token_id=special)


def _openai_gpt_config(c, tied: bool, hf_class: str) -> dict:
    # HF's (and OpenAI's) GPT-1 "gelu" is the tanh form
    activation = {"gelu": "gelu_tanh", "relu": "relu"}.get(c.afn)
    if activation is None:
        raise UnsupportedHFModel(f"{hf_class} with afn={c.afn!r} is not supported; use 'gelu' or 'relu'")
    return dict(family="gpt", vocab_size=c.vocab_size, d_model=c.n_embd, n_layers=c.n_layer, n_heads=c.n_head,
                d_ff=4 * c.n_embd, max_seq_len=c.n_positions, position="learned", norm="layernorm",
                norm_position="post", final_norm=False, norm_eps=c.layer_norm_epsilon, activation=activation,
                bias=True, tie_embeddings=True, init_scheme="normal", init_std=c.initializer_range,
                dropout=c.resid_pdrop, attn_dropout=c.attn_pdrop)


def _openai_gpt_hf_config(cfg: ModelConfig, hf_class: str):
    import transformers
    afn = {"gelu_tanh": "gelu", "relu": "relu"}.get(cfg.activation)
    if afn is None:
        raise UnsupportedHFModel(f"model {cfg.name}: activation={cfg.activation!r} has no {hf_class} equivalent; "
                                 f"use gelu_tanh or relu")
    return transformers.OpenAIGPTConfig(
        vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.d_model, n_layer=cfg.n_layers,
        n_head=cfg.n_heads, afn=afn, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.attn_dropout,
        layer_norm_epsilon=cfg.norm_eps, initializer_range=cfg.init_std)


def _gpt2_links(cfg: ModelConfig, gpt1: bool = False) -> list[Link]:
    """GPT-2 and GPT-1 share the layout; GPT-1 (post-LN) names its tables differently and has no ln_f."""
    tok, pos = ("tokens_embed", "positions_embed") if gpt1 else ("wte", "wpe")
    links = (_module(f"transformer.{tok}", "tok_embeddings", bias=False)
             + _module(f"transformer.{pos}", "pos_embeddings", bias=False))
    for i in range(cfg.n_layers):
        hf, ours = f"transformer.h.{i}", f"layers.{i}"
        links += _module(f"{hf}.ln_1", f"{ours}.attn_norm")
        links += [Link(f"{hf}.attn.c_attn.{n}", tuple(f"{ours}.attn.{p}_proj.{n}" for p in "qkv"), conv1d=True)
                  for n in ("weight", "bias")]
        links += _module(f"{hf}.attn.c_proj", f"{ours}.attn.out_proj", conv1d=True)
        links += _module(f"{hf}.ln_2", f"{ours}.mlp_norm")
        links += _module(f"{hf}.mlp.c_fc", f"{ours}.mlp.fc_in", conv1d=True)
        links += _module(f"{hf}.mlp.c_proj", f"{ours}.mlp.fc_out", conv1d=True)
    links += [] if gpt1 else _module("transformer.ln_f", "final_norm")
    return links + ([] if cfg.tie_embeddings else _module("lm_head", "lm_head", bias=False))


def _gpt2_aliases(cfg: ModelConfig, gpt1: bool = False) -> dict:
    table = "transformer.tokens_embed.weight" if gpt1 else "transformer.wte.weight"
    return {"lm_head.weight": table} if cfg.tie_embeddings else {}


# ---------------------------------------------------------------------------------- BERT, RoBERTa

def _bert_config(c, tied: bool, hf_class: str) -> dict:
    _require(c, hf_class, is_decoder=False, add_cross_attention=False)
    activation = _activation(c.hidden_act, hf_class)
    roberta, nsp = hf_class.startswith("Roberta"), hf_class == "BertForPreTraining"
    fields = dict(family="bert", vocab_size=c.vocab_size, d_model=c.hidden_size, n_layers=c.num_hidden_layers,
                  n_heads=c.num_attention_heads, d_ff=c.intermediate_size, max_seq_len=c.max_position_embeddings,
                  position="learned", type_vocab_size=c.type_vocab_size, embedding_norm=True, norm="layernorm",
                  norm_position="post", norm_eps=c.layer_norm_eps, activation=activation, bias=True,
                  tie_embeddings=True, final_norm=False, pooler=nsp, nsp_head=nsp, init_scheme="normal",
                  init_std=c.initializer_range, pad_token_id=c.pad_token_id or 0, dropout=c.hidden_dropout_prob,
                  attn_dropout=c.attention_probs_dropout_prob)
    if roberta:
        if activation != "gelu":  # RobertaLMHead applies exact gelu whatever hidden_act says; ours follows it
            raise UnsupportedHFModel(f"{hf_class} with hidden_act={c.hidden_act!r} is not supported; "
                                     f"RoBERTa's LM head always uses 'gelu', so set hidden_act='gelu'")
        # positions count from pad_token_id + 1, so the table holds pad_token_id + 1 unused rows
        offset = c.pad_token_id + 1
        fields.update(max_seq_len=c.max_position_embeddings - offset, position_offset=offset,
                      positions_from_padding=True)
    return fields


def _bert_hf_config(cfg: ModelConfig, hf_class: str):
    import transformers
    roberta = hf_class.startswith("Roberta")
    config_class = transformers.RobertaConfig if roberta else transformers.BertConfig
    return config_class(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, intermediate_size=cfg.ffn_dim, hidden_act=_hf_activation(cfg, hf_class),
        hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.attn_dropout,
        max_position_embeddings=cfg.max_seq_len + cfg.position_offset, type_vocab_size=cfg.type_vocab_size,
        initializer_range=cfg.init_std, layer_norm_eps=cfg.norm_eps, pad_token_id=cfg.pad_token_id)


def _bert_links(cfg: ModelConfig, hf_class: str) -> list[Link]:
    base = "roberta" if hf_class.startswith("Roberta") else "bert"
    emb = f"{base}.embeddings"
    links = (_module(f"{emb}.word_embeddings", "tok_embeddings", bias=False)
             + _module(f"{emb}.position_embeddings", "pos_embeddings", bias=False)
             + _module(f"{emb}.token_type_embeddings", "type_embeddings", bias=False)
             + _module(f"{emb}.LayerNorm", "embedding_norm"))
    for i in range(cfg.n_layers):
        hf, ours = f"{base}.encoder.layer.{i}", f"layers.{i}"
        links += _attention(f"{hf}.attention", f"{ours}.attn", ("self.query", "self.key", "self.value",
                                                                "output.dense"), bias=True)
        links += _module(f"{hf}.attention.output.LayerNorm", f"{ours}.attn_norm")
        links += _module(f"{hf}.intermediate.dense", f"{ours}.mlp.fc_in")
        links += _module(f"{hf}.output.dense", f"{ours}.mlp.fc_out")
        links += _module(f"{hf}.output.LayerNorm", f"{ours}.mlp_norm")
    if base == "roberta":
        return links + (_module("lm_head.dense", "mlm_head.dense") + _module("lm_head.layer_norm", "mlm_head.norm")
                        + [Link("lm_head.bias", ("mlm_head.decoder.bias",))])
    links += (_module("cls.predictions.transform.dense", "mlm_head.dense")
              + _module("cls.predictions.transform.LayerNorm", "mlm_head.norm")
              + [Link("cls.predictions.bias", ("mlm_head.decoder.bias",))])
    if hf_class == "BertForPreTraining":
        links += _module("bert.pooler.dense", "pooler.dense") + _module("cls.seq_relationship", "nsp_head")
    return links


def _bert_aliases(cfg: ModelConfig, hf_class: str) -> dict:
    if hf_class.startswith("Roberta"):
        return {"lm_head.decoder.weight": "roberta.embeddings.word_embeddings.weight",
                "lm_head.decoder.bias": "lm_head.bias"}
    return {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
            "cls.predictions.decoder.bias": "cls.predictions.bias"}


# --------------------------------------------------------------------------------------------- T5

def _t5_config(c, tied: bool, hf_class: str) -> dict:
    activation = HF_TO_OUR_ACTIVATION.get(c.dense_act_fn)
    if c.is_gated_act:  # "gated-gelu" means gelu_new (tanh)
        activation = {"gelu_tanh": "gated_gelu", "relu": "gated_relu"}.get(activation)
    if activation is None:
        raise UnsupportedHFModel(f"{hf_class} with feed_forward_proj={c.feed_forward_proj!r} is not "
                                 f"supported; use 'relu', 'gelu', 'gelu_new', 'gated-gelu' or 'gated-relu'")
    # transformers 5 keeps the v1.0 rescaling in its own flag; older versions read tie_word_embeddings
    rescale = getattr(c, "scale_decoder_outputs", c.tie_word_embeddings)
    return dict(family="encdec", vocab_size=c.vocab_size, d_model=c.d_model, n_layers=c.num_layers,
                n_decoder_layers=c.num_decoder_layers, n_heads=c.num_heads, d_head=c.d_kv, d_ff=c.d_ff,
                max_seq_len=512, position="relative", relative_buckets=c.relative_attention_num_buckets,
                relative_max_distance=c.relative_attention_max_distance, norm="rmsnorm", norm_position="pre",
                norm_eps=c.layer_norm_epsilon, activation=activation, bias=False, tie_embeddings=tied,
                scale_attention=False, scale_decoder_output=bool(rescale), init_scheme="t5",
                pad_token_id=c.pad_token_id or 0, dropout=c.dropout_rate, attn_dropout=c.dropout_rate)


def _t5_hf_config(cfg: ModelConfig, hf_class: str):
    import transformers
    gated = cfg.activation.startswith("gated_")  # gated_gelu / gated_relu -> "gated-gelu" / "gated-relu"
    feed_forward = cfg.activation.replace("_", "-") if gated else _hf_activation(cfg, hf_class)
    # T5Config reads the v1.0 output rescaling from its tie_word_embeddings argument
    config = transformers.T5Config(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.head_dim, d_ff=cfg.ffn_dim, num_layers=cfg.n_layers,
        num_decoder_layers=cfg.decoder_layers, num_heads=cfg.n_heads,
        relative_attention_num_buckets=cfg.relative_buckets,
        relative_attention_max_distance=cfg.relative_max_distance, dropout_rate=cfg.dropout,
        layer_norm_epsilon=cfg.norm_eps, feed_forward_proj=feed_forward, pad_token_id=cfg.pad_token_id,
        tie_word_embeddings=cfg.scale_decoder_output)
    config.scale_decoder_outputs = cfg.scale_decoder_output
    config.tie_word_embeddings = True  # the input tables stay shared; an untied lm_head is set per model
    return config


def _t5_links(cfg: ModelConfig) -> list[Link]:
    links = _module("shared", "tok_embeddings", bias=False)
    for stack, n_layers in (("encoder", cfg.n_layers), ("decoder", cfg.decoder_layers)):
        # one bias table per stack; Hugging Face keeps it in the first block's self-attention
        links.append(Link(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                          (f"{stack}.relative_bias.weight",)))
        for i in range(n_layers):
            hf, ours = f"{stack}.block.{i}.layer", f"{stack}.layers.{i}"
            links += _attention(f"{hf}.0.SelfAttention", f"{ours}.attn", ("q", "k", "v", "o"), bias=False)
            links += _module(f"{hf}.0.layer_norm", f"{ours}.attn_norm", bias=False)
            ff = f"{hf}.1"
            if stack == "decoder":
                links += _attention(f"{hf}.1.EncDecAttention", f"{ours}.cross_attn", ("q", "k", "v", "o"), bias=False)
                links += _module(f"{hf}.1.layer_norm", f"{ours}.cross_attn_norm", bias=False)
                ff = f"{hf}.2"
            links += _module(f"{ff}.layer_norm", f"{ours}.mlp_norm", bias=False)
            if cfg.activation.startswith("gated_"):  # v1.1: act(wi_0 x) * wi_1 x
                links += (_module(f"{ff}.DenseReluDense.wi_0", f"{ours}.mlp.fc_gate", bias=False)
                          + _module(f"{ff}.DenseReluDense.wi_1", f"{ours}.mlp.fc_in", bias=False))
            else:
                links += _module(f"{ff}.DenseReluDense.wi", f"{ours}.mlp.fc_in", bias=False)
            links += _module(f"{ff}.DenseReluDense.wo", f"{ours}.mlp.fc_out", bias=False)
        links += _module(f"{stack}.final_layer_norm", f"{stack}.final_norm", bias=False)
    return links + ([] if cfg.tie_embeddings else _module("lm_head", "lm_head", bias=False))


def _t5_aliases(cfg: ModelConfig) -> dict:
    aliases = {"encoder.embed_tokens.weight": "shared.weight", "decoder.embed_tokens.weight": "shared.weight"}
    return aliases | ({"lm_head.weight": "shared.weight"} if cfg.tie_embeddings else {})


# ------------------------------------------------------------------------------------------- BART

def _bart_config(c, tied: bool, hf_class: str) -> dict:
    for ours, (enc, dec) in {"n_heads": ("encoder_attention_heads", "decoder_attention_heads"),
                             "d_ff": ("encoder_ffn_dim", "decoder_ffn_dim")}.items():
        if getattr(c, enc) != getattr(c, dec):
            raise UnsupportedHFModel(f"{hf_class} with {enc}={getattr(c, enc)} != {dec}={getattr(c, dec)} is not "
                                     f"supported; scaletrain uses one {ours} for both stacks")
    return dict(family="encdec", vocab_size=c.vocab_size, d_model=c.d_model, n_layers=c.encoder_layers,
                n_decoder_layers=c.decoder_layers, n_heads=c.encoder_attention_heads, d_ff=c.encoder_ffn_dim,
                max_seq_len=c.max_position_embeddings, position="learned", position_offset=2, embedding_norm=True,
                norm="layernorm", norm_position="post", norm_eps=1e-5,  # BART's nn.LayerNorm default
                activation=_activation(c.activation_function, hf_class), bias=True, tie_embeddings=True,
                final_norm=False, final_logits_bias=True, scale_embeddings=bool(c.scale_embedding),
                init_scheme="normal", init_std=c.init_std, pad_token_id=c.pad_token_id, dropout=c.dropout,
                attn_dropout=c.attention_dropout)


def _bart_hf_config(cfg: ModelConfig, hf_class: str):
    import transformers
    return transformers.BartConfig(
        vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_seq_len, encoder_layers=cfg.n_layers,
        decoder_layers=cfg.decoder_layers, encoder_attention_heads=cfg.n_heads, decoder_attention_heads=cfg.n_heads,
        encoder_ffn_dim=cfg.ffn_dim, decoder_ffn_dim=cfg.ffn_dim, activation_function=_hf_activation(cfg, hf_class),
        d_model=cfg.d_model, dropout=cfg.dropout, attention_dropout=cfg.attn_dropout, init_std=cfg.init_std,
        scale_embedding=cfg.scale_embeddings, pad_token_id=cfg.pad_token_id)


def _bart_links(cfg: ModelConfig) -> list[Link]:
    links = _module("model.shared", "tok_embeddings", bias=False) + [Link("final_logits_bias", ("final_logits_bias",))]
    projections = ("q_proj", "k_proj", "v_proj", "out_proj")
    for stack, n_layers in (("encoder", cfg.n_layers), ("decoder", cfg.decoder_layers)):
        hf_stack = f"model.{stack}"
        links += (_module(f"{hf_stack}.embed_positions", f"{stack}.pos_embeddings", bias=False)
                  + _module(f"{hf_stack}.layernorm_embedding", f"{stack}.embedding_norm"))
        for i in range(n_layers):
            hf, ours = f"{hf_stack}.layers.{i}", f"{stack}.layers.{i}"
            links += _attention(f"{hf}.self_attn", f"{ours}.attn", projections, bias=True)
            links += _module(f"{hf}.self_attn_layer_norm", f"{ours}.attn_norm")
            if stack == "decoder":
                links += _attention(f"{hf}.encoder_attn", f"{ours}.cross_attn", projections, bias=True)
                links += _module(f"{hf}.encoder_attn_layer_norm", f"{ours}.cross_attn_norm")
            links += (_module(f"{hf}.fc1", f"{ours}.mlp.fc_in") + _module(f"{hf}.fc2", f"{ours}.mlp.fc_out")
                      + _module(f"{hf}.final_layer_norm", f"{ours}.mlp_norm"))
    return links


def _bart_aliases(cfg: ModelConfig) -> dict:
    return {name: "model.shared.weight"
            for name in ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight")}


# ------------------------------------------------------------------------------------------ XLNet

def _xlnet_config(c, tied: bool, hf_class: str) -> dict:
    _require(c, hf_class, same_length=False)
    classification = hf_class == "XLNetForSequenceClassification"
    if classification:
        _require(c, hf_class, summary_type="last", summary_use_proj=True, summary_activation="tanh",
                 summary_proj_to_labels=False)
    return dict(family="xlnet", vocab_size=c.vocab_size, d_model=c.d_model, n_layers=c.n_layer, n_heads=c.n_head,
                d_head=c.d_head, d_ff=c.d_inner, position="relative", norm="layernorm", norm_position="post",
                norm_eps=c.layer_norm_eps, activation=_activation(c.ff_activation, hf_class), bias=True,
                tie_embeddings=True, final_norm=False, attn_type=c.attn_type, bi_data=c.bi_data,
                clamp_len=c.clamp_len, mem_len=c.mem_len or 0, reuse_len=c.reuse_len or 0,
                num_labels=c.num_labels if classification else 0, init_scheme="normal",
                init_std=c.initializer_range, pad_token_id=c.pad_token_id if c.pad_token_id is not None else 0,
                dropout=c.dropout, attn_dropout=c.dropout)


def _xlnet_hf_config(cfg: ModelConfig, hf_class: str):
    import transformers
    extra = {"num_labels": cfg.num_labels} if hf_class == "XLNetForSequenceClassification" else {}
    return transformers.XLNetConfig(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads,
        d_inner=cfg.ffn_dim, ff_activation=_hf_activation(cfg, hf_class), attn_type=cfg.attn_type,
        bi_data=cfg.bi_data, clamp_len=cfg.clamp_len, mem_len=cfg.mem_len or None, reuse_len=cfg.reuse_len or None,
        dropout=cfg.dropout, layer_norm_eps=cfg.norm_eps, initializer_range=cfg.init_std,
        pad_token_id=cfg.pad_token_id, summary_type="last", summary_use_proj=True, summary_activation="tanh",
        summary_proj_to_labels=False, **extra)


def _xlnet_links(cfg: ModelConfig, hf_class: str) -> list[Link]:
    links = (_module("transformer.word_embedding", "tok_embeddings", bias=False)
             + [Link("transformer.mask_emb", ("mask_emb",))])
    for i in range(cfg.n_layers):
        hf, ours = f"transformer.layer.{i}", f"layers.{i}"
        links += [Link(f"{hf}.rel_attn.{p}", (f"{ours}.attn.{p}_proj.weight",), heads=cfg.n_heads) for p in "qkvr"]
        links.append(Link(f"{hf}.rel_attn.o", (f"{ours}.attn.out_proj.weight",), heads=cfg.n_heads,
                          output_projection=True))
        links += [Link(f"{hf}.rel_attn.{n}", (f"{ours}.attn.{n}",))
                  for n in ("r_w_bias", "r_r_bias", "r_s_bias", "seg_embed")]
        links += _module(f"{hf}.rel_attn.layer_norm", f"{ours}.attn_norm")
        links += (_module(f"{hf}.ff.layer_1", f"{ours}.mlp.fc_in") + _module(f"{hf}.ff.layer_2", f"{ours}.mlp.fc_out")
                  + _module(f"{hf}.ff.layer_norm", f"{ours}.mlp_norm"))
    if hf_class == "XLNetForSequenceClassification":
        return links + _module("sequence_summary.summary", "pooler.dense") + _module("logits_proj", "classifier")
    return links + [Link("lm_loss.bias", ("lm_head.bias",))]


def _xlnet_aliases(cfg: ModelConfig, hf_class: str) -> dict:
    if hf_class == "XLNetForSequenceClassification":
        return {}
    return {"lm_loss.weight": "transformer.word_embedding.weight"}


def _xlnet_defaults(cfg: ModelConfig, hf_class: str) -> dict:
    # the classification class has no LM head: ours keeps the tied one, with a zero bias
    return {"lm_head.bias": torch.zeros(cfg.vocab_size)} if hf_class == "XLNetForSequenceClassification" else {}


# --------------------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class Adapter:
    config_from_hf: Callable[[Any, bool, str], dict]  # (HF config, head tied?, class name) -> ModelConfig fields
    config_to_hf: Callable[[ModelConfig, str], Any]  # -> an HF config
    links: Callable[[ModelConfig], list[Link]]
    aliases: Callable[[ModelConfig], dict]  # HF key repeating a tied tensor -> the key that holds it
    untied_head: bool  # whether the HF class can hold an output projection separate from the input table
    defaults: Callable[[ModelConfig], dict] = lambda cfg: {}  # our tensors the HF class lacks -> their values


ADAPTERS = {
    "GPT2LMHeadModel": Adapter(_gpt2_config, _gpt2_hf_config, _gpt2_links, _gpt2_aliases, untied_head=True),
    "OpenAIGPTLMHeadModel": Adapter(_openai_gpt_config, _openai_gpt_hf_config,
                                    functools.partial(_gpt2_links, gpt1=True),
                                    functools.partial(_gpt2_aliases, gpt1=True), untied_head=False),
    **{name: Adapter(_bert_config, _bert_hf_config, functools.partial(_bert_links, hf_class=name),
                     functools.partial(_bert_aliases, hf_class=name), untied_head=False)
       for name in ("BertForPreTraining", "BertForMaskedLM", "RobertaForMaskedLM")},
    "T5ForConditionalGeneration": Adapter(_t5_config, _t5_hf_config, _t5_links, _t5_aliases, untied_head=True),
    "BartForConditionalGeneration": Adapter(_bart_config, _bart_hf_config, _bart_links, _bart_aliases,
                                            untied_head=False),
    **{name: Adapter(_xlnet_config, _xlnet_hf_config, functools.partial(_xlnet_links, hf_class=name),
                     functools.partial(_xlnet_aliases, hf_class=name), untied_head=False,
                     defaults=functools.partial(_xlnet_defaults, hf_class=name))
       for name in ("XLNetLMHeadModel", "XLNetForSequenceClassification")},
}


# ------------------------------------------------------------------------- sequence classification

@dataclass(frozen=True)
class ClassifierHead:
    base: str  # the LM class whose backbone links (and config) it reuses
    prefix: str  # prepended to the base's keys: T5's backbone sits under "transformer."
    dropped: tuple[str, ...]  # key prefixes of the base's LM head, which the classification class lacks
    links: list[Link]


def _pooled(dense: str, out: str) -> list[Link]:
    """dense -> tanh -> out: our pooler.dense and classifier (RoBERTa's, BART's and T5's classification head)."""
    return _module(dense, "pooler.dense") + _module(out, "classifier")


CLASSIFIER_HEADS = {
    "GPT2ForSequenceClassification": ClassifierHead("GPT2LMHeadModel", "", ("lm_head",),
                                                    _module("score", "classifier", bias=False)),
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
        hf_state[link.hf] = _to_hf_tensor(link, [_full(ours[name]).detach() for name in link.ours])
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
        state.update(zip(link.ours, _from_hf_tensor(link, read(link.hf))))
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
    return _from_hf_tensor(link, tensor)


def architecture_fields(cfg: ModelConfig) -> dict:
    """The fields that change the function a config computes (dropout, init and names aside)."""
    return _architecture(cfg)


def model_from_tensors(cfg: ModelConfig, state: dict, device: torch.device | str = "cpu",
                       dtype: torch.dtype | None = None) -> nn.Module:
    """Our model built from a full state dict (tied names may be given once), strict, in eval mode."""
    dtype = dtype or next(iter(state.values())).dtype
    return _load(cfg, dict(state), torch.device(device), dtype).eval()
