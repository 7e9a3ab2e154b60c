"""Pipeline parallelism on torch.distributed.pipelining: stage split, schedules, tied embeddings.

How parallelize and the trainer use it:
    model = pipeline_split(model, dims, cfg)        # parallelize step 1: a PipelineModel of this rank's stages
    for stage in model.stages: TP, activation checkpointing, compile, FSDP   # steps 2-5, per stage module
    materialize(model, device, seed)                # original parameter names: optimizer, DCP, clipping
    pipe = build_pipeline(model.stages, model_cfg, cfg.parallel, n_microbatches(cfg.trainer, dims.dp_size), dims)
    loss_sum, scored = pipe.forward_backward(micro_batches, global_targets)  # the trainer's pp branch

The loss of a micro-batch is its summed cross-entropy divided by the token count of the whole global batch,
and the schedule does not rescale gradients, so accumulated gradients equal the single-process ones exactly
(under any dp, as the data-parallel wrappers sum rather than average)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining import schedules as pp_schedules

from scaletrain.configs.schema import ModelConfig, ParallelConfig, TrainerConfig
from scaletrain.errors import ConfigError
from scaletrain.models.registry import get_spec
from scaletrain.parallel.pipeline_split import V_SHAPED_SCHEDULES, local_stage_indices, stage_plans, stage_to_rank
from scaletrain.parallel.pipeline_stages import HEAD_WEIGHT, StageModule, build_stage_module

SCHEDULE_CLASSES = {
    "gpipe": pp_schedules.ScheduleGPipe,
    "1f1b": pp_schedules.Schedule1F1B,
    "interleaved_1f1b": pp_schedules.ScheduleInterleaved1F1B,
    "looped_bfs": pp_schedules.ScheduleLoopedBFS,
    "interleaved_zb": pp_schedules.ScheduleInterleavedZeroBubble,
    "zbv": pp_schedules.ScheduleZBVZeroBubble,
    "dualpipev": pp_schedules.ScheduleDualPipeV,
}
SINGLE_STAGE_SCHEDULES = ("gpipe", "1f1b")
# batch keys every stage receives as keyword arguments (masks, token types, decoder ids), per family
STAGE_KWARGS = {"gpt": ("attention_mask",), "bert": ("token_type_ids", "attention_mask"),
                "encdec": ("decoder_input_ids", "attention_mask", "decoder_attention_mask"),
                "xlnet": ("token_type_ids", "attention_mask", "perm_mask", "target_mapping")}


def n_microbatches(trainer: TrainerConfig, dp_size: int) -> int:
    """Micro-batches per step: this dp rank's share of the global batch in micro_batch-sized pieces."""
    per_rank = trainer.global_batch // dp_size
    if trainer.global_batch % dp_size or per_rank % trainer.micro_batch:
        raise ConfigError(f"trainer.global_batch={trainer.global_batch} is not divisible by trainer.micro_batch x dp"
                          f" = {trainer.micro_batch} x {dp_size}; change global_batch or micro_batch")
    return per_rank // trainer.micro_batch


