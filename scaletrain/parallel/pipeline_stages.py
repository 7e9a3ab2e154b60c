"""Stage modules that torch.distributed.pipelining.PipelineStage drives: tensors in, tensors out.

`build_stage_module(model, plan)` deletes from a copy of `model` what the stage does not own and wraps what
is left. Inputs the first stage takes as positional arguments (token ids) are micro-batched and fed to it
alone; keyword arguments (masks, token types, decoder ids) go to every stage of every rank, so each stage
builds its own attention bias. What travels between stages:
- GPT, BERT: the residual stream x (B, T, D);
- encoder-decoder, encoder not finished: (enc (B, S, D), dec (B, T, D)) plus, with T5 relative positions,
  (enc_bias (1, H, S, S), dec_bias (1, H, T, T)); the decoder stream rides along untouched;
- encoder-decoder, encoder finished: (memory (B, S, D), dec (B, T, D)) plus dec_bias with T5, so every
  decoder stage cross-attends to the same encoder output;
- XLNet: the content stream h (B, T, D) and, with a target_mapping, the query stream g (B, M, D); each stage
  rebuilds the relative positions and masks from the batch. Training carries no memory across segments
  (the schema refuses model.mem_len > 0 with pp), so no `mems` travel.
The last stage returns what the model's forward returns (logits, or BERT's (mlm, nsp) logits)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from scaletrain.configs.schema import ModelConfig
from scaletrain.errors import ConfigError
from scaletrain.models.bert import BERT
from scaletrain.models.blocks import attention_bias, mask_backend, position_ids
from scaletrain.models.init import init_model_weights
from scaletrain.models.xlnet import XLNet
from scaletrain.parallel.pipeline_split import StagePlan

# where each family keeps its output head; with tied embeddings its weight is the token table
HEAD_WEIGHT = {"gpt": "lm_head.weight", "bert": "mlm_head.decoder.weight", "encdec": "lm_head.weight",
               "xlnet": "lm_head.weight"}


def _prune(model: nn.Module, plan: StagePlan) -> nn.Module:
    """Delete, in place, every module of `model` the stage does not own (set to None / removed from the
    layer ModuleDicts), so the names of the survivors are unchanged."""
    cfg: ModelConfig = model.cfg
    for stack, keys in plan.layer_keys(cfg.family).items():
        layers = model.layers if stack == "layers" else getattr(model, stack).layers
        for key in [k for k in layers.keys() if k not in keys]:
            del layers[key]
    if not plan.is_first:
        model.tok_embeddings = None
        for owner in (model,) if cfg.family != "encdec" else (model.encoder, model.decoder):
            for name in ("pos_embeddings", "type_embeddings", "embedding_norm", "relative_bias", "mask_emb"):
                if hasattr(owner, name):
                    setattr(owner, name, None)
    if not plan.is_last:
        for name in ("final_norm", "lm_head", "pooler", "mlm_head", "nsp_head", "classifier"):
            if hasattr(model, name):
                setattr(model, name, None)
        if cfg.family == "encdec":
            model.decoder.final_norm = None
            model.final_logits_bias = None
    if cfg.family == "encdec" and not (plan.encoder_done_after and plan.start < plan.n_encoder):
        model.encoder.final_norm = None  # only the stage holding the last encoder layer applies it
    return model


class StageModule(nn.Module):
    """Adopts a pruned model's children, parameters and buffers under their original names."""

    def __init__(self, model: nn.Module, plan: StagePlan):
        super().__init__()
        self.cfg: ModelConfig = model.cfg
        self.plan = plan
        # deleted modules stay registered as None, so a stage's forward can test `self.pooler is None`
        for name, child in model._modules.items():
            self.add_module(name, child)
        for name, param in model._parameters.items():
            self.register_parameter(name, param)
        for name, buffer in model._buffers.items():
            self.register_buffer(name, buffer, persistent=name not in model._non_persistent_buffers_set)
        for name, value in vars(model).items():  # plain attributes: embed_scale, optional heads set to None
            if not name.startswith("_") and not hasattr(self, name):
                setattr(self, name, value)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        # the same (seed, parameter name) draws as the full model: a stage gets the single-process values
        init_model_weights(self, self.cfg, seed)
        if getattr(self, "final_logits_bias", None) is not None:
            self.final_logits_bias.zero_()  # BART's (1, V) buffer starts at zero; to_empty() left it garbage


