"""Weight initialization that does not depend on the layout.

Every parameter is drawn in full on the CPU from a generator seeded by (seed, parameter name), then written
into the parameter by `write_full_`. A pipeline stage, a tensor-parallel shard or a model built in another
order therefore gets exactly the values the single-device model has under the same names."""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn

from scaletrain.configs.schema import ModelConfig
from scaletrain.models.blocks import Norm, RelativePositionBias

# parameters tied to the token embeddings are drawn under the embedding's name, so a pipeline stage that
# holds only the head (tok_embeddings deleted) still initializes the shared weight identically
TIED_TO_EMBEDDINGS = ("lm_head.weight", "mlm_head.decoder.weight")


def param_generator(seed: int, name: str) -> torch.Generator:
    generator = torch.Generator(device="cpu")
    generator.manual_seed((seed * 0x9E3779B1 + zlib.crc32(name.encode())) % (2**63 - 1))
    return generator


def _local_shard(full: torch.Tensor, mesh, placements) -> torch.Tensor:
    """The piece of `full` this rank holds under DTensor placements (Shard follows torch.chunk, as DTensor does)."""
    coordinate = mesh.get_coordinate()
    # FSDP over tensor parallel marks its dim-0 shard "strided" (split_factor > 1): it chunks the TP shard,
    # so it is applied after the plain Shard placements of the later mesh dims.
    order = sorted(range(len(placements)), key=lambda d: getattr(placements[d], "split_factor", 1) > 1)
    for mesh_dim in order:
        placement = placements[mesh_dim]
        if placement.is_replicate():
            continue
        if not (placement.is_shard() or hasattr(placement, "split_factor")):
            raise ValueError(f"cannot initialize a parameter with placement {placement}; expected Shard or Replicate")
        chunks = torch.chunk(full, mesh.size(mesh_dim), dim=placement.dim)
        index = coordinate[mesh_dim]
        full = chunks[index] if index < len(chunks) else full.narrow(placement.dim, 0, 0)
    return full


@torch.no_grad()
def write_full_(param: torch.Tensor, full: torch.Tensor) -> None:
    """The one place a full-size tensor becomes a parameter's value. DTensor parameters are recognised by
    duck typing (device_mesh + placements; models/ never imports torch.distributed) and get their shard."""
    if hasattr(param, "device_mesh") and hasattr(param, "placements"):
        if param.device_mesh.get_coordinate() is None:
            return  # this rank holds no piece of the parameter
        local = param.to_local()
        local.copy_(_local_shard(full, param.device_mesh, param.placements).to(local.device, local.dtype))
        return
    param.copy_(full.to(device=param.device, dtype=param.dtype))


def _t5_std(leaf: str, cfg: ModelConfig) -> float:
    """Mesh-TensorFlow factors (HF T5 with initializer_factor 1): the 1/sqrt(d_head) attention scaling is
    folded into q_proj, so T5 attention runs unscaled."""
    inner = cfg.n_heads * cfg.head_dim
    return {"q_proj": (cfg.d_model * cfg.head_dim) ** -0.5, "k_proj": cfg.d_model**-0.5,
            "v_proj": cfg.d_model**-0.5, "out_proj": inner**-0.5, "fc_in": cfg.d_model**-0.5,
            "fc_gate": cfg.d_model**-0.5, "fc_out": cfg.ffn_dim**-0.5, "lm_head": 1.0}.get(leaf, cfg.d_model**-0.5)


def _draw(name: str, module: nn.Module, shape: torch.Size, cfg: ModelConfig,
          generator: torch.Generator) -> torch.Tensor:
    """Full fp32 value of one parameter according to the family's reference initialization."""
    leaf = name.rsplit(".", 2)[-2] if "." in name else name  # owning module's attribute name
    scheme, std = cfg.init_scheme, cfg.init_std
    if isinstance(module, Norm):
        return torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
    # a parameter named "bias" (XLNet's per-head r_w_bias / r_r_bias / r_s_bias are drawn like weights)
    if name.rsplit(".", 1)[-1] == "bias" and not isinstance(module, RelativePositionBias):
        return torch.zeros(shape)
    if isinstance(module, RelativePositionBias):
        std = cfg.d_model**-0.5 if scheme == "t5" else std
    elif isinstance(module, nn.Embedding) or name == "tok_embeddings.weight":
        std = {"t5": 1.0, "xavier": cfg.d_model**-0.5}.get(scheme, std)
    elif scheme == "t5":
        std = _t5_std(leaf, cfg)
    elif scheme == "xavier" and len(shape) == 2:  # fairseq Transformer: xavier-uniform linears
        bound = math.sqrt(6.0 / (shape[0] + shape[1]))
        return torch.empty(shape).uniform_(-bound, bound, generator=generator)
    elif scheme == "gpt2" and leaf in ("out_proj", "fc_out"):
        std = std / math.sqrt(2 * cfg.n_layers)  # GPT-2: two residual additions per layer
    value = torch.empty(shape).normal_(0.0, std, generator=generator)
    # BERT/RoBERTa/BART/fairseq zero the padding row; GPT and XLNet tables have no padding index
    zero_pad_row = cfg.family not in ("gpt", "xlnet") and scheme != "t5"
    if (zero_pad_row and name == "tok_embeddings.weight") or (cfg.positions_from_padding and leaf == "pos_embeddings"):
        value[cfg.pad_token_id] = 0.0
    return value


def retie_embeddings(model: nn.Module) -> None:
    """A plain `to_empty()` from meta gives each module a new Parameter, silently untying the head from the
    token table; tie them again. Sharded (DTensor) parameters are left to the parallel code that owns them."""
    table = getattr(model, "tok_embeddings", None)
    heads = [getattr(model, "lm_head", None), getattr(getattr(model, "mlm_head", None), "decoder", None)]
    for head in heads:
        if table is None or head is None or head.weight is table.weight or hasattr(table.weight, "device_mesh"):
            continue
        head.weight = table.weight


@torch.no_grad()
def init_model_weights(model: nn.Module, cfg: ModelConfig, seed: int) -> None:
    """Fill every parameter of `model` (after `to_empty()`), then recreate its computed buffers."""
    if cfg.tie_embeddings:
        retie_embeddings(model)
    seen = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if param is None or id(param) in seen:
                continue
            seen.add(id(param))
            name = f"{module_name}.{param_name}" if module_name else param_name
            if cfg.tie_embeddings and name in TIED_TO_EMBEDDINGS:
                name = "tok_embeddings.weight"
            full = _draw(name, module, param.shape, cfg, param_generator(seed, name))
            write_full_(param, full)
    for module in model.modules():
        reset = getattr(module, "reset_buffers", None)
        if reset is not None:
            reset()