def validate_schedule(parallel: ParallelConfig, n_micro: int) -> None:
    """torch 2.13's rules for each schedule, checked before any process group exists."""
    name, pp, v = parallel.pp_schedule, parallel.pp, parallel.pp_virtual
    stages = pp * v
    if name in SINGLE_STAGE_SCHEDULES and v != 1:
        raise ConfigError(f"parallel.pp_schedule={name} runs one stage per rank but parallel.pp_virtual={v}; "
                          f"set pp_virtual=1 or pick interleaved_1f1b / looped_bfs / interleaved_zb")
    if name in V_SHAPED_SCHEDULES and v != 2:
        raise ConfigError(f"parallel.pp_schedule={name} needs exactly 2 virtual stages per rank; "
                          f"set parallel.pp_virtual=2 (it is {v})")
    if name == "1f1b" and n_micro < pp:
        raise ConfigError(f"1F1B needs at least parallel.pp={pp} micro-batches but the batch gives {n_micro}; "
                          f"raise trainer.global_batch or lower trainer.micro_batch")
    if name == "dualpipev" and n_micro < stages:
        raise ConfigError(f"DualPipeV needs at least as many micro-batches as stages ({stages}) but the batch "
                          f"gives {n_micro}; raise trainer.global_batch or lower trainer.micro_batch")
    if name in ("interleaved_1f1b", "interleaved_zb"):
        rounds = max(1, n_micro // pp)  # the schedule runs micro-batches in rounds of about pp
        if n_micro % rounds:
            raise ConfigError(f"parallel.pp_schedule={name} needs the micro-batch count ({n_micro}) to be a "
                              f"multiple of its {rounds} rounds (n // pp={pp}); use a multiple of pp micro-batches")


def split_model(model: nn.Module, model_cfg: ModelConfig, parallel: ParallelConfig, pp_rank: int) -> list[StageModule]:
    """This pp rank's stage modules, in stage order."""
    plans = stage_plans(model_cfg, parallel)
    return [build_stage_module(model, plans[s]) for s in local_stage_indices(pp_rank, parallel)]


def _merge(modules: list[nn.Module]) -> nn.Module:
    """One module tree over several with disjoint parameters: children of the same name are merged
    recursively (ModuleDicts stay ModuleDicts), so every parameter keeps its name."""
    merged = nn.ModuleDict() if all(isinstance(m, nn.ModuleDict) for m in modules) else nn.Module()
    for module in modules:
        for name, param in module._parameters.items():
            if param is not None:
                merged.register_parameter(name, param)
        for name, buffer in module._buffers.items():
            if buffer is not None:
                merged.register_buffer(name, buffer, persistent=name not in module._non_persistent_buffers_set)
    names = list(dict.fromkeys(name for module in modules for name, child in module._modules.items()
                               if child is not None))
    for name in names:
        children = [m._modules[name] for m in modules if m._modules.get(name) is not None]
        merged.add_module(name, children[0] if len(children) == 1 else _merge(children))
    return merged


class PipelineModel(nn.Module):
    """This rank's stages seen as one model with the whole model's parameter names: what the optimizer,
    checkpoints (DCP), gradient clipping and materialization use. It shares every submodule with
    `stages`, which the pipeline schedule runs; it has no forward of its own."""

    def __init__(self, stages: list[StageModule]):
        super().__init__()
        merged = _merge(stages)
        for name, child in merged._modules.items():
            self.add_module(name, child)
        for name, param in merged._parameters.items():
            self.register_parameter(name, param)
        for name, buffer in merged._buffers.items():
            self.register_buffer(name, buffer, persistent=name not in merged._non_persistent_buffers_set)
        self.__dict__["stages"] = list(stages)  # a plain list: no second name for the same parameters

    def _sync_root_tensors(self, to_stages: bool) -> None:
        """Tensors registered on a stage's root (BART's final_logits_bias) sit in two registries, the
        stage's and this view's: TP replaces the stage's, to_empty()/to() this view's; copy the newer over."""
        for stage in self.stages:
            for registry, mine in ((stage._buffers, self._buffers), (stage._parameters, self._parameters)):
                for name, tensor in registry.items():
                    if tensor is not None and name in mine:
                        if to_stages:
                            registry[name] = mine[name]
                        else:
                            mine[name] = tensor

    def _apply(self, fn, recurse=True):
        self._sync_root_tensors(to_stages=False)
        super()._apply(fn, recurse)
        self._sync_root_tensors(to_stages=True)
        return self

    def init_weights(self, seed: int = 0) -> None:
        self._sync_root_tensors(to_stages=False)
        for stage in self.stages:
            stage.init_weights(seed)

    def train(self, mode: bool = True) -> "PipelineModel":
        for stage in self.stages:
            stage.train(mode)
        return super().train(mode)

    def forward(self, *args, **kwargs):
        raise RuntimeError("a pipeline-parallel model runs through its schedule: use Pipeline.forward_backward")

    def checkpoint_aliases(self) -> dict[str, str]:
        """{name here: name to read it from}: the last stage's head is its own copy of the tied token
        table, which a checkpoint saved without pipeline stages holds (weights and optimizer state) only
        under tok_embeddings.weight."""
        cfg = self.stages[0].cfg
        head = HEAD_WEIGHT[cfg.family]
        names = {name for name, _ in self.named_parameters()}
        return {head: "tok_embeddings.weight"} if cfg.tie_embeddings and head in names else {}


def pipeline_split(model: nn.Module, dims, cfg) -> PipelineModel:
    """Step 1 of parallelize when pp > 1: this rank's stages of the meta model. Apply TP, activation
    checkpointing, compile and data parallelism to each of `result.stages` (FSDP's root must be the stage
    module the schedule calls), then materialize the PipelineModel."""
    pp_rank = dims.mesh["pp"].get_local_rank()
    return PipelineModel(split_model(model, model.cfg, cfg.parallel, pp_rank))  # model.cfg: the padded vocab


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class TiedEmbeddings:
    """The token table on the first stage and the head weight on the last are two copies of one tied
    parameter. After every backward their gradients are summed over the ranks holding them (and the local
    copies, when a V schedule puts both on one rank), so identical weights stay identical under any
    optimizer. Copies under TP / FSDP are sharded the same way (vocab rows, dp shards): local shards add."""

    def __init__(self, modules: list[StageModule], model_cfg: ModelConfig, parallel: ParallelConfig, mesh):
        n_stages = parallel.pp * parallel.pp_virtual
        self.copies: list[nn.Parameter] = []
        self.group = None
        if not model_cfg.tie_embeddings or n_stages == 1:
            return
        for module in modules:
            params = dict(module.named_parameters())
            name = "tok_embeddings.weight" if module.plan.is_first else HEAD_WEIGHT[model_cfg.family]
            if (module.plan.is_first or module.plan.is_last) and name in params:
                self.copies.append(params[name])
                # a global gradient norm must count the tied weight once: it skips the head's copy
                params[name].pipeline_tied_copy = not module.plan.is_first
        first = stage_to_rank(0, parallel.pp, parallel.pp_schedule)
        last = stage_to_rank(n_stages - 1, parallel.pp, parallel.pp_schedule)
        if first == last:
            return  # both copies live on this rank (or on another rank of its dp/tp coordinate): no group
        # every rank creates every pair group, in the same order (new_group is collective over the world)
        pp_dim = mesh.mesh_dim_names.index("pp")
        rows = mesh.mesh.movedim(pp_dim, 0).reshape(parallel.pp, -1).T  # (other coordinates, pp) global ranks
        me = dist.get_rank()
        for row in rows.tolist():
            group = dist.new_group([row[first], row[last]])
            if me in (row[first], row[last]):
                self.group = group

    @torch.no_grad()
    def all_reduce_grads(self) -> None:
        for param in self.copies:
            # TP's embedding backward may leave a Replicate gradient on a vocab-sharded table: lay it out as
            # the parameter is, so the two copies' local pieces cover the same rows
            grad = param.grad
            if grad is not None and hasattr(grad, "placements") and grad.placements != param.placements:
                param.grad = grad.redistribute(param.device_mesh, param.placements)
        grads = [_local(p.grad) for p in self.copies if p.grad is not None]
        if not grads:
            return
        total = grads[0].clone()
        for grad in grads[1:]:
            total += grad
        if self.group is not None:
            dist.all_reduce(total, group=self.group)
        for grad in grads:
            grad.copy_(total)


@dataclass
class Pipeline:
    """This rank's stages and the schedule driving them; `step` runs one optimizer step's micro-batches."""

    modules: list[StageModule]
    stages: list[PipelineStage]
    schedule: object
    tied: TiedEmbeddings
    pp_group: object
    family: str
    loss_fn: object
    vocab_parallel: bool = False  # tp > 1: the last stage's logits are vocab-sharded DTensors
    schedule_name: str = "1f1b"

    def __post_init__(self) -> None:
        self._gradient_scale = 1.0
        self._row_scores = None  # evaluate_rows: (output, labels) -> (b,) per-row scores instead of the loss
        self._forward_only_order = None  # V schedules' evaluation order, lowered with its communication

    @property
    def has_last_stage(self) -> bool:
        return any(m.plan.is_last for m in self.modules)

    def micro_batch_loss(self, output, target: torch.Tensor) -> torch.Tensor:
        """The schedule's loss_fn: summed cross-entropy of one micro-batch x gradient scale (1 / the global
        batch's target count, times the fp16 loss scale); under evaluate_rows, the micro-batch's (b,) row scores."""
        if self._row_scores is not None:
            return self._row_scores(output, target)
        if self.family == "bert":
            outputs = output if isinstance(output, tuple) else (output, None)
            batch = {"labels": target}
            if outputs[1] is not None:  # target packs (labels (b, T), next_sentence_label (b,)) as (b, T + 1)
                batch = {"labels": target[:, :-1], "next_sentence_label": target[:, -1]}
            loss_sum, _ = self.loss_fn(outputs, batch)
        else:
            loss_sum, _ = self.loss_fn(output, {"labels": target})
        return loss_sum * self._gradient_scale

    def _inputs(self, batch: dict) -> tuple[tuple, dict, torch.Tensor]:
        kwargs = {k: batch[k] for k in STAGE_KWARGS[self.family] if batch.get(k) is not None}
        target = batch["labels"]
        if self.family == "bert" and "next_sentence_label" in batch and self.modules[0].cfg.nsp_head:
            target = torch.cat([target, batch["next_sentence_label"][:, None].to(target.dtype)], dim=1)
        return (batch["input_ids"],), kwargs, target

    def _schedule_call(self, batch: dict, train: bool, context) -> tuple[list[torch.Tensor], torch.Tensor]:
        """-> (the loss_fn result of each micro-batch, in micro-batch order, on the last stage; the target)."""
        args, kwargs, target = self._inputs(batch)
        losses: list[torch.Tensor] = []
        with self._loss_context(), (context or contextlib.nullcontext()):
            if train:
                self.schedule.step(*args, target=target, losses=losses, return_outputs=False, **kwargs)
            else:
                self.schedule.eval(*args, target=target, losses=losses, **kwargs)
        if train:
            self.tied.all_reduce_grads()
        return losses, target

    def _run(self, batch: dict, train: bool, context) -> tuple[torch.Tensor, torch.Tensor]:
        losses, target = self._schedule_call(batch, train, context)
        loss_sum = torch.zeros((), dtype=torch.float32, device=target.device)
        if self.has_last_stage:
            loss_sum = torch.stack([l.detach().float() for l in losses]).sum() / self._gradient_scale
        dist.all_reduce(loss_sum, group=self.pp_group)  # only the last stage has it: now every rank does
        return loss_sum, (target != -100).sum()  # what loss_fn scores: labels (and NSP labels) not ignored

    def forward_backward(self, micro_batches: list[dict], global_targets, grad_scale: float = 1.0,
                         context=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The trainer's forward_backward for pp > 1: every micro-batch forward and backward through the
        schedule (gradients accumulate in the stage modules, tied copies summed). Returns this dp rank's
        summed loss and scored-target count, on every pp rank. `context`: e.g. autocast for the forwards."""
        if len(micro_batches) != self.schedule._n_microbatches:
            raise ValueError(f"the pipeline was built for {self.schedule._n_microbatches} micro-batches per step "
                             f"but got {len(micro_batches)}; build it with n_microbatches(cfg.trainer, dp)")
        # the schedule splits the batch again along dim 0 into the same micro-batches
        batch = {k: torch.cat([b[k] for b in micro_batches]) for k in micro_batches[0]}
        self._gradient_scale = grad_scale / float(global_targets)
        return self._run(batch, train=True, context=context)

    def step(self, batch: dict, token_count) -> torch.Tensor:
        """One step over a whole (dp-local) batch; returns its summed loss / the global `token_count`."""
        self._gradient_scale = 1.0 / float(token_count)
        loss_sum, _ = self._run(batch, train=True, context=None)
        return loss_sum / float(token_count)

    @torch.no_grad()
    def evaluate(self, batch: dict, context=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward only: (summed loss, scored targets) of the batch, on every pp rank."""
        self._gradient_scale = 1.0
        with self._forward_only():
            return self._run(batch, train=False, context=context)

    @torch.no_grad()
    def evaluate_rows(self, batch: dict, row_scores, context=None) -> torch.Tensor:
        """Forward only, scoring each row: `row_scores(last stage output (b, T, V), labels (b, T)) -> (b,)` per
        micro-batch -> (B,) float64 on every pp rank. The batch is what forward_backward takes at once (the
        stages were shaped by it): n micro-batches of the training micro-batch's shape."""
        self._row_scores = row_scores
        try:
            with self._forward_only():
                scores, target = self._schedule_call(batch, train=False, context=context)
        finally:
            self._row_scores = None
        rows = torch.zeros(target.shape[0], dtype=torch.float64, device=target.device)
        if self.has_last_stage:
            rows = torch.cat([s.detach() for s in scores]).double()  # micro-batches are forwarded in order
        dist.all_reduce(rows, group=self.pp_group)  # only the last stage has them: now every rank does
        return rows

    @contextlib.contextmanager
    def _forward_only(self):
        """torch 2.13's eval() of a V schedule still runs the backward actions of its training order (and
        fails in them): a forward-only order is put in place meanwhile, then the training order back."""
        if self.schedule_name not in V_SHAPED_SCHEDULES:
            yield
            return
        training_order = self.schedule.pipeline_order_with_comms
        if self._forward_only_order is None:
            self._forward_only_order = v_forward_only_order(self.schedule)
        self.schedule.pipeline_order_with_comms = self._forward_only_order
        try:
            yield
        finally:
            self.schedule.pipeline_order_with_comms = training_order

    def _loss_context(self):
        if not self.vocab_parallel:
            return contextlib.nullcontext()
        from scaletrain.parallel.loss import vocab_parallel_loss  # cross-entropy on the vocab shards

        return vocab_parallel_loss()


def v_forward_only_order(schedule) -> dict[int, list]:
    """Forward actions only, for a V placement (rank r holds stages r and 2p-1-r), with the communication
    and FSDP unshard/reshard actions torch's lowering adds. Each rank runs all micro-batches through its
    first stage, then all through its second: first stages wait only on the rank before them, second
    stages on the rank after them (the last rank: on its own first stage), so the order cannot deadlock.
    (torch's own lowering entry point insists on a backward for every forward, hence the direct calls.)"""
    Action, FORWARD = pp_schedules._Action, pp_schedules._ComputationType.FORWARD
    placement = schedule.stage_index_to_group_rank
    compute: dict[int, list] = {}
    for stage, rank in sorted(placement.items()):
        compute.setdefault(rank, []).extend(Action(stage, FORWARD, mb) for mb in range(schedule._n_microbatches))
    lowered = {rank: pp_schedules._add_unshard_reshard(actions) for rank, actions in compute.items()}
    return pp_schedules._add_send_recv(lowered, stage_to_rank=lambda stage: placement[stage],
                                       num_stages=schedule._num_stages)


def build_pipeline(modules: list[StageModule], model_cfg: ModelConfig, parallel: ParallelConfig, n_micro: int,
                   dims, device: torch.device | str = "cpu") -> Pipeline:
    """Wraps the (parallelized, materialized) stage modules in PipelineStages and the configured schedule.
    `dims` is the run's ParallelDims, its mesh built (with a "pp" dimension)."""
    validate_schedule(parallel, n_micro)
    pp_group = dims.mesh["pp"].get_group()
    device = torch.device(device)
    stages = [PipelineStage(m, m.plan.index, m.plan.num_stages, device, group=pp_group) for m in modules]
    pipe = Pipeline(modules, stages, None, TiedEmbeddings(modules, model_cfg, parallel, dims.mesh), pp_group,
                    model_cfg.family, get_spec(model_cfg.family).loss_fn, dims.tp_enabled, parallel.pp_schedule)
    schedule_cls = SCHEDULE_CLASSES[parallel.pp_schedule]
    if parallel.pp_schedule in SINGLE_STAGE_SCHEDULES:
        pipe.schedule = schedule_cls(stages[0], n_micro, loss_fn=pipe.micro_batch_loss, scale_grads=False)
    else:
        pipe.schedule = schedule_cls(stages, n_micro, loss_fn=pipe.micro_batch_loss, scale_grads=False)
    return pipe
