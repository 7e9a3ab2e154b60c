"""DeepSpeed as the second engine behind the trainer's seams (parallel.engine=deepspeed).

What stays ours: the model, the optimizer's construction (param groups, hyperparameters), the LR schedule
(it sets the lr of DeepSpeed's param groups before every update; DeepSpeed's own scheduler is never built),
the loss normalisation, data, metrics, signals and checkpoints. What DeepSpeed does: ZeRO 1-3 partitioning,
its gradient reduction, clipping, fp16 loss scaling and CPU / NVMe offload.

Config: `deepspeed_config(cfg, dp_size)` builds DeepSpeed's JSON config from ours; a user's
parallel.deepspeed_config file is merged in, and a key that contradicts our config is a one-line error
naming both values ("auto" means "take scaletrain's").

Checkpoints: `DeepSpeedEngine.layout_free_state()` gives the same {"model": {fqn: full tensor}, "optim":
{"state.<fqn>.<name>", "param_groups.<fqn>.<option>"}} that checkpoint/reshard.py writes for the native
engine (full fp32 parameters gathered from DeepSpeed's partitions), so any native layout reads it, and
`load_layout_free_state` scatters such a state back into DeepSpeed's partitions."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Optional

import torch
import torch.nn as nn

from scaletrain.configs.schema import DEEPSPEED_EXTRA, ParallelConfig, TrainConfig
from scaletrain.errors import ConfigError

# DeepSpeed keys that scaletrain's config decides, and the config field that decides each.
OWNED_BY = {
    "train_batch_size": "trainer.global_batch",
    "train_micro_batch_size_per_gpu": "trainer.micro_batch",
    "gradient_accumulation_steps": "trainer.global_batch / (trainer.micro_batch x dp)",
    "gradient_clipping": "trainer.grad_clip",
    "zero_optimization.stage": "parallel.zero",
    "zero_optimization.offload_optimizer.device": "parallel.offload",
    "zero_optimization.offload_optimizer.nvme_path": "parallel.offload_dir",
    "zero_optimization.offload_param.device": "parallel.offload",
    "zero_optimization.offload_param.nvme_path": "parallel.offload_dir",
    "fp16.enabled": "precision",
    "bf16.enabled": "precision",
    "fp16.loss_scale": "precision=fp16 (a dynamic loss scale)",
    "fp16.initial_scale_power": "trainer.loss_scale_init",
    "fp16.loss_scale_window": "trainer.loss_scale_growth_interval",
    "fp16.hysteresis": "the trainer's loss scale rule (back off on the first overflow)",
}
# Whole sections the trainer owns: its optimizer and its LR schedule drive both engines.
REFUSED_SECTIONS = {"optimizer": "optim.* (the trainer builds the optimizer)",
                    "scheduler": "optim.schedule (the trainer's LR schedule drives DeepSpeed's param groups)"}
DEFAULTS = {"zero_allow_untested_optimizer": True,  # our torch optimizers under ZeRO (tested here)
            "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False}


def _ours(cfg: TrainConfig, dp_size: int) -> dict[str, Any]:
    """The owned keys, dotted, as this config sets them."""
    t, p = cfg.trainer, cfg.parallel
    clip = t.grad_clip if t.grad_clip > 0 and math.isfinite(t.grad_clip) else 0.0
    optimizer_device = p.offload if p.offload != "none" else "none"
    ours = {"train_batch_size": t.global_batch, "train_micro_batch_size_per_gpu": t.micro_batch,
            "gradient_accumulation_steps": t.global_batch // (t.micro_batch * dp_size),
            "gradient_clipping": clip, "zero_optimization.stage": p.zero,
            "zero_optimization.offload_optimizer.device": optimizer_device,
            "fp16.enabled": cfg.precision == "fp16", "bf16.enabled": cfg.precision == "bf16"}
    if p.zero == 3:  # parameters are offloaded with the optimizer state, as FSDP2's CPUOffloadPolicy does
        ours["zero_optimization.offload_param.device"] = optimizer_device
    if p.offload == "nvme":
        ours["zero_optimization.offload_optimizer.nvme_path"] = p.offload_dir
        ours["zero_optimization.offload_param.nvme_path"] = p.offload_dir
    if cfg.precision == "fp16":
        power = math.log2(t.loss_scale_init)
        if power != int(power):
            raise ConfigError(f"trainer.loss_scale_init={t.loss_scale_init} must be a power of 2 under "
                              f"parallel.engine=deepspeed (DeepSpeed takes initial_scale_power); use 2**16 = 65536")
        ours.update({"fp16.loss_scale": 0, "fp16.initial_scale_power": int(power),
                     "fp16.loss_scale_window": t.loss_scale_growth_interval, "fp16.hysteresis": 1})
    return ours


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def check_layout(p: ParallelConfig) -> None:
    """ParallelConfig.__post_init__ under parallel.engine=deepspeed: DeepSpeed owns data parallelism (ZeRO 1-3, its offload); the other degrees
    and the native-only options are refused, each in one line."""
    import importlib.util

    _check(importlib.util.find_spec("deepspeed") is not None,
           f"parallel.engine=deepspeed needs DeepSpeed, which is not installed; run {DEEPSPEED_EXTRA}")
    _check(p.zero in (1, 2, 3), f"parallel.engine=deepspeed runs ZeRO stage 1, 2 or 3 but parallel.zero={p.zero}; "
           f"set parallel.zero=1|2|3 (or parallel.engine=native for plain data parallelism)")
    for name in ("tp", "pp", "cp", "dp_replicate"):
        _check(getattr(p, name) == 1, f"parallel.engine=deepspeed runs data parallelism only but parallel.{name}="
               f"{getattr(p, name)}; set parallel.{name}=1 or use parallel.engine=native")
    _check(not p.sequence_parallel, "parallel.sequence_parallel needs tensor parallelism, which parallel.engine="
           "deepspeed does not run; set it false")
    _check(p.reduce_dtype == "fp32", f"parallel.reduce_dtype={p.reduce_dtype} is a native-engine option; under "
           f"parallel.engine=deepspeed set communication_data_type in parallel.deepspeed_config instead")
    if p.offload == "nvme":
        _check(bool(p.offload_dir), "parallel.offload=nvme needs parallel.offload_dir=<a folder on the NVMe drive>")
        _check(p.zero == 3, f"parallel.offload=nvme offloads parameters, which needs ZeRO-3, but parallel.zero="
               f"{p.zero}; set parallel.zero=3")
    if p.deepspeed_config:
        _check(os.path.isfile(os.path.expanduser(p.deepspeed_config)), f"parallel.deepspeed_config="
               f"{p.deepspeed_config} is not a file; give the path of a DeepSpeed JSON config")


def check_run(cfg: TrainConfig, dp: int) -> None:
    """validate_cross_fields under parallel.engine=deepspeed: what it runs so far; the rest is refused in one line, never run natively."""
    t, m = cfg.trainer, cfg.model
    _check(m.family in ("gpt", "bert", "encdec"), f"parallel.engine=deepspeed trains families gpt, bert and encdec; "
           f"for family {m.family} use parallel.engine=native")
    _check(t.activation_checkpointing == "none", f"trainer.activation_checkpointing={t.activation_checkpointing} "
           f"is not wired for parallel.engine=deepspeed; set it to none or use parallel.engine=native")
    _check(m.kernels != "compile", "model.kernels=compile is not wired for parallel.engine=deepspeed; use "
           "model.kernels=auto or parallel.engine=native")
    _check(cfg.dry_run.world_size == 0, "dry_run.world_size measures the native engine's shards; DeepSpeed's "
           "partitions are not modelled: dry-run with parallel.engine=native at the same parallel.zero")
    if cfg.parallel.offload == "nvme":
        _check(async_io_available(), "parallel.offload=nvme needs DeepSpeed's async I/O op, which builds against "
               "libaio, not found here; install it (apt-get install libaio-dev) or use parallel.offload=cpu")
    deepspeed_config(cfg, dp)  # a contradicting parallel.deepspeed_config fails here, before any launch


def async_io_available() -> bool:
    """Whether DeepSpeed can build (or has built) its NVMe I/O op: it compiles a probe against libaio."""
    from deepspeed.ops.op_builder import AsyncIOBuilder

    return AsyncIOBuilder().is_compatible(verbose=False)


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    leaves = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            leaves.update(_flatten(value, f"{prefix}{key}."))
        else:
            leaves[f"{prefix}{key}"] = value
    return leaves


def _nest(leaves: dict[str, Any]) -> dict:
    tree: dict = {}
    for dotted, value in leaves.items():
        *parents, last = dotted.split(".")
        node = tree
        for name in parents:
            node = node.setdefault(name, {})
        node[last] = value
    return tree


def read_user_config(path: str) -> dict:
    try:
        with open(os.path.expanduser(path)) as handle:
            user = json.load(handle)
    except (OSError, ValueError) as error:
        raise ConfigError(f"parallel.deepspeed_config={path} cannot be read as JSON ({error}); fix the file") from None
    if not isinstance(user, dict):
        raise ConfigError(f"parallel.deepspeed_config={path} holds a {type(user).__name__}, not a JSON object")
    return user


def deepspeed_config(cfg: TrainConfig, dp_size: int) -> dict:
    """DeepSpeed's config for this run: ours, the defaults, then the user's file (no contradictions)."""
    ours = _ours(cfg, dp_size)
    merged = {**DEFAULTS, **ours}
    path = cfg.parallel.deepspeed_config
    if path:
        user = read_user_config(path)
        for section, owner in REFUSED_SECTIONS.items():
            if section in user:
                raise ConfigError(f"parallel.deepspeed_config {path}: \"{section}\" is set by {owner}; "
                                  f"remove \"{section}\" from the file")
        for key, value in _flatten(user).items():
            if value == "auto":  # Hugging Face style: scaletrain's value
                continue
            mine = ours.get(key, "none" if key.endswith("offload_param.device") else None)
            if key in OWNED_BY and mine is not None and not _same(value, mine):
                raise ConfigError(f"parallel.deepspeed_config {path}: {key}={json.dumps(value)} contradicts "
                                  f"{OWNED_BY[key]} (which gives {json.dumps(mine)}); drop {key} from the file "
                                  f"or change {OWNED_BY[key]}")
            merged.setdefault(key, value)
    return _nest(merged)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


class _Methods(nn.Module):
    """What DeepSpeed wraps: the model, with the method to run chosen per call, so classify() goes through
    DeepSpeed's forward as forward() does."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, method: str, **inputs):
        return (self.model if method == "forward" else getattr(self.model, method))(**inputs)


