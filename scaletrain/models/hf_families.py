"""The Hugging Face architectures scaletrain's families match, one adapter each: how a transformers config
becomes our ModelConfig and back, and the Links that name, for every Hugging Face tensor, the one or more of
our tensors it holds. models/hf.py converts with them (models and state dicts, classification heads,
folder-level import); nothing here imports transformers at module level."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch

from scaletrain.configs.schema import ModelConfig
from scaletrain.errors import UserError


class UnsupportedHFModel(UserError):
    pass

@dataclass(frozen=True)
class Link:
    hf: str
    ours: tuple[str, ...]
    conv1d: bool = False  # GPT-2 Conv1D: weight stored (in, out)
    heads: int = 0  # XLNet einsum weight (D, H, Dh) with H = heads: an input projection, or the output one
    output_projection: bool = False


def from_hf_tensor(link: Link, tensor: torch.Tensor) -> list[torch.Tensor]:
    if link.heads:  # (D, H, Dh) -> nn.Linear's (H*Dh, D) for q/k/v/r, (D, H*Dh) for o
        flat = tensor.reshape(tensor.shape[0], -1)
        return [flat if link.output_projection else flat.t()]
    if link.conv1d and tensor.dim() == 2:
        tensor = tensor.t()  # (in, out) -> (out, in)
    return list(tensor.chunk(len(link.ours), dim=0))  # fused (3*inner, ...) -> q, k, v


def to_hf_tensor(link: Link, tensors: list[torch.Tensor]) -> torch.Tensor:
    tensor = torch.cat(tensors, dim=0) if len(tensors) > 1 else tensors[0]
    if link.heads:
        flat = tensor if link.output_projection else tensor.t()
        return flat.reshape(flat.shape[0], link.heads, -1).contiguous()
    return tensor.t().contiguous() if link.conv1d and tensor.dim() == 2 else tensor


def module_links(hf: str, ours: str, bias: bool = True, conv1d: bool = False) -> list[Link]:
    """weight (and bias) of one Linear / Embedding / norm."""
    return [Link(f"{hf}.{n}", (f"{ours}.{n}",), conv1d) for n in (("weight", "bias") if bias else ("weight",))]


def _attention(hf: str, ours: str, names: tuple[str, str, str, str], bias: bool) -> list[Link]:
    """Separate q, k, v, out projections (BERT query/key/value/output.dense, T5 q/k/v/o, BART *_proj)."""
    links = []
    for theirs, mine in zip(names, ("q_proj", "k_proj", "v_proj", "out_proj")):
        links += module_links(f"{hf}.{theirs}", f"{ours}.{mine}", bias)
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
    links = (module_links(f"transformer.{tok}", "tok_embeddings", bias=False)
             + module_links(f"transformer.{pos}", "pos_embeddings", bias=False))
    for i in range(cfg.n_layers):
        hf, ours = f"transformer.h.{i}", f"layers.{i}"
        links += module_links(f"{hf}.ln_1", f"{ours}.attn_norm")
        links += [Link(f"{hf}.attn.c_attn.{n}", tuple(f"{ours}.attn.{p}_proj.{n}" for p in "qkv"), conv1d=True)
                  for n in ("weight", "bias")]
        links += module_links(f"{hf}.attn.c_proj", f"{ours}.attn.out_proj", conv1d=True)
        links += module_links(f"{hf}.ln_2", f"{ours}.mlp_norm")
        links += module_links(f"{hf}.mlp.c_fc", f"{ours}.mlp.fc_in", conv1d=True)
        links += module_links(f"{hf}.mlp.c_proj", f"{ours}.mlp.fc_out", conv1d=True)
    links += [] if gpt1 else module_links("transformer.ln_f", "final_norm")
    return links + ([] if cfg.tie_embeddings else module_links("lm_head", "lm_head", bias=False))


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
    links = (module_links(f"{emb}.word_embeddings", "tok_embeddings", bias=False)
             + module_links(f"{emb}.position_embeddings", "pos_embeddings", bias=False)
             + module_links(f"{emb}.token_type_embeddings", "type_embeddings", bias=False)
             + module_links(f"{emb}.LayerNorm", "embedding_norm"))
    for i in range(cfg.n_layers):
        hf, ours = f"{base}.encoder.layer.{i}", f"layers.{i}"
        links += _attention(f"{hf}.attention", f"{ours}.attn", ("self.query", "self.key", "self.value",
                                                                "output.dense"), bias=True)
        links += module_links(f"{hf}.attention.output.LayerNorm", f"{ours}.attn_norm")
        links += module_links(f"{hf}.intermediate.dense", f"{ours}.mlp.fc_in")
        links += module_links(f"{hf}.output.dense", f"{ours}.mlp.fc_out")
        links += module_links(f"{hf}.output.LayerNorm", f"{ours}.mlp_norm")
    if base == "roberta":
        return links + (module_links("lm_head.dense", "mlm_head.dense") + module_links("lm_head.layer_norm", "mlm_head.norm")
                        + [Link("lm_head.bias", ("mlm_head.decoder.bias",))])
    links += (module_links("cls.predictions.transform.dense", "mlm_head.dense")
              + module_links("cls.predictions.transform.LayerNorm", "mlm_head.norm")
              + [Link("cls.predictions.bias", ("mlm_head.decoder.bias",))])
    if hf_class == "BertForPreTraining":
        links += module_links("bert.pooler.dense", "pooler.dense") + module_links("cls.seq_relationship", "nsp_head")
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
    links = module_links("shared", "tok_embeddings", bias=False)
    for stack, n_layers in (("encoder", cfg.n_layers), ("decoder", cfg.decoder_layers)):
        # one bias table per stack; Hugging Face keeps it in the first block's self-attention
        links.append(Link(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                          (f"{stack}.relative_bias.weight",)))
        for i in range(n_layers):
            hf, ours = f"{stack}.block.{i}.layer", f"{stack}.layers.{i}"
            links += _attention(f"{hf}.0.SelfAttention", f"{ours}.attn", ("q", "k", "v", "o"), bias=False)
            links += module_links(f"{hf}.0.layer_norm", f"{ours}.attn_norm", bias=False)
            ff = f"{hf}.1"
            if stack == "decoder":
                links += _attention(f"{hf}.1.EncDecAttention", f"{ours}.cross_attn", ("q", "k", "v", "o"), bias=False)
                links += module_links(f"{hf}.1.layer_norm", f"{ours}.cross_attn_norm", bias=False)
                ff = f"{hf}.2"
            links += module_links(f"{ff}.layer_norm", f"{ours}.mlp_norm", bias=False)
            if cfg.activation.startswith("gated_"):  # v1.1: act(wi_0 x) * wi_1 x
                links += (module_links(f"{ff}.DenseReluDense.wi_0", f"{ours}.mlp.fc_gate", bias=False)
                          + module_links(f"{ff}.DenseReluDense.wi_1", f"{ours}.mlp.fc_in", bias=False))
            else:
                links += module_links(f"{ff}.DenseReluDense.wi", f"{ours}.mlp.fc_in", bias=False)
            links += module_links(f"{ff}.DenseReluDense.wo", f"{ours}.mlp.fc_out", bias=False)
        links += module_links(f"{stack}.final_layer_norm", f"{stack}.final_norm", bias=False)
    return links + ([] if cfg.tie_embeddings else module_links("lm_head", "lm_head", bias=False))


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
    links = module_links("model.shared", "tok_embeddings", bias=False) + [Link("final_logits_bias", ("final_logits_bias",))]
    projections = ("q_proj", "k_proj", "v_proj", "out_proj")
    for stack, n_layers in (("encoder", cfg.n_layers), ("decoder", cfg.decoder_layers)):
        hf_stack = f"model.{stack}"
        links += (module_links(f"{hf_stack}.embed_positions", f"{stack}.pos_embeddings", bias=False)
                  + module_links(f"{hf_stack}.layernorm_embedding", f"{stack}.embedding_norm"))
        for i in range(n_layers):
            hf, ours = f"{hf_stack}.layers.{i}", f"{stack}.layers.{i}"
            links += _attention(f"{hf}.self_attn", f"{ours}.attn", projections, bias=True)
            links += module_links(f"{hf}.self_attn_layer_norm", f"{ours}.attn_norm")
            if stack == "decoder":
                links += _attention(f"{hf}.encoder_attn", f"{ours}.cross_attn", projections, bias=True)
                links += module_links(f"{hf}.encoder_attn_layer_norm", f"{ours}.cross_attn_norm")
            links += (module_links(f"{hf}.fc1", f"{ours}.mlp.fc_in") + module_links(f"{hf}.fc2", f"{ours}.mlp.fc_out")
                      + module_links(f"{hf}.final_layer_norm", f"{ours}.mlp_norm"))
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
    links = (module_links("transformer.word_embedding", "tok_embeddings", bias=False)
             + [Link("transformer.mask_emb", ("mask_emb",))])
    for i in range(cfg.n_layers):
        hf, ours = f"transformer.layer.{i}", f"layers.{i}"
        links += [Link(f"{hf}.rel_attn.{p}", (f"{ours}.attn.{p}_proj.weight",), heads=cfg.n_heads) for p in "qkvr"]
        links.append(Link(f"{hf}.rel_attn.o", (f"{ours}.attn.out_proj.weight",), heads=cfg.n_heads,
                          output_projection=True))
        links += [Link(f"{hf}.rel_attn.{n}", (f"{ours}.attn.{n}",))
                  for n in ("r_w_bias", "r_r_bias", "r_s_bias", "seg_embed")]
        links += module_links(f"{hf}.rel_attn.layer_norm", f"{ours}.attn_norm")
        links += (module_links(f"{hf}.ff.layer_1", f"{ours}.mlp.fc_in") + module_links(f"{hf}.ff.layer_2", f"{ours}.mlp.fc_out")
                  + module_links(f"{hf}.ff.layer_norm", f"{ours}.mlp_norm"))
    if hf_class == "XLNetForSequenceClassification":
        return links + module_links("sequence_summary.summary", "pooler.dense") + module_links("logits_proj", "classifier")
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