class GPTStage(StageModule):
    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.plan.is_first:  # x: token ids (B, T)
            ids = x
            x = self.tok_embeddings(ids)
            if self.pos_embeddings is not None:
                x = x + self.pos_embeddings(position_ids(ids, self.cfg))
            x = self.dropout(x)
        T = x.shape[1]
        bias = attention_bias(attention_mask, True, T, T, x.dtype, x.device,
                              backend=mask_backend(self.cfg, x.device, self.training))
        for layer in self.layers.values():
            x = layer(x, bias=bias, is_causal=True)
        if not self.plan.is_last:
            return x.contiguous()  # (B, T, D); gloo sends only contiguous tensors
        if self.final_norm is not None:
            x = self.final_norm(x)
        return self.lm_head(x)  # (B, T, V)


class BERTStage(StageModule):
    def forward(self, x: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None):
        if self.plan.is_first:
            x = self.embed(x, token_type_ids)
        T = x.shape[1]
        bias = attention_bias(attention_mask, False, T, T, x.dtype, x.device,
                              backend=mask_backend(self.cfg, x.device, self.training))
        for layer in self.layers.values():
            x = layer(x, bias=bias)
        if not self.plan.is_last:
            return x.contiguous()
        if self.final_norm is not None:
            x = self.final_norm(x)
        if self.nsp_head is None:
            return self.mlm_head(x)  # (B, T, V)
        return self.mlm_head(x), self.nsp_head(self.pooler(x))  # (B, T, V), (B, 2)

    embed = BERT.embed  # the first stage owns the same embedding modules under the same names


