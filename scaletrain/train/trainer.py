"""The training loop. `Trainer(cfg)` builds everything in the order of design.md §3; `train()` runs it.

Loss normalisation: each micro-batch's loss is (sum of its token losses) / (target count of the whole
global batch, all-reduced over dp), and data parallelism sums gradients (parallel/data.py), so the gradient
is the exact mean over the global batch whatever the dp size or the accumulation steps."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from scaletrain import parallel
from scaletrain.checkpoint.manager import TOKENIZER, CheckpointManager
from scaletrain.configs.schema import TrainConfig
from scaletrain.data.loader import Loader, validation_batches
from scaletrain.data.mixture import metric_names
from scaletrain.data.objectives import IGNORE_INDEX, build_objective
from scaletrain.data.prepare import build_datasets
from scaletrain.data.tokenizer import check_vocab
from scaletrain.errors import REQUEUE_EXIT_CODE, InputError, UserError
from scaletrain.models.registry import TASK_LOSSES, build_model, get_spec
from scaletrain.train import metrics as flops
from scaletrain.train.loggers import MetricLogger
from scaletrain.train.optim import build_optimizer
from scaletrain.train.precision import LossScaler, autocast, grads_are_finite
from scaletrain.train.sample import generate_sample
from scaletrain.train import signals
from scaletrain.train.schedule import LRSchedule

log = logging.getLogger(__name__)
RESOLVED_CONFIG = "config.yaml"


class TrainingDiverged(UserError):
    """K consecutive non-finite losses: the run stops and keeps its last good checkpoint."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken (skipped ones included: their data was consumed)
    tokens: int = 0  # input tokens consumed, all ranks
    skipped_steps: int = 0  # updates skipped for a non-finite loss or an fp16 overflow
    nonfinite_streak: int = 0  # consecutive non-finite losses
    best_metric: float = math.nan  # checkpoint.keep_best's best value so far, at step best_step
    best_step: int = -1

    def state_dict(self) -> dict[str, float]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, float]) -> None:
        for key, value in state.items():
            setattr(self, key, type(getattr(self, key))(value))


