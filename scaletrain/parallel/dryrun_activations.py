"""Activation memory of one dry-run rank, measured on the CPU at the real shapes.

Under the dry run's fake process group (collectives are no-ops, shapes are real) this builds, on real CPU
tensors, one transformer block of each kind the rank runs (GPT/BERT `layers`; an encoder-decoder's encoder
block and its cross-attending decoder block), tensor-parallel with the training plan (width / tp, sequence
shards under sp) and checkpointed with the training mode, plus the ends of the model the rank holds (the
first stage's embeddings, the last stage's head and loss: BERT's MLM / NSP heads, an LM head's logits), and
runs each one's forward and backward on one micro-batch. What autograd keeps after the forward is the
module's share of the activations; the largest live total during its backward, less that, is the transient.

A block's kept bytes are what its forward adds to its inputs (its output, the next block's input, stands in
for the input it frees), so it counts its input only when it keeps it and blocks add up without counting a
tensor twice. The stages' per-micro-batch totals are then replayed through the schedule's own action lists (torch's pipeline IR, all ranks): a forward adds
its stage's activations, a full backward frees them; zero-bubble schedules split the backward, and the
activations are freed at the weight half (W), which still needs the inputs of the matmuls. The peak of
that replay is the rank's."""

from __future__ import annotations

import dataclasses
import gc
import time
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from scaletrain.configs.schema import ModelConfig, TrainConfig
from scaletrain.parallel.data import PRECISION_DTYPES
from scaletrain.parallel.dims import ParallelDims



def _local(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor._local_tensor if isinstance(tensor, DTensor) else tensor


class LiveStorages(TorchDispatchMode):
    """Remembers every op's output storage; `live_bytes` sums those still referenced, less the parameters'
    and their gradients' (model states, counted apart). With `track_peak` every op updates `peak`."""

    def __init__(self, params: list[torch.Tensor]):
        super().__init__()
        self.params = params
        self.storages: dict[int, tuple[int, list]] = {}  # data_ptr -> (bytes, weakrefs to tensors on it)
        self.track_peak, self.peak = False, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                local = _local(tensor)
                if local.is_meta or getattr(local, "_base", None) is None and _no_storage(local):
                    continue
                storage = local.untyped_storage()
                nbytes, refs = self.storages.get(storage.data_ptr(), (storage.nbytes(), []))
                if refs and all(r() is None for r in refs):  # a freed storage's address came back
                    nbytes, refs = storage.nbytes(), []
                refs.append(weakref.ref(local))
                self.storages[storage.data_ptr()] = (nbytes, refs)
        if self.track_peak:
            self.peak = max(self.peak, self.live_bytes())
        return out

    def live_bytes(self) -> int:
        exclude = set()
        for param in self.params:
            exclude.add(_local(param).untyped_storage().data_ptr())
            if param.grad is not None:
                exclude.add(_local(param.grad).untyped_storage().data_ptr())
        total = 0
        for ptr in list(self.storages):
            nbytes, refs = self.storages[ptr]
            if all(r() is None for r in refs):
                del self.storages[ptr]
            elif ptr not in exclude:
                total += nbytes
        return total


def _no_storage(tensor: torch.Tensor) -> bool:
    """Tensors without a real storage (functional collectives' async results, subclasses' wrappers)."""
    try:
        tensor.untyped_storage().data_ptr()
    except RuntimeError:
        return True
    return False


@dataclass
class Measured:
    kept: float  # bytes autograd keeps from forward to backward, one micro-batch
    transient: float  # the backward's largest live total beyond `kept`


def forward_backward_bytes(module: nn.Module, run, marginal: bool = False) -> Measured:
    """run(mark) -> the outputs (or loss) of one forward of `module`; then backward from them. marginal: run
    calls mark() once, midway, and `kept` is only what the forward adds after it."""
    params = list(module.parameters())
    with LiveStorages(params) as tracker:
        marks = []

        def mark():
            gc.collect()
            marks.append(tracker.live_bytes())

        outputs = run(mark)
        gc.collect()  # reference cycles (DTensor / autograd internals) are not kept for backward
        live = tracker.live_bytes()
        tracker.track_peak, tracker.peak = True, live
        tensors = [t for t in tree_flatten(outputs)[0] if isinstance(t, torch.Tensor) and t.requires_grad]
        locals_ = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
        torch.autograd.backward(locals_, [torch.ones_like(t) for t in locals_])
        peak = tracker.peak
    del outputs, tensors, locals_
    assert len(marks) == (1 if marginal else 0)
    return Measured(float(live - (marks[0] if marginal else 0)), float(max(peak - live, 0)))


def _materialize(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Real CPU storage for the (tp-sharded) meta module in the compute dtype (FSDP's mixed precision casts
    the parameters so). Values only need to be finite: each rank's shard is drawn locally (init_weights
    would draw every full table, 2.5 GB for GPT-3's embeddings)."""
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)  # keeps tied weights tied
    try:
        module.to_empty(device="cpu")
        with torch.no_grad():
            for param in module.parameters():
                _local(param).normal_(0.0, 0.02)
            for buffer in module.buffers():
                if buffer.is_floating_point():
                    _local(buffer).zero_()
            for child in module.modules():
                if hasattr(child, "reset_buffers"):
                    child.reset_buffers()
        if dtype != torch.float32:
            module.to(dtype)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)
    return module.train()