def import_deepspeed(device_type: str):
    """DeepSpeed picks its accelerator when first imported: on a CPU run it must be its CPU accelerator."""
    if device_type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as error:
        raise ConfigError(f"parallel.engine=deepspeed cannot import deepspeed ({error}); run {DEEPSPEED_EXTRA}") from None
    return deepspeed


class DeepSpeedEngine:
    """DeepSpeed's engine behind the trainer's seams. The trainer keeps the plain model (`module`) for
    evaluation and sampling, and uses this object as its optimizer: `param_groups` (the LR schedule writes
    them), `forward`, `backward`, `step` and the layout-free checkpoint state."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig, dims):
        deepspeed = import_deepspeed(next(model.parameters()).device.type)
        self.module, self.zero = model, cfg.parallel.zero
        names = {param: name for name, param in model.named_parameters()}  # a tied weight once, first name
        self.params = {name: param for param, name in names.items()}
        self.group_names = [[names[p] for p in group["params"]] for group in optimizer.param_groups]
        # The checkpoint's param_groups.<fqn>.<option> keys are the torch optimizer's (what the native engine
        # writes), whichever optimizer DeepSpeed steps with: options it lacks keep the torch values.
        self.torch_options = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        self.config = deepspeed_config(cfg, dims.dp_size)
        self.dp_size = dims.dp_size
        if cfg.parallel.offload != "none":
            optimizer = offload_optimizer(optimizer, self.config)
        if cfg.parallel.offload == "nvme":
            size_nvme_buffers(self.config, model, dims.dp_size)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=_Methods(model), optimizer=optimizer,
                                                                 config=self.config, dist_init_required=False)
        self.loss_scale_state = LossScaleState(self)

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def forward(self, method: str, **inputs):
        return self.engine(method, **inputs)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """`loss` is normalised by the global target count and must give dp-summed gradients: DeepSpeed
        averages over dp ranks (hence x dp_size, exact for powers of 2) and would divide by the accumulation
        steps (scale_wrt_gas=False). Every micro-batch but the last also advances DeepSpeed's micro-step
        count; the last one's step() is the update (`step`)."""
        self.engine.backward(loss * self.dp_size, scale_wrt_gas=False)
        if not last:
            self.engine.step()

    def step(self) -> float:
        """The update (clipping to trainer.grad_clip inside DeepSpeed); returns the gradient norm before
        clipping."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass  # DeepSpeed clears its gradient partitions itself after the update

    @property
    def loss_scale(self) -> float:
        scaler = getattr(self.optimizer, "loss_scaler", None)
        return float(scaler.cur_scale) if scaler is not None and self.fp16 else 1.0

    @property
    def fp16(self) -> bool:
        return bool(self.config["fp16"]["enabled"])

    def update_applied(self) -> bool:
        """False when fp16 overflow made DeepSpeed skip the last update."""
        return bool(self.engine.was_step_applied())

    # ---- layout-free state ---------------------------------------------------------------------------
    def _base(self) -> torch.optim.Optimizer:
        return self.optimizer.optimizer  # the torch optimizer stepping DeepSpeed's flat fp32 partitions

    def _flats_by_group(self) -> list[list[torch.Tensor]]:
        """DeepSpeed's flat fp32 partitions of each param group. ZeRO-3 puts a sub-group's partition into
        its group only for the duration of its step, so they are listed from the ZeRO-3 optimizer."""
        base = self._base()
        if self.zero < 3:
            return [list(group["params"]) for group in base.param_groups]
        groups: list[list[torch.Tensor]] = [[] for _ in base.param_groups]
        for sub_group, flat in enumerate(self.optimizer.fp32_partitioned_groups_flat):
            groups[self.optimizer.sub_group_to_group_id[sub_group]].append(flat)
        return groups

    def _ensure_optimizer_state(self) -> None:
        """State exists only after a first step. As DCP's get_state_dict does for the native engine, take
        one step with zero gradients and lr 0 (the parameters do not move) so that it exists, then let
        DeepSpeed link every parameter to its fragment of it (it links once, after the first group's step,
        before the other groups have state)."""
        base = self._base()
        for index, flats in enumerate(self._flats_by_group()):
            for flat in flats:
                if not base.state.get(flat):
                    self._zero_step(index, flat)
        if self.zero < 3:
            self.optimizer._hp_optimizer_states_linked = False
            self.optimizer._lazy_init_hp_params_optimizer_state()

    def _zero_step(self, group_index: int, flat: torch.Tensor) -> None:
        """One lr-0 step of one flat partition; under ZeRO-Infinity its partition lives on NVMe between steps,
        so it is swapped in around the step as DeepSpeed's own step does."""
        sub_group = next((i for i, f in enumerate(getattr(self.optimizer, "fp32_partitioned_groups_flat", []))
                          if f is flat), None)
        swapped = sub_group is not None and self.optimizer._swappable_optimizer_subgroup(sub_group)
        if swapped:
            self.optimizer._optimizer_states_and_gradient_swap_in(sub_group)
        group = self._base().param_groups[group_index]
        resting = group["params"], group["lr"], flat.grad  # offload keeps a gradient buffer on the partition
        group["params"], group["lr"] = [flat], 0.0
        flat.grad = torch.zeros_like(flat)
        self._base().step()
        group["params"], group["lr"], flat.grad = resting
        if swapped:
            self.optimizer._optimizer_states_and_gradient_swap_out(sub_group)

    def _state_keys(self) -> tuple[list[str], dict[str, Any]]:
        """(per-element state names, {scalar state name: value}); every flat partition has the same."""
        state = next(iter(self._base().state.values()), {})  # plain SGD (no momentum) keeps no state at all
        per_element = [k for k, v in state.items() if torch.is_tensor(v) and v.dim() > 0]
        scalars = {k: (v.clone() if torch.is_tensor(v) else torch.tensor(float(v))) for k, v in state.items()
                   if k not in per_element}  # DeepSpeed's CPU Adam counts "step" in an int; torch in a tensor
        return per_element, scalars

    def _group_options(self, index: int) -> dict[str, Any]:
        live = self.param_groups[index]
        return {k: live.get(k, v) for k, v in self.torch_options[index].items()}

    def layout_free_state(self) -> dict[str, dict]:
        """Every rank calls it (the gathers are collectives); every rank gets full tensors."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        self._ensure_optimizer_state()
        per_element, scalars = self._state_keys()
        full = {name: safe_get_full_fp32_param(param).detach().clone() for name, param in self.params.items()}
        optim: dict[str, Any] = {}
        for index, names in enumerate(self.group_names):
            options = self._group_options(index)
            for name in names:
                for key in per_element:
                    optim[f"state.{name}.{key}"] = safe_get_full_optimizer_state(self.params[name], key).clone()
                optim.update({f"state.{name}.{key}": value for key, value in scalars.items()})
                optim.update({f"param_groups.{name}.{key}": value for key, value in options.items()})
        return {"model": self._model_entries(full), "optim": optim}

    def _model_entries(self, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The module's state_dict keys (tied weights under each name, buffers too), parameters full."""
        name_of = {id(param): name for name, param in self.params.items()}
        entries = {}
        for key, value in self.module.state_dict(keep_vars=True).items():
            entries[key] = full[name_of[id(value)]] if id(value) in name_of else value.detach()
        return entries

    @torch.no_grad()
    def load_layout_free_state(self, state: dict[str, dict]) -> None:
        """The inverse: full tensors (every rank the same) into DeepSpeed's partitions and the module."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        model, optim = state["model"], state["optim"]
        self._ensure_optimizer_state()
        per_element, scalars = self._state_keys()
        for name, param in self.params.items():
            safe_set_full_fp32_param(param, model[name])
            for key in per_element:
                safe_set_full_optimizer_state(param, optim[f"state.{name}.{key}"], key)
        self._copy_into_module(model)
        first = self.group_names[0][0]
        for flat_state in self._base().state.values():
            for key in scalars:
                value, live = optim[f"state.{first}.{key}"], flat_state[key]
                flat_state[key] = value.clone().to(live.dtype) if torch.is_tensor(live) else type(live)(value.item())
        for index, names in enumerate(self.group_names):
            for key in self._group_options(index):
                if key in self.param_groups[index]:
                    self.param_groups[index][key] = optim[f"param_groups.{names[0]}.{key}"]

    def _copy_into_module(self, model: dict[str, torch.Tensor]) -> None:
        """The parameters the forward reads: whole on every rank under ZeRO 1/2; under ZeRO-3 gathered,
        written on rank 0 and repartitioned (every rank read the same values)."""
        if self.zero < 3:
            for name, param in self.params.items():
                param.data.copy_(model[name])
            return
        import deepspeed

        params = list(self.params.values())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            for name, param in self.params.items():
                param.data.copy_(model[name])


def size_nvme_buffers(config: dict, model: nn.Module, dp_size: int) -> None:
    """Host memory is what NVMe offload is for, and DeepSpeed's defaults spend it: 5 parameter swap buffers of
    1e8 elements (2 GB), optimizer swap buffers and a gradient bucket of 5e8 elements. Each buffer is sized
    here to the largest parameter's partition (plus DeepSpeed's alignment padding), and the parameter swap
    buffers are as many as one module fetches at once (prefetching and reuse off), plus one; a key the
    user's file sets wins. What stays is DeepSpeed's fp32 gradient partition of the whole model per rank
    (4 bytes x parameters / dp, half the rank's Adam state), which it keeps outside these settings."""
    zero = config["zero_optimization"]
    swap = zero["offload_param"]
    threshold = zero.setdefault("stage3_param_persistence_threshold", 100_000)  # smaller ones stay whole in memory
    swapped_per_module = [sum(p.numel() > threshold for p in module.parameters(recurse=False))
                          for module in model.modules()]
    largest = max(p.numel() for p in model.parameters())
    swap.setdefault("buffer_size", -(-largest // dp_size) + 4096)
    swap.setdefault("buffer_count", max(swapped_per_module) + 1)
    swap.setdefault("max_in_cpu", 0)
    zero.setdefault("stage3_prefetch_bucket_size", 0)
    zero.setdefault("stage3_max_reuse_distance", 0)  # else gathered parameters stay (in the buffers) for reuse
    # The optimizer swaps one sub-group of the flat fp32 partition at a time, through 4 buffers (weights, m, v,
    # gradient) of the largest sub-group's size. A sub-group takes parameters until it holds sub_group_size
    # elements, so the largest is the largest partition plus up to sub_group_size - 1: the least DeepSpeed
    # swaps (1 MiB, MIN_SWAPPABLE_BYTES) keeps it near the largest partition, and smaller sub-groups would
    # keep their fp32 weights and Adam state in host memory.
    zero.setdefault("sub_group_size", 2**20 // 4)
    zero.setdefault("reduce_bucket_size", swap["buffer_size"])  # the gradient bucket


def offload_optimizer(optimizer: torch.optim.Optimizer, config: dict) -> torch.optim.Optimizer:
    """ZeRO-Offload steps on the host: AdamW becomes DeepSpeed's CPU Adam (the same update, AVX kernels; built
    once, about a minute, then cached) over the same groups; SGD stays torch's, which DeepSpeed must be
    told to accept."""
    if not isinstance(optimizer, torch.optim.AdamW):
        config["zero_force_ds_cpu_optimizer"] = False
        return optimizer
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    defaults = optimizer.defaults
    groups = [{"params": group["params"], "weight_decay": group["weight_decay"]} for group in optimizer.param_groups]
    return DeepSpeedCPUAdam(groups, lr=defaults["lr"], betas=defaults["betas"], eps=defaults["eps"],
                            weight_decay=defaults["weight_decay"], adamw_mode=True)


class LossScaleState:
    """DeepSpeed's fp16 dynamic loss scale in checkpoints, under the native scaler's keys (scale,
    clean_steps, enabled; train/precision.py), so either engine resumes the other's scale; DeepSpeed's own
    counters ride along for an exact DeepSpeed resume. DeepSpeed's growth rule is its own: the first
    growth after a start or an overflow comes one clean step later than the native scaler's."""

    def __init__(self, engine: DeepSpeedEngine):
        self.engine = engine

    def _scaler(self):
        return self.engine.optimizer.loss_scaler if self.engine.fp16 else None

    def state_dict(self) -> dict[str, Any]:
        scaler = self._scaler()
        if scaler is None:
            return {"scale": 1.0, "clean_steps": 0, "enabled": False}
        clean = scaler.cur_iter - scaler.last_overflow_iter - 1
        return {"scale": float(scaler.cur_scale), "clean_steps": clean % scaler.scale_window, "enabled": True,
                "deepspeed": {"cur_iter": scaler.cur_iter, "last_overflow_iter": scaler.last_overflow_iter,
                              "cur_hysteresis": scaler.cur_hysteresis}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        scaler = self._scaler()
        if scaler is None or not state.get("enabled", False):
            return  # switching precision on resume starts a fresh scale, as natively
        scaler.cur_scale = float(state["scale"])
        exact = state.get("deepspeed")
        if exact:
            scaler.cur_iter, scaler.last_overflow_iter = exact["cur_iter"], exact["last_overflow_iter"]
            scaler.cur_hysteresis = exact["cur_hysteresis"]
        else:
            scaler.last_overflow_iter = scaler.cur_iter - int(state["clean_steps"]) - 1