def init_distributed(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    """Rank, world size and device from the standard variables (RANK, WORLD_SIZE, LOCAL_RANK)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cpu")
    if cfg.cluster.device == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"cluster={cfg.cluster.name} asks for CUDA but none is available; use cluster=cpu_local")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    # gloo next to nccl: checkpoint collectives and async saves run on CPU tensors.
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend)
    elif cfg.parallel.engine == "deepspeed" and not dist.is_initialized():
        # DeepSpeed needs a process group even on one rank (a single-process run, each job of a multirun),
        # which needs no rendezvous. It stays for the process's life: DeepSpeed keeps groups made from it.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed reads it; a launcher would have set it
    return rank, world_size, device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def count_targets(batch: dict, with_nsp: bool) -> torch.Tensor:
    """The positions loss_fn scores: labels != -100, regression targets that are not NaN (and BERT's NSP
    labels, one per sequence)."""
    labels = batch["labels"]
    count = (~labels.isnan() if labels.is_floating_point() else labels != IGNORE_INDEX).sum()
    if with_nsp and "next_sentence_label" in batch:
        count = count + (batch["next_sentence_label"] != IGNORE_INDEX).sum()
    return count


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg, t = cfg, cfg.trainer
        self.rank, self.world_size, self.device = init_distributed(cfg)
        self.dims = parallel.ParallelDims.from_config(cfg.parallel, self.world_size)
        self.dims.build_mesh(self.device.type)
        self.run_dir = Path(cfg.run_dir)
        # First: a run folder that cannot hold checkpoints fails before minutes of data preparation.
        self.checkpoints = CheckpointManager(cfg.checkpoint, self.run_dir, self.rank, self.world_size)
        seed_everything(cfg.seed + self.dims.dp_rank)  # dropout differs across dp ranks, not across tp/pp

        # Data: tokenizer + memory-mapped shards (or a task's labelled records); the loader splits each global
        # batch over dp ranks.
        self.task = cfg.data.task if cfg.data.task != "lm" else None
        if self.task is None:
            self.data = build_datasets(cfg, progress=self.rank == 0)
            self.objective = build_objective(cfg.data, self.data.tokenizer, t.seq_len)
        else:
            from scaletrain.data.tasks import build_task_data

            self.data = build_task_data(cfg)
            self.objective = self.data.objective
            # the head's size comes from the data; the saved config records it (export, load_model read it)
            cfg = self.cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model,
                                                                                 num_labels=self.data.num_labels))
        check_vocab(cfg.model, self.data.tokenizer, self.dims.tp)
        self.eval_prompts = self._eval_task_prompts()
        self.loader = Loader(self.data.mixture or self.data.train, self.objective, t.seq_len, t.global_batch,
                             t.micro_batch, self.dims.dp_rank, self.dims.dp_size, cfg.seed)

        # Model: built on meta, parallelized, then materialized (initialization is layout-independent).
        self.model_cfg = parallel.padded_model_config(cfg.model, self.dims.tp)
        self.spec = get_spec(self.model_cfg.family)
        # text-to-text is the encoder-decoder's own loss on the label words; a head has the task's loss
        self.text_to_text = cfg.data.text_to_text
        self.loss_fn = TASK_LOSSES[self.task] if self.task and not self.text_to_text else self.spec.loss_fn
        self.model = build_model(self.model_cfg, device="meta")
        self.model = parallel.parallelize(self.model, self.dims, cfg)  # pp > 1: this rank's stages only
        parallel.materialize(self.model, self.device, cfg.seed)
        self.init_report = None
        if self.model_cfg.init_from:  # pretrained weights; a resume below still overrides them
            from scaletrain.checkpoint.init_from import load_init_weights

            self.init_report = load_init_weights(self.model, self.model_cfg)
        self.model.train()
        self.pipeline = self._build_pipeline()

        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.engine = None  # parallel.engine=deepspeed: DeepSpeed partitions, reduces and steps
        if self.dims.engine == "deepspeed":
            from scaletrain.parallel.deepspeed import DeepSpeedEngine

            self.engine = self.optimizer = DeepSpeedEngine(self.model, self.optimizer, cfg, self.dims)
        self.optimizer = parallel.shard_optimizer_state(self.optimizer, self.model, self.dims)
        self.total_steps = self._total_steps()
        self.loader.log_plan(self.total_steps * t.global_batch if math.isfinite(self.total_steps) else None)
        self.schedule = LRSchedule(self.optimizer, cfg.optim, self.total_steps)
        # DeepSpeed keeps its own fp16 loss scale (configured from the same trainer.loss_scale_* fields)
        self.scaler = LossScaler(cfg.precision == "fp16" and self.engine is None, t.loss_scale_init, t.loss_scale_growth_interval)
        self.state = TrainState()
        self.resumed_from = self._resume()
        if self.rank == 0:  # only now: a failed resume keeps the config of the run that wrote the checkpoints
            OmegaConf.save(OmegaConf.structured(cfg), self.run_dir / RESOLVED_CONFIG)
        self.logger: Optional[MetricLogger] = None
        self.stop_signal: Optional[int] = None
        self.losses: list[float] = []  # per-step training loss (tests compare these bitwise)
        self.last_eval: dict[str, float] = {}
        self.last_eval_step = -1
        self.best_improved = False  # the last evaluation improved checkpoint.keep_best's metric
        self.last_record: dict[str, Any] = {}
        self._targets_checked = False

    # ---- setup helpers -----------------------------------------------------------------------------
    def _total_steps(self) -> int:
        t = self.cfg.trainer
        steps = t.max_steps if t.max_steps > 0 else math.inf
        if t.max_tokens > 0:
            steps = min(steps, math.ceil(t.max_tokens / (t.global_batch * t.seq_len)))
        return int(steps)

    def _build_pipeline(self):
        """pp > 1: this rank's stages wrapped in the configured schedule; None without pipeline parallelism."""
        if not self.dims.pp_enabled:
            return None
        from scaletrain.parallel.pipeline import build_pipeline, n_microbatches

        n_micro = n_microbatches(self.cfg.trainer, self.dims.dp_size)
        return build_pipeline(self.model.stages, self.model_cfg, self.cfg.parallel, n_micro, self.dims, self.device)

    def stateful(self) -> dict[str, Any]:
        """Everything besides model/optimizer/RNG that a checkpoint must restore."""
        scaler = self.engine.loss_scale_state if self.engine is not None else self.scaler
        return {"progress": self.state, "schedule": self.schedule, "scaler": scaler, "loader": self.loader}

    def _resume(self) -> Optional[Path]:
        path = self.checkpoints.resolve_resume(self.cfg.resume)
        if path is not None:
            self.checkpoints.load(path, self.model, self.optimizer, self.stateful())
            if self.rank == 0:
                log.info("resumed from %s at step %d", path, self.state.step)
        return path

    def save(self) -> None:
        metadata = {"tokens": self.state.tokens, "config": asdict(self.cfg), "layout": self.dims.describe()}
        if self.last_eval_step == self.state.step:  # keep_best ranks checkpoints by these
            metadata["metrics"] = dict(self.last_eval)
        files = {TOKENIZER: self.data.tokenizer.json.encode()}
        if self.task:
            from scaletrain.data.tasks import LABELS_FILE

            files[LABELS_FILE] = self.data.label_file()
        self.checkpoints.save(self.state.step, self.model, self.optimizer, self.stateful(), metadata, files=files)

    # ---- the loop ----------------------------------------------------------------------------------
    def train(self) -> int:
        """Runs to max_steps / max_tokens. Returns 0, or REQUEUE_EXIT_CODE after a stop signal."""
        cfg, t = self.cfg, self.cfg.trainer
        self.logger = MetricLogger(self.run_dir, self.rank == 0, self.total_steps, self.state.step,
                                   use_wandb=cfg.logger == "wandb", wandb_config=asdict(cfg),
                                   progress_bar=t.progress_bar, run_name=cfg.model.name)
        with signals.installed(), contextlib.ExitStack() as stack:
            deferring = False
            try:
                self.throughput = flops.Throughput(cfg.cluster.peak_tflops(cfg.precision), self.world_size)
                while self.state.step < self.total_steps:
                    started = time.perf_counter()
                    step_metrics = self.train_step(next(self.loader))  # data loading counts as training time
                    if not deferring:  # from now on there is something to save: a stop signal waits for the step
                        stack.enter_context(signals.deferred())
                        deferring = True
                    self.throughput.add(step_metrics.pop("tokens"), step_metrics.pop("flops"),
                                        time.perf_counter() - started)
                    self.state.step += 1
                    self.logger.advance()
                    if self.state.step % t.log_every == 0 or self.state.step == self.total_steps:
                        self._log(step_metrics)
                    if t.eval_every > 0 and self.state.step % t.eval_every == 0:
                        self.evaluate()
                    if self._stop_requested():
                        return self._stop_and_save()
                    if self._periodic_save_due():
                        self.save()
                self._finish()
                return 0
            except KeyboardInterrupt:
                raise signals.Interrupted(self._interrupted_message()) from None
            finally:
                self.checkpoints.close()
                self.logger.close()

    def _stop_and_save(self) -> int:
        self.save()
        self.checkpoints.wait()
        self.logger.write(f"stopped by {signals.signal_name(self.stop_signal)} at step {self.state.step}; "
                          f"checkpoint saved, exiting with {REQUEUE_EXIT_CODE} (requeue)")
        received, self.stop_signal = signals.pending(), None
        signals.clear()
        if received is not None:
            signals.hand_over(received)  # under submitit: requeue the job now that the state is saved
        return REQUEUE_EXIT_CODE

    def _interrupted_message(self) -> str:
        """Ctrl-C: where the run stands; a second Ctrl-C while an async save finishes exits at once."""
        with contextlib.suppress(Exception):
            self.checkpoints.wait()
        last = self.checkpoints.parent["path"] if self.checkpoints.parent else None
        kept = f"the last complete checkpoint {last} is intact" if last else "no checkpoint was written yet"
        return (f"stopped by Ctrl-C at step {self.state.step}; {kept}; run the same command again in the same "
                f"run folder (resume=auto, the default) to continue")

    def _periodic_save_due(self) -> bool:
        """Every checkpoint.every steps and after an evaluation that improved checkpoint.keep_best's metric,
        but never inside a NaN streak: the last good checkpoint stays."""
        every, step = self.cfg.checkpoint.every, self.state.step
        due = (every > 0 and step % every == 0) or (self.best_improved and self.last_eval_step == step)
        return due and step < self.total_steps and self.state.nonfinite_streak == 0

    def train_step(self, micro_batches: list[dict]) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches; skips the update on a non-finite loss."""
        started = time.perf_counter()
        micro_batches = [{k: v.to(self.device, non_blocking=True) for k, v in b.items()} for b in micro_batches]
        lr = self.optimizer.param_groups[0]["lr"]
        local_targets = sum(count_targets(b, self.model_cfg.nsp_head) for b in micro_batches)
        global_targets = self._all_reduce_dp(local_targets.float())
        loss_sum, scored = self.forward_backward(micro_batches, global_targets)
        if not self._targets_checked:  # count_targets must count what loss_fn scores; checked once
            if int(scored) != int(local_targets):
                raise RuntimeError(f"loss_fn scored {int(scored)} targets but count_targets found "
                                   f"{int(local_targets)}; the normalisation would be wrong")
            self._targets_checked = True
        loss = (self._all_reduce_dp(loss_sum) / global_targets).item()  # CPU-GPU sync point, once a step
        finite, grad_norm = self._update(loss)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.update(found_overflow=not finite)
        self.schedule.step()
        self._count_nonfinite(finite, loss)
        tokens = sum(b["input_ids"].numel() for b in micro_batches) * self.dims.dp_size
        self.state.tokens += tokens
        self.losses.append(loss)
        return {"loss": loss, "grad_norm": grad_norm, "lr": lr, "step_time_s": time.perf_counter() - started,
                "tokens": tokens, "flops": sum(flops.batch_flops(self.model_cfg, b) for b in micro_batches)
                * self.dims.dp_size}

    def _update(self, loss: float) -> tuple[bool, float]:
        """Unscale, check, clip and step; returns (the update was taken, the gradient norm)."""
        if self.engine is not None:  # DeepSpeed clips, steps and skips an fp16 overflow itself
            grad_norm = self.engine.step()
            return math.isfinite(loss) and self.engine.update_applied(), grad_norm
        params = [p for p in self.model.parameters() if p.grad is not None]
        self.scaler.unscale_(params)
        finite = math.isfinite(loss) and (not self.scaler.enabled or grads_are_finite(params))
        grad_norm = float("nan")
        if finite:
            grad_norm = parallel.clip_grad_norm_(self.model, self.cfg.trainer.grad_clip, self.dims).item()
            finite = math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
        return finite, grad_norm

    def forward_backward(self, micro_batches: list[dict],
                         global_targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward + backward of every micro-batch; returns this rank's summed (unnormalised) loss and the
        number of targets loss_fn scored. The one place that branches to the pipeline schedule (pp > 1)."""
        if self.pipeline is not None:  # the schedule runs every micro-batch through this rank's stages
            grad_scale = self.scaler.scale if self.scaler.enabled else 1.0
            return self.pipeline.forward_backward(micro_batches, global_targets, grad_scale=grad_scale,
                                                  context=autocast(self.cfg.precision, self.device.type))
        loss_sum, scored = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        for index, batch in enumerate(micro_batches):
            self._set_gradient_sync(enabled=index == len(micro_batches) - 1)
            with parallel.loss_context(self.dims):
                with autocast(self.cfg.precision, self.device.type):
                    _, (micro_loss, count) = self._forward(batch)
                micro_loss = micro_loss.float()
                scaled = self.scaler.scale_loss(micro_loss / global_targets)
                if self.engine is not None:
                    self.engine.backward(scaled, last=index == len(micro_batches) - 1)
                else:
                    scaled.backward()
            loss_sum += micro_loss.detach()
            scored += count
        return loss_sum, scored

    def _forward(self, batch: dict) -> tuple[Any, tuple[torch.Tensor, torch.Tensor]]:
        """(model outputs, (loss sum, count)): the objective's forward, or a task's classify() (B, num_labels)."""
        if self.task and not self.text_to_text:
            method, inputs = "classify", {k: v for k, v in batch.items() if k != "labels"}
        else:
            method, inputs = "forward", {k: batch[k] for k in self.spec.input_keys if k in batch}
        if self.engine is not None:
            outputs = self.engine.forward(method, **inputs)
        else:
            outputs = (self.model if method == "forward" else getattr(self.model, method))(**inputs)
        return outputs, self.loss_fn(outputs, batch, self.model_cfg.kernels)

    def _set_gradient_sync(self, enabled: bool) -> None:
        """Gradient accumulation: FSDP2/replicate reduce gradients only on the last micro-batch."""
        if hasattr(self.model, "set_requires_gradient_sync"):
            self.model.set_requires_gradient_sync(enabled)

    def _count_nonfinite(self, finite: bool, loss: float) -> None:
        if finite:
            self.state.nonfinite_streak = 0
            return
        self.state.skipped_steps += 1
        overflow = math.isfinite(loss) and self.cfg.precision == "fp16"
        if overflow:  # fp16 gradient overflow: the scaler backs off; not a divergence
            return
        self.state.nonfinite_streak += 1
        if self.state.nonfinite_streak >= self.cfg.trainer.max_nonfinite_steps:
            self.checkpoints.wait()
            last = self.checkpoints.latest_complete()
            raise TrainingDiverged(
                f"the loss was NaN/Inf for {self.state.nonfinite_streak} consecutive steps (up to step "
                f"{self.state.step + 1}); updates were skipped and the last good checkpoint "
                f"{last or '(none yet)'} is intact; lower optim.lr, raise trainer.grad_clip or use precision=fp32")

    def _all_reduce_dp(self, value: torch.Tensor) -> torch.Tensor:
        mesh = self.dims.dp_mesh_flat
        if mesh is not None:
            value = value.clone()
            dist.all_reduce(value, group=mesh.get_group())
        return value

    # ---- evaluation, sample, logging ---------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss and perplexity over trainer.eval_batches fixed batches; with data.mixture, one
        loss per source (val_loss/<source>) and val_loss their mixture-weighted mean; for a task, the loss
        and its metrics over every validation record."""
        self.model.eval()
        if self.task:
            self.last_eval = self._task_evaluation()
        elif self.data.mixture is None:
            self.last_eval = {"val_loss": self._validation_loss(self.data.validation)}
        else:
            sources = self.data.mixture.sources  # distinct names: a shared one would drop a source from val_loss
            losses = {name: (s.weight, self._validation_loss(s.validation))
                      for name, s in zip(metric_names([s.name for s in sources]), sources)}
            val_loss = sum(weight * loss for weight, loss in losses.values())
            self.last_eval = {"val_loss": val_loss, **{f"val_loss/{name}": loss for name, (_, loss) in losses.items()}}
        self._score_eval_tasks()
        self.model.train()
        if not self.task:
            self.last_eval["val_ppl"] = math.exp(min(self.last_eval["val_loss"], 50.0))
        self.last_eval_step = self.state.step
        self._track_best()
        self.logger.log(self.state.step, self.last_eval)
        self.logger.write(f"step {self.state.step}: " + self._describe_eval())
        return self.last_eval

    def _eval_task_prompts(self) -> dict[str, list[dict]]:
        """trainer.eval_tasks: name -> the prompts, built once (demonstrations from the task file itself)."""
        from scaletrain.evaluation.fewshot import build_prompts, check_prompts_fit, read_task
        from scaletrain.inference.cli import framed_encoder

        prompts, t = {}, self.cfg.trainer
        for path in t.eval_tasks:
            examples = read_task(path)
            prompts[Path(path).stem] = build_prompts(examples, examples, t.eval_shots, self.cfg.seed)
            try:  # refused now rather than at the first evaluation, steps into the run
                check_prompts_fit(self.cfg.model.family, self.data.tokenizer,
                                  framed_encoder(self.data.tokenizer, self.cfg.model), prompts[Path(path).stem],
                                  t.seq_len)
            except InputError as error:
                raise InputError(f"trainer.eval_tasks: {path}: {error} (here --shots is trainer.eval_shots="
                                 f"{t.eval_shots}, the window trainer.seq_len={t.seq_len})") from None
        return prompts

    def _score_eval_tasks(self) -> None:
        """Every rank scores the same prompts (FSDP's gathers and the pipeline's schedule need all of them), so
        all log the same figures: scaletrain eval's scoring (fewshot.score_task) on the live model."""
        if not self.eval_prompts:
            return
        from scaletrain.evaluation import fewshot
        from scaletrain.inference.cli import framed_encoder, trained_special_ids

        tokenizer, window, family = self.data.tokenizer, self.cfg.trainer.seq_len, self.model_cfg.family
        special = trained_special_ids(tokenizer, self.model_cfg, self.cfg.data.objective)
        frame = framed_encoder(tokenizer, self.model_cfg)  # BERT / T5 / BART: the text with the family's specials
        score_rows = self._pipeline_row_scorer() if self.pipeline is not None else None
        for name, prompts in self.eval_prompts.items():
            scores = fewshot.score_task(self.model, family, tokenizer, frame, prompts, window,
                                        self.cfg.trainer.micro_batch, self.device, special, min(32, window // 2),
                                        score_rows)
            self.last_eval.update({f"task/{name}/{key}": value for key, value in scores.items() if key != "examples"})

    def _pipeline_row_scorer(self):
        """parallel.pp > 1: labelled rows (input ids, labels) -> their summed log-likelihoods, through the
        schedule n_micro x micro_batch rows of seq_len at a time (the training batch's shape; padding rows
        have no labels)."""
        from scaletrain.evaluation.fewshot import IGNORE, row_loglikelihoods

        t = self.cfg.trainer
        per_call, width = self.pipeline.schedule._n_microbatches * t.micro_batch, t.seq_len

        def score_rows(rows: list[tuple[list[int], list[int]]]) -> list[float]:
            scores = []
            for first in range(0, len(rows), per_call):
                chunk = rows[first:first + per_call]
                inputs = torch.zeros(per_call, width, dtype=torch.long)
                labels = torch.full((per_call, width), IGNORE, dtype=torch.long)
                for row, (ids, row_labels) in enumerate(chunk):  # right padding, as in one process
                    inputs[row, :len(ids)], labels[row, :len(row_labels)] = torch.tensor(ids), torch.tensor(row_labels)
                batch = {"input_ids": inputs.to(self.device), "labels": labels.to(self.device)}
                scores += self.pipeline.evaluate_rows(batch, row_loglikelihoods)[:len(chunk)].tolist()
            return scores

        return score_rows

    def _describe_eval(self) -> str:
        e = self.last_eval
        if self.task:
            return "validation " + ", ".join(f"{key[len('val_'):]} {value:.4f}" for key, value in e.items())
        per_source = "".join(f", {k.split('/', 1)[1]} {v:.4f}" for k, v in e.items() if "/" in k)
        return f"validation loss {e['val_loss']:.4f}, perplexity {e['val_ppl']:.2f}{per_source}"

    def _track_best(self) -> None:
        """checkpoint.keep_best: val_loss is best lowest, the task metrics highest (a NaN never improves)."""
        name = self.cfg.checkpoint.keep_best
        value = self.last_eval.get(name, math.nan) if name else math.nan
        best = self.state.best_metric
        sign = -1.0 if name == "val_loss" else 1.0
        self.best_improved = math.isfinite(value) and (not math.isfinite(best) or sign * (value - best) > 0)
        if self.best_improved:
            self.state.best_metric, self.state.best_step = value, self.state.step

    def _task_evaluation(self) -> dict[str, float]:
        """Loss and metrics over every validation record: each dp rank scores its share, and all ranks' outputs
        are gathered for the metrics (F1, MCC and Spearman do not add up over shards)."""
        from scaletrain.data.tasks import validation_batches
        from scaletrain.evaluation.metrics import prediction_metrics, task_metrics

        total, targets = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        outputs, labels = [], []
        for batch in validation_batches(self.data.validation, self.cfg.trainer.micro_batch, self.dims.dp_rank,
                                        self.dims.dp_size):
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with parallel.loss_context(self.dims), autocast(self.cfg.precision, self.device.type):
                output, (loss_sum, count) = self._forward(batch)
                predicted = self._predicted_classes(batch) if self.text_to_text else output.detach().float()
            total += loss_sum.float()
            targets += count
            outputs.append(predicted)
            labels.append(batch["class_ids" if self.text_to_text else "labels"])
        outputs, labels = self._gather_dp(torch.cat(outputs)), self._gather_dp(torch.cat(labels))
        real = ~labels.isnan() if labels.is_floating_point() else labels != IGNORE_INDEX  # not padding
        outputs, labels = outputs[real].cpu().numpy(), labels[real].cpu().numpy()
        if self.text_to_text:
            metrics = prediction_metrics(outputs, labels, len(self.data.labels.names))
        else:
            metrics = task_metrics(self.task, outputs, labels)
        return {"val_loss": (self._all_reduce_dp(total) / self._all_reduce_dp(targets)).item(), **metrics}

    def _predicted_classes(self, batch: dict) -> torch.Tensor:
        """data.text_to_text: (B,) the class whose label words greedy decoding wrote, or K for none."""
        from scaletrain.data.tasks import decoder_start_id
        from scaletrain.evaluation.text_to_text import greedy_tokens, matched_classes

        table = torch.as_tensor(self.data.label_targets, device=self.device)  # (K, L)
        start = decoder_start_id(self.data.tokenizer, self.model_cfg)
        return matched_classes(greedy_tokens(self.model, batch, table.shape[1], start), table)

    def _gather_dp(self, value: torch.Tensor) -> torch.Tensor:
        """Every dp rank's (equally long) tensor, concatenated on dim 0."""
        mesh = self.dims.dp_mesh_flat
        if mesh is None:
            return value
        parts = [torch.empty_like(value) for _ in range(self.dims.dp_size)]
        dist.all_gather(parts, value.contiguous(), group=mesh.get_group())
        return torch.cat(parts)

    def _validation_loss(self, validation) -> float:
        t, total, targets = self.cfg.trainer, torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        batches = validation_batches(validation, self.objective, t.seq_len, t.micro_batch,
                                     self.dims.dp_rank, self.dims.dp_size, t.eval_batches, self.cfg.seed)
        for batch in self._pipeline_groups(list(batches)) if self.pipeline is not None else batches:
            batch = {k: v.to(self.device) for k, v in batch.items()}
            if self.pipeline is not None:
                loss_sum, count = self.pipeline.evaluate(batch, context=autocast(self.cfg.precision, self.device.type))
            else:
                with parallel.loss_context(self.dims), autocast(self.cfg.precision, self.device.type):
                    _, (loss_sum, count) = self._forward(batch)
            total += loss_sum.float()
            targets += count
        return (self._all_reduce_dp(total) / self._all_reduce_dp(targets)).item()

    def _pipeline_groups(self, batches: list[dict]) -> list[dict]:
        """The schedule was built for n micro-batches per call: evaluate n validation batches at a time."""
        n = self.pipeline.schedule._n_microbatches
        if len(batches) < n:
            raise UserError(f"the validation split gives {len(batches)} batches of trainer.micro_batch="
                            f"{self.cfg.trainer.micro_batch} but the pipeline needs {n} per evaluation; raise "
                            f"trainer.eval_batches, lower trainer.micro_batch or set trainer.eval_every=0")
        groups = [batches[i:i + n] for i in range(0, len(batches) - n + 1, n)]  # a partial last group is left out
        return [{k: torch.cat([b[k] for b in group]) for k in group[0]} for group in groups]

    def _log(self, step_metrics: dict[str, float]) -> None:
        loss = step_metrics["loss"]
        record = {**step_metrics, "ppl": math.exp(min(loss, 50.0)) if math.isfinite(loss) else float("nan"),
                  "loss_scale": self.engine.loss_scale if self.engine is not None else self.scaler.scale,
                  "tokens": self.state.tokens, "skipped_steps": self.state.skipped_steps,
                  "peak_memory_gb": flops.peak_memory_bytes(self.device) / 2**30, **self.throughput.report()}
        self.logger.log(self.state.step, record)
        self.last_record = record

    def _finish(self) -> None:
        cfg = self.cfg
        if cfg.trainer.eval_every > 0 and self.state.step % cfg.trainer.eval_every != 0:
            self.evaluate()
        if cfg.checkpoint.save_final:
            self.save()
            if cfg.checkpoint.export_hf:
                self._export_hf()
        if (cfg.trainer.sample_tokens > 0 and self.model_cfg.family in ("gpt", "encdec") and not self.dims.pp_enabled
                and not self.task):
            text = generate_sample(self.model, self.model_cfg, self.data, self.objective, cfg, self.device)
            self.logger.write(f"sample: {text}")
        final = {"step": self.state.step, "tokens": self.state.tokens, "skipped_steps": self.state.skipped_steps,
                 **self.last_record, **self.last_eval, **flops.parameter_counts(self.model)}
        if cfg.checkpoint.keep_best and self.state.best_step >= 0:
            final.update({f"best_{cfg.checkpoint.keep_best}": self.state.best_metric, "best_step": self.state.best_step})
        self.logger.finish(final)

    def _export_hf(self) -> None:
        """The final checkpoint read back as `scaletrain export` reads it (one process, any layout)."""
        from scaletrain.checkpoint.export import HF_EXPORT_DIR, export_checkpoint

        self.checkpoints.wait()
        step = self.checkpoints.parent["path"]
        out = self.run_dir / HF_EXPORT_DIR / Path(step).name
        if self.rank == 0:
            if out.is_dir() and any(out.iterdir()):
                log.info("checkpoint.export_hf: %s already holds this step's export; left as it is", out)
            else:
                export_checkpoint(step, out)
                self.logger.write(f"exported {step} as a Hugging Face folder: {out}")
        self.checkpoints.barrier()

    # ---- signals -----------------------------------------------------------------------------------
    def _stop_requested(self) -> bool:
        """All ranks stop together if any rank got a signal (Slurm signals every task, but not atomically)."""
        if self.stop_signal is None:
            self.stop_signal = signals.pending()
        flag = torch.tensor(float(self.stop_signal is not None), device=self.device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