# ---------------------------------------------------------------------------------------------- blocks

# family -> the block kinds its layer stacks run: (stack name, cross-attends to an encoder output)
BLOCK_KINDS = {"gpt": (("layers", False),), "bert": (("layers", False),),
               "encdec": (("encoder", False), ("decoder", True)), "xlnet": (("layers", False),)}
CAUSAL_STACKS = {"gpt": ("layers",), "bert": (), "encdec": ("decoder",), "xlnet": ()}


def measure_block(cfg: TrainConfig, model_cfg: ModelConfig, dims: ParallelDims, stack: str, cross: bool) -> Measured:
    """One block of `stack`, parallelized and checkpointed as training does, on one micro-batch. Its inputs are
    made inside the measurement, before the mark, so it counts its input only when it keeps it (LayerNorm
    does; T5's torch RMSNorm keeps an fp32 copy instead), and the tensors every block of a stack shares (the
    encoder output a decoder block cross-attends to, T5's bias) not at all, even when it takes views of them."""
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.parallel import parallelize_module

    from scaletrain.models.blocks import Attention, Block, attention_bias
    from scaletrain.parallel.checkpointing import apply_activation_checkpointing
    from scaletrain.parallel.tensor import _block_plan
    from scaletrain.train.precision import autocast

    if model_cfg.family == "xlnet":
        return _xlnet_block(cfg, model_cfg, dims)
    sp = cfg.parallel.sequence_parallel and dims.tp_enabled
    b, s, d, tp = cfg.trainer.micro_batch, cfg.trainer.seq_len, model_cfg.d_model, dims.tp
    holder = nn.Module()
    with torch.device("meta"):
        holder.layers = nn.ModuleDict({"0": Block(model_cfg, cross_attention=cross)})
    if dims.tp_enabled:
        parallelize_module(holder, dims.tp_mesh, _block_plan("layers.0", holder.layers["0"], sp))
        for module in holder.modules():  # as apply_tensor_parallel: each rank's heads draw their own masks
            if isinstance(module, Attention):
                module.dropout_stream = dims.tp_rank + 1
    apply_activation_checkpointing(holder, cfg.trainer.activation_checkpointing)
    dtype = PRECISION_DTYPES[cfg.precision]
    holder = _materialize(holder, dtype)
    causal = stack in CAUSAL_STACKS[model_cfg.family]
    shared = dict(is_causal=causal)  # referenced after the forward too: in the mark and after it, so not counted
    if model_cfg.position == "relative":  # T5: the stack's (1, H/tp, T, T) bias, made once per stack
        heads = model_cfg.n_heads // tp
        shared["bias"] = attention_bias(None, causal, s, s, dtype, "cpu", torch.zeros(1, heads, s, s, dtype=dtype))

    leaf = torch.randn(b, s // tp if sp else s, d, dtype=dtype, requires_grad=True)  # this rank's residual stream

    def run(mark):
        if cross:  # the encoder output every decoder block attends to (replicated, even under sp)
            shared["memory"] = torch.randn(b, s, d, dtype=dtype, requires_grad=True)
        x = leaf.clone()  # not a leaf: the graph keeps a leaf alive (AccumulateGrad) even when no op saves it
        stream = DTensor.from_local(x, dims.tp_mesh, [Shard(1)], run_check=False) if sp else x
        mark()
        with autocast(cfg.precision, "cpu"):
            return holder.layers["0"](stream, **shared)

    return forward_backward_bytes(holder, run, marginal=True)


def _xlnet_block(cfg: TrainConfig, model_cfg: ModelConfig, dims: ParallelDims, content_used: bool = True) -> Measured:
    """One XLNet block on both streams, its inputs (h (B, T, D), g (B, M, D), and the positions and masks a
    stage builds once for all its layers) made before the mark, so none of them is counted. content_used=False
    is the model's last block, whose content output nothing reads: autograd frees that stream's attention and
    FFN as soon as the block returns."""
    holder, batch, _ = _xlnet_holder(cfg, model_cfg, dims)
    dtype = PRECISION_DTYPES[cfg.precision]
    b, s, d = cfg.trainer.micro_batch, cfg.trainer.seq_len, model_cfg.d_model
    mapping = batch["target_mapping"]
    leaves = [torch.randn(b, rows, d, dtype=dtype, requires_grad=True) for rows in (s, mapping.shape[1])]
    shared = {}  # referenced after the forward too (in the mark and after it), so never counted

    def run(mark):
        from scaletrain.train.precision import autocast

        h, g = (leaf.clone() for leaf in leaves)  # not leaves: see measure_block
        shared.update(xlnet_layer_inputs(holder, h, batch))
        mark()
        with autocast(cfg.precision, "cpu"):
            h, g = holder.layers["0"](h, g, target_mapping=mapping, **shared)
        return (h, g) if content_used else g

    return forward_backward_bytes(holder, run, marginal=True)


def _xlnet_holder(cfg: TrainConfig, model_cfg: ModelConfig, dims: ParallelDims):
    """(a one-layer XLNet, parallelized and checkpointed as training does, one PLM micro-batch, its dtype)."""
    from scaletrain.models.registry import build_model
    from scaletrain.parallel.checkpointing import apply_activation_checkpointing

    model = apply_activation_checkpointing(build_model(_one_layer(model_cfg), "meta"),
                                           cfg.trainer.activation_checkpointing)
    batch = family_batch(model_cfg, cfg, cfg.trainer.micro_batch, cfg.trainer.seq_len)
    return _prepared(model, cfg, dims), batch, PRECISION_DTYPES[cfg.precision]


def xlnet_layer_inputs(model: nn.Module, h: torch.Tensor, batch: dict) -> dict:
    """The relative positions and masks every layer of a stage reads (models/xlnet.py: XLNet.layer_inputs)."""
    return model.layer_inputs(h, batch["token_type_ids"], batch["attention_mask"], batch["perm_mask"])


def xlnet_shared_bytes(cfg: TrainConfig, model_cfg: ModelConfig) -> dict[str, float]:
    """{name: bytes} of what XLNet.layer_inputs builds once per stage for its layers: the same on every tp rank
    (positions and masks are not sharded), and it reads no parameter, so a meta model builds them."""
    from scaletrain.models.registry import build_model

    model = build_model(_one_layer(model_cfg), "meta").train()
    batch = family_batch(model_cfg, cfg, cfg.trainer.micro_batch, cfg.trainer.seq_len)
    h = torch.zeros(cfg.trainer.micro_batch, cfg.trainer.seq_len, model_cfg.d_model,
                    dtype=PRECISION_DTYPES[cfg.precision])
    inputs = xlnet_layer_inputs(model, h, batch)
    return {name: float(t.untyped_storage().nbytes()) for name, t in inputs.items() if t is not None}


def _run_model(cfg: TrainConfig, model_cfg: ModelConfig, dims: ParallelDims, model: nn.Module) -> Measured:
    """A whole (small) model run as the trainer runs it without pp: forward, loss, backward."""
    from scaletrain.models.registry import get_spec
    from scaletrain.parallel import loss_context
    from scaletrain.train.precision import autocast

    model = _prepared(model, cfg, dims)
    batch = family_batch(model_cfg, cfg, cfg.trainer.micro_batch, cfg.trainer.seq_len)
    inputs = {k: batch[k] for k in get_spec(model_cfg.family).input_keys if k in batch}

    def run(mark):
        with loss_context(dims), autocast(cfg.precision, "cpu"):
            return _loss(model_cfg, model(**inputs), batch)

    return forward_backward_bytes(model, run)


# ---------------------------------------------------------------------------------------------- model ends

def scored_positions(cfg: TrainConfig, seq: int) -> int:
    return max(1, round(cfg.data.mlm_probability * seq))


def family_batch(model_cfg: ModelConfig, cfg: TrainConfig, batch: int, seq: int) -> dict:
    """One micro-batch as the family's objective feeds it (labels included)."""
    if model_cfg.family == "xlnet":
        from scaletrain.data.objectives import synthetic_plm_batch

        return synthetic_plm_batch(batch, seq, model_cfg.vocab_size, 0, cfg.data.plm_k, cfg.data.plm_max_span)
    ids = torch.randint(0, model_cfg.vocab_size, (batch, seq))
    out = {"input_ids": ids, "labels": torch.randint(0, model_cfg.vocab_size, (batch, seq))}
    if model_cfg.family == "bert":  # MLM scores data.mlm_probability of the positions
        out["labels"][:, scored_positions(cfg, seq):] = -100
        if model_cfg.type_vocab_size:
            out["token_type_ids"] = torch.zeros_like(ids)
        if model_cfg.nsp_head:
            out["next_sentence_label"] = torch.zeros(batch, dtype=torch.long)
    if model_cfg.family == "encdec":
        out["decoder_input_ids"] = torch.randint(0, model_cfg.vocab_size, (batch, seq))
    return out


def _one_layer(model_cfg: ModelConfig) -> ModelConfig:
    return dataclasses.replace(model_cfg, n_layers=1, n_decoder_layers=1 if model_cfg.family == "encdec" else 0)


def _without_layers(model: nn.Module) -> nn.Module:
    from scaletrain.parallel.data import transformer_blocks

    for stack in (model, getattr(model, "encoder", None), getattr(model, "decoder", None)):
        layers = getattr(stack, "layers", None) if stack is not None else None
        if isinstance(layers, nn.ModuleDict):
            for key in list(layers.keys()):
                del layers[key]
    assert not list(transformer_blocks(model))
    return model


def _prepared(module: nn.Module, cfg: TrainConfig, dims: ParallelDims) -> nn.Module:
    if dims.tp_enabled:
        from scaletrain.parallel.tensor import apply_tensor_parallel

        apply_tensor_parallel(module, dims.tp_mesh, sequence_parallel=cfg.parallel.sequence_parallel)
    return _materialize(module, PRECISION_DTYPES[cfg.precision])


def _loss(model_cfg: ModelConfig, outputs, batch: dict):
    from scaletrain.models.registry import get_spec

    if model_cfg.family == "bert" and not isinstance(outputs, tuple):
        outputs = (outputs, None)
    return get_spec(model_cfg.family).loss_fn(outputs, batch)[0]


def measure_ends(cfg: TrainConfig, model_cfg: ModelConfig, dims: ParallelDims) -> tuple[Measured, Measured]:
    """(the first stage's embeddings, the last stage's head + loss), each without any layer. Without pp a GPT
    or BERT has both ends in one zero-layer model run as the trainer runs it (BERT's head then scores only the
    MLM positions); otherwise they are zero-layer stage modules run as the schedule runs them (a zero-layer
    encoder-decoder would drop T5's relative bias, which every layer keeps)."""
    from scaletrain.models.registry import build_model
    from scaletrain.parallel import loss_context
    from scaletrain.parallel.pipeline import STAGE_KWARGS
    from scaletrain.parallel.pipeline_split import StagePlan
    from scaletrain.parallel.pipeline_stages import build_stage_module
    from scaletrain.train.precision import autocast

    b, s, dtype = cfg.trainer.micro_batch, cfg.trainer.seq_len, PRECISION_DTYPES[cfg.precision]
    small = _one_layer(model_cfg)
    batch = family_batch(model_cfg, cfg, b, s)
    context = lambda: autocast(cfg.precision, "cpu")  # noqa: E731
    # (a zero-layer XLNet would drop its content stream, which the first layer keeps)
    if not dims.pp_enabled and model_cfg.family in ("gpt", "bert"):
        return Measured(0.0, 0.0), _run_model(cfg, model_cfg, dims, _without_layers(build_model(small, "meta")))
    n_enc = 1 if model_cfg.family == "encdec" else 0
    n_total = 1 + n_enc
    kwargs = {k: batch[k] for k in STAGE_KWARGS[model_cfg.family] if k in batch}
    first = _prepared(build_stage_module(build_model(small, "meta"), StagePlan(0, 2, 0, 0, n_enc)), cfg, dims)

    def run_first(mark):
        with context():
            return first(batch["input_ids"], **kwargs)

    last = _prepared(build_stage_module(build_model(small, "meta"), StagePlan(1, 2, n_total, n_total, n_enc)),
                     cfg, dims)
    rows = [s] * (1 + n_enc) + ([batch["target_mapping"].shape[1]] if model_cfg.family == "xlnet" else [])
    stream = [torch.randn(b, n, model_cfg.d_model, dtype=dtype, requires_grad=True) for n in rows]  # XLNet: h, g
    if model_cfg.family == "encdec" and model_cfg.position == "relative":  # dec_bias (1, H/tp, T, T)
        stream.append(torch.zeros(1, model_cfg.n_heads // dims.tp, s, s, dtype=dtype, requires_grad=True))

    def run_last(mark):
        with loss_context(dims), context():
            return _loss(model_cfg, last(*stream, **kwargs), batch)

    return forward_backward_bytes(first, run_first), forward_backward_bytes(last, run_last)


# ---------------------------------------------------------------------------------------------- the rank

@dataclass
class ActivationReport:
    per_block: dict[str, Measured]  # stack -> one block's bytes, one micro-batch
    first_end: Measured
    last_end: Measured
    stage_kept: dict[int, float]  # this rank's stages -> kept bytes of one micro-batch through them
    peak: float  # the rank's peak of activations over the schedule, transients included
    kept_peak: float  # the same without the transients
    microbatches: int
    seconds: float
    layers: dict[str, int] = field(default_factory=dict)  # stack -> blocks this rank holds

    @property
    def in_flight(self) -> float:
        """Micro-batches in flight at the peak, in units of one micro-batch through all the rank's stages."""
        whole = sum(self.stage_kept.values())
        return self.kept_peak / whole if whole else 0.0

    @property
    def transient(self) -> float:
        return self.peak - self.kept_peak


def rank_stage_layers(model: nn.Module, model_cfg: ModelConfig) -> dict[int, dict[str, int]]:
    """stage index -> {stack: blocks} of what this rank holds (index 0 without pp)."""
    from scaletrain.parallel.data import transformer_blocks

    stages = getattr(model, "stages", None)
    if not stages:
        return {0: {stack: len(_stack_layers(model, stack)) for stack, _ in BLOCK_KINDS[model_cfg.family]}}
    assert sum(len(list(transformer_blocks(stage))) for stage in stages) == len(list(transformer_blocks(model)))
    return {stage.plan.index: {stack: len(_stack_layers(stage, stack)) for stack, _ in BLOCK_KINDS[model_cfg.family]}
            for stage in stages}


def _stack_layers(module: nn.Module, stack: str) -> nn.ModuleDict:
    owner = module if stack == "layers" else getattr(module, stack)
    return owner.layers


def measure_rank_activations(cfg: TrainConfig, model_cfg: ModelConfig, dims: ParallelDims, model: nn.Module,
                             microbatches: int) -> ActivationReport:
    start = time.perf_counter()
    torch.manual_seed(0)
    layers = rank_stage_layers(model, model_cfg)
    per_block = {stack: measure_block(cfg, model_cfg, dims, stack, cross)
                 for stack, cross in BLOCK_KINDS[model_cfg.family] if any(held[stack] for held in layers.values())}
    first_end, last_end = measure_ends(cfg, model_cfg, dims)
    n_stages = cfg.parallel.pp * cfg.parallel.pp_virtual if dims.pp_enabled else 1
    kept, transient = {}, {}
    for index, held in layers.items():
        kept[index] = sum(per_block[stack].kept * n for stack, n in held.items() if n)
        transient[index] = max([per_block[stack].transient for stack, n in held.items() if n] or [0.0])
    if model_cfg.family == "xlnet":
        _add_xlnet_stage_parts(cfg, model_cfg, dims, layers, n_stages, per_block["layers"], kept, transient)
    for index in layers:
        for end, is_end in ((first_end, index == 0), (last_end, index == n_stages - 1)):
            if is_end:
                kept[index] += end.kept
                transient[index] = max(transient[index], end.transient)
    if dims.pp_enabled:
        kept_peak, peak = schedule_peak(cfg, dims, kept, transient, microbatches)
    else:  # micro-batches run one after the other (gradient accumulation)
        kept_peak, peak = kept[0], kept[0] + transient[0]
    totals = {stack: sum(held[stack] for held in layers.values()) for stack, _ in BLOCK_KINDS[model_cfg.family]}
    return ActivationReport(per_block, first_end, last_end, kept, peak, kept_peak, microbatches,
                            time.perf_counter() - start, totals)


def _add_xlnet_stage_parts(cfg, model_cfg, dims, layers, n_stages, full: Measured, kept: dict, transient: dict):
    """Once per stage with layers, the positions and masks it builds for them (the content stream's mask only
    where some block's content output is read); on the stage with the model's last block, that block as it
    is kept (its content stream freed) instead of a full one."""
    last = _xlnet_block(cfg, model_cfg, dims, content_used=False)
    shared = xlnet_shared_bytes(cfg, model_cfg)
    for index, held in layers.items():
        if not held["layers"]:
            continue
        full_blocks = held["layers"] - (index == n_stages - 1)
        kept[index] += sum(shared.values()) - (0.0 if full_blocks else shared["hidden_h"])
        if index == n_stages - 1:
            kept[index] += last.kept - full.kept
            transient[index] = max(transient[index], last.transient)


def schedule_peak(cfg: TrainConfig, dims: ParallelDims, kept: dict, transient: dict, microbatches: int):
    """(peak kept bytes, peak with the backward transients) of this rank over its schedule's action list."""
    from torch.distributed.pipelining.schedules import _ComputationType as C

    order = schedule_actions(cfg, dims, microbatches)
    live = peak_kept = peak = 0.0
    for action in order:
        kinds = getattr(action, "sub_actions", None) or [action]
        for act in kinds:
            s, kind = act.stage_index, act.computation_type
            if kind == C.FORWARD:
                live += kept[s]
                peak_kept = max(peak_kept, live)
                peak = max(peak, live)
            elif kind in (C.FULL_BACKWARD, C.BACKWARD_INPUT):
                peak = max(peak, live + transient[s])
                if kind == C.FULL_BACKWARD:
                    live -= kept[s]
            elif kind == C.BACKWARD_WEIGHT:
                live -= kept[s]
    return peak_kept, peak


def schedule_actions(cfg: TrainConfig, dims: ParallelDims, microbatches: int) -> list:
    """This pp rank's compute actions in order, from the configured torch schedule built on stand-in stages
    (the IR depends only on the stage placement and the micro-batch count). Schedule1F1B's IR numbers the
    last rank's micro-batches from 1; only the order of forwards and backwards matters here."""
    from torch.distributed.pipelining import PipelineStage

    from scaletrain.parallel.pipeline import SCHEDULE_CLASSES, SINGLE_STAGE_SCHEDULES, validate_schedule
    from scaletrain.parallel.pipeline_split import local_stage_indices

    parallel = cfg.parallel
    validate_schedule(parallel, microbatches)
    name = parallel.pp_schedule
    pp_rank = dims.mesh["pp"].get_local_rank()
    group = dims.mesh["pp"].get_group()
    n_stages = parallel.pp * parallel.pp_virtual
    stages = [PipelineStage(nn.Linear(1, 1), s, n_stages, torch.device("cpu"), group=group)
              for s in local_stage_indices(pp_rank, parallel)]
    schedule = SCHEDULE_CLASSES[name](stages[0] if name in SINGLE_STAGE_SCHEDULES else stages, microbatches,
                                      loss_fn=lambda output, target: output.sum())
    return [a for a in schedule.pipeline_order[pp_rank] if a is not None]
