"""Train a tiny model a few steps under a parallel layout, the same way the trainer does, and return what
a single-process run can be compared with: losses, grad norms and the full final parameters.

Used by the distributed tests (every layout x family against world size 1) and by the benchmarks. It
follows the contract exactly: build on meta -> parallelize -> to_empty + init_weights(seed) -> steps with
the loss summed and divided by the global batch's token count, so any dp split gives the same gradients."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from scaletrain.configs.schema import ModelConfig, ParallelConfig, TrainConfig, TrainerConfig
from scaletrain.parallel import (clip_grad_norm_, loss_context, materialize, padded_model_config, parallelize,
                                 shard_optimizer_state)
from scaletrain.parallel.dims import ParallelDims

# name -> ParallelConfig fields; the world size is the product of the degrees
LAYOUTS = {
    "single": {},
    "dp2_zero0": dict(dp_shard=2, zero=0),
    "dp2_zero1": dict(dp_shard=2, zero=1),
    "dp2_zero2": dict(dp_shard=2, zero=2),
    "dp2_zero3": dict(dp_shard=2, zero=3),
    "dp4_zero3": dict(dp_shard=4, zero=3),
    "hsdp2x2": dict(dp_replicate=2, dp_shard=2, zero=3),
    "tp2": dict(tp=2),
    "tp2_sp": dict(tp=2, sequence_parallel=True),
    "tp4": dict(tp=4),
    "dp2_tp2": dict(dp_shard=2, tp=2, zero=3),
    "dp2_tp2_sp_zero1": dict(dp_shard=2, tp=2, zero=1, sequence_parallel=True),
    "hsdp2x2_tp2": dict(dp_replicate=2, dp_shard=2, tp=2, zero=3),
}


def layout_config(name: str) -> ParallelConfig:
    fields = dict(dp_shard=1, **LAYOUTS[name]) if "dp_shard" not in LAYOUTS[name] else dict(LAYOUTS[name])
    return ParallelConfig(**fields)


def layout_world_size(name: str) -> int:
    p = layout_config(name)
    return p.dp_replicate * p.dp_shard * p.tp * p.pp * p.cp


@dataclass
class RunSpec:
    model: ModelConfig
    steps: int = 3
    global_batch: int = 4
    seq_len: int = 8
    seed: int = 7
    lr: float = 0.5
    momentum: float = 0.9
    max_norm: float = 1.0
    dtype: torch.dtype = torch.float64
    extra: dict = field(default_factory=dict)  # ParallelConfig overrides (offload, reduce_dtype, ...)
    activation_checkpointing: str = "none"
    precision: str = "fp32"  # bf16/fp16: FSDP2's MixedPrecisionPolicy (parameters cast for compute)


def make_batch(model_cfg: ModelConfig, spec: RunSpec, step: int) -> dict:
    """A fixed random global batch for `step`: identical on every rank, with ignored labels and padding."""
    g = torch.Generator().manual_seed(1000 * spec.seed + step)
    B, T, V = spec.global_batch, spec.seq_len, model_cfg.vocab_size

    def ids(*shape):
        return torch.randint(2, V, shape, generator=g)

    def labels(*shape, keep: float):
        values = ids(*shape)
        return values.masked_fill(torch.rand(shape, generator=g) > keep, -100)

    if model_cfg.family == "gpt":
        return {"input_ids": ids(B, T), "labels": labels(B, T, keep=0.9)}
    if model_cfg.family == "xlnet":  # the permutation LM's own batches (perm_mask, target_mapping)
        from scaletrain.data.objectives import synthetic_plm_batch

        return synthetic_plm_batch(B, T, V, int(torch.randint(0, 2**31, (1,), generator=g)))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, T - 2:] = 0  # one padded sequence exercises the attention mask
    if model_cfg.family == "bert":
        return {"input_ids": ids(B, T), "token_type_ids": (torch.arange(T) >= T // 2).long().expand(B, T).clone(),
                "attention_mask": mask, "labels": labels(B, T, keep=0.3),
                "next_sentence_label": torch.randint(0, 2, (B,), generator=g)}
    return {"input_ids": ids(B, T), "attention_mask": mask, "decoder_input_ids": ids(B, T),
            "labels": labels(B, T, keep=0.9)}


def _local_rows(batch: dict, dims: ParallelDims) -> dict:
    rows = batch["input_ids"].shape[0] // dims.dp_size
    start = dims.dp_rank * rows
    return {k: v[start:start + rows] for k, v in batch.items()}


def _as_plain(value: torch.Tensor) -> torch.Tensor:
    return value.full_tensor() if isinstance(value, DTensor) else value


def build_parallel_model(model_cfg: ModelConfig, parallel_cfg: ParallelConfig, world_size: int,
                         dtype: torch.dtype = torch.float32, seed: int = 0, seq_len: int = 8,
                         global_batch: int = 4, device: str = "cpu", activation_checkpointing: str = "none",
                         precision: str = "fp32"):
    """(model, dims, cfg): the layout applied on meta, then materialized and initialized on `device`
    (device="meta" skips materializing)."""
    from scaletrain.models.registry import build_model

    dims = ParallelDims.from_config(parallel_cfg, world_size)
    dims.build_mesh("cpu")
    model_cfg = padded_model_config(model_cfg, dims.tp)
    trainer = TrainerConfig(global_batch=global_batch, micro_batch=global_batch // dims.dp_size, seq_len=seq_len,
                            activation_checkpointing=activation_checkpointing)
    cfg = TrainConfig(model=model_cfg, parallel=parallel_cfg, trainer=trainer, precision=precision)
    model = build_model(model_cfg, "meta").to(dtype)
    parallelize(model, dims, cfg)
    if device != "meta":
        materialize(model, device, seed)
    return model, dims, cfg


class LayoutRun:
    """One model + SGD optimizer under a layout, stepped on the fixed batches; can save/load with DCP."""

    def __init__(self, model_cfg: ModelConfig, layout: str, world_size: int, spec: RunSpec | None = None):
        from scaletrain.models.registry import get_spec

        self.spec = spec or RunSpec(model_cfg)
        self.model_cfg = model_cfg
        parallel_cfg = replace(layout_config(layout), **self.spec.extra)
        self.model, self.dims, _ = build_parallel_model(
            model_cfg, parallel_cfg, world_size, self.spec.dtype, self.spec.seed, self.spec.seq_len,
            self.spec.global_batch, activation_checkpointing=self.spec.activation_checkpointing,
            precision=self.spec.precision)
        self.family = get_spec(model_cfg.family)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=self.spec.lr, momentum=self.spec.momentum)
        shard_optimizer_state(self.optimizer, self.model, self.dims)

    def step(self, step: int) -> tuple[float, float]:
        """One optimizer step on batch `step`; returns (global loss, global grad norm before clipping)."""
        dims, model = self.dims, self.model
        batch = make_batch(self.model_cfg, self.spec, step)
        global_count = _label_count(batch)
        local = _local_rows(batch, dims)
        with loss_context(dims):
            outputs = model(**{k: local[k] for k in self.family.input_keys if k in local})
            loss_sum, _ = self.family.loss_fn(outputs, local)
            loss = loss_sum / global_count
        loss.backward()
        loss = _as_plain(loss).detach().clone()
        if dims.dp_enabled:
            dist.all_reduce(loss, group=dims.dp_mesh_flat.get_group())
        if dims.world_size == 1:  # the reference uses torch's own clipping, independent of ours
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), self.spec.max_norm)
        else:
            norm = clip_grad_norm_(model, self.spec.max_norm, dims)
        self.optimizer.step()
        self.optimizer.zero_grad()
        return loss.item(), norm.item()

    def full_params(self) -> dict:
        return {name: _as_plain(p.detach()).clone() for name, p in self.model.named_parameters()}

    def full_optimizer_state(self) -> dict:
        """{parameter name: {state name: full tensor}} through DCP's FQN-keyed optimizer state dict."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        state = get_optimizer_state_dict(self.model, self.optimizer)["state"]
        return {fqn: {k: _as_plain(v).clone() for k, v in values.items() if torch.is_tensor(v)}
                for fqn, values in state.items()}

    def save(self, path: str) -> None:
        from scaletrain.checkpoint.reshard import save_model_and_optimizer

        save_model_and_optimizer(path, self.model, self.optimizer)

    def load(self, path: str) -> None:
        from scaletrain.checkpoint.reshard import load_model_and_optimizer

        load_model_and_optimizer(path, self.model, self.optimizer)


def run_layout(model_cfg: ModelConfig, layout: str, world_size: int, spec: RunSpec | None = None) -> dict:
    """Trains spec.steps SGD steps under `layout`; returns {"losses", "grad_norms", "params"} (params full)."""
    run = LayoutRun(model_cfg, layout, world_size, spec)
    losses, grad_norms = zip(*(run.step(step) for step in range(run.spec.steps)))
    return {"losses": list(losses), "grad_norms": list(grad_norms), "params": run.full_params()}


def _label_count(batch: dict) -> int:
    count = int((batch["labels"] != -100).sum())
    if "next_sentence_label" in batch:
        count += batch["next_sentence_label"].numel()  # NSP: one more predicted position per sequence
    return count


def run_layouts_on_rank(rank: int, world_size: int, cases: list, spec_kwargs: dict):
    """run_on_ranks entry: several (model config, layout) cases of one world size in one launch; rank 0
    returns {(model name, layout): result}, the other ranks None."""
    results = {}
    for model_cfg, layout in cases:
        result = run_layout(model_cfg, layout, world_size, RunSpec(model_cfg, **spec_kwargs))
        results[(model_cfg.name, layout)] = result
    return results if rank == 0 else None