class EncoderDecoderStage(StageModule):
    @property
    def relative(self) -> bool:
        return self.cfg.position == "relative"

    def embed(self, stack: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok_embeddings(ids) * self.embed_scale  # (B, T, D)
        if stack.pos_embeddings is not None:
            x = x + stack.pos_embeddings(position_ids(ids, self.cfg))
        if stack.embedding_norm is not None:
            x = stack.embedding_norm(x)
        return stack.dropout(x)

    def forward(self, *stream: torch.Tensor, decoder_input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, decoder_attention_mask: torch.Tensor | None = None):
        plan = self.plan
        enc_bias = dec_bias = None
        if plan.is_first:  # stream: (input_ids (B, S),)
            if decoder_input_ids is None:
                raise ConfigError("an encoder-decoder pipeline needs decoder_input_ids in every batch")
            ids = stream[0]
            enc, dec = self.embed(self.encoder, ids), self.embed(self.decoder, decoder_input_ids)
            if self.relative:
                enc_bias = self.encoder.relative_bias(enc.shape[1], enc.shape[1])  # (1, H, S, S)
                dec_bias = self.decoder.relative_bias(dec.shape[1], dec.shape[1])  # (1, H, T, T)
        elif plan.encoder_done_before:
            enc, dec = stream[0], stream[1]
            dec_bias = stream[2] if self.relative else None
        else:
            enc, dec = stream[0], stream[1]
            enc_bias, dec_bias = (stream[2], stream[3]) if self.relative else (None, None)

        if plan.start < plan.n_encoder:  # this stage runs encoder layers
            S = enc.shape[1]
            bias = attention_bias(attention_mask, False, S, S, enc.dtype, enc.device, enc_bias,
                                  backend=mask_backend(self.cfg, enc.device, self.training))
            for layer in self.encoder.layers.values():
                enc = layer(enc, bias=bias)
            if plan.encoder_done_after:
                if self.encoder.final_norm is not None:
                    enc = self.encoder.final_norm(enc)
                if self.relative:  # T5 drops out after the final norm
                    enc = self.encoder.dropout(enc)
        if plan.end > plan.n_encoder:  # this stage runs decoder layers
            dec = self._decode(dec, enc, dec_bias, attention_mask, decoder_attention_mask)

        if plan.is_last:
            return self._head(dec)
        # gloo sends only contiguous tensors (the T5 biases come out of a permute)
        if plan.encoder_done_after:
            stream = (enc, dec, dec_bias) if self.relative else (enc, dec)
        else:
            stream = (enc, dec, enc_bias, dec_bias) if self.relative else (enc, dec)
        return tuple(t.contiguous() for t in stream)

    def _decode(self, dec, memory, dec_bias, attention_mask, decoder_attention_mask) -> torch.Tensor:
        T, S = dec.shape[1], memory.shape[1]
        backend = mask_backend(self.cfg, dec.device, self.training)
        bias = attention_bias(decoder_attention_mask, True, T, T, dec.dtype, dec.device, dec_bias, backend=backend)
        memory_bias = None
        if attention_mask is not None:
            memory_bias = attention_bias(attention_mask, False, T, S, dec.dtype, dec.device, backend=backend)
        for layer in self.decoder.layers.values():
            dec = layer(dec, bias=bias, is_causal=True, memory=memory, memory_bias=memory_bias)
        return dec

    def _head(self, dec: torch.Tensor) -> torch.Tensor:
        if self.decoder.final_norm is not None:
            dec = self.decoder.final_norm(dec)
        if self.relative:
            dec = self.decoder.dropout(dec)
        if self.cfg.scale_decoder_output:
            dec = dec * self.cfg.d_model**-0.5  # T5 v1.0 rescales before the tied lm_head
        logits = self.lm_head(dec)  # (B, T, V)
        return logits + self.final_logits_bias if self.final_logits_bias is not None else logits


class XLNetStage(StageModule):
    def forward(self, *stream: torch.Tensor, token_type_ids=None, attention_mask=None, perm_mask=None,
                target_mapping=None):
        if self.plan.is_first:  # stream: (input_ids (B, T),)
            h, g = self.embed(stream[0], target_mapping)
        else:  # (h (B, T, D), g (B, M, D)), or (h,) without a target_mapping
            h, g = stream[0], (stream[1] if len(stream) > 1 else None)
        # with dropout on, each stage draws its own mask for the positions (one process: one for all layers)
        inputs = self.layer_inputs(h, token_type_ids, attention_mask, perm_mask)
        h, g, _ = self.run_layers(h, g, inputs, target_mapping=target_mapping)
        if not self.plan.is_last:
            return h.contiguous() if g is None else (h.contiguous(), g.contiguous())
        return self.lm_head(self.dropout(g if g is not None else h))  # (B, M, V), or (B, T, V)

    # the first stage owns tok_embeddings and mask_emb under the same names; every stage the layers
    embed, layer_inputs, run_layers, cache = XLNet.embed, XLNet.layer_inputs, XLNet.run_layers, XLNet.cache


STAGE_CLASSES = {"gpt": GPTStage, "bert": BERTStage, "encdec": EncoderDecoderStage, "xlnet": XLNetStage}


def build_stage_module(model: nn.Module, plan: StagePlan) -> StageModule:
    """A stage of `model` (left intact: a deep copy is pruned; on meta the copy costs nothing)."""
    cfg: ModelConfig = model.cfg
    if cfg.num_labels > 0:
        raise ConfigError("pipeline parallelism trains the LM objectives; classification finetuning "
                          "(model.num_labels > 0) needs parallel.pp=1")
    return STAGE_CLASSES[cfg.family](_prune(copy.deepcopy(model), plan), plan)
