"""The stateful loader: a deterministic global sample order, split across data-parallel ranks only.

A split's token stream is cut into samples (windows of `objective.window_length(seq_len)` tokens every
`objective.stride(seq_len)` tokens). Global sample position g (the g-th sample the run consumes, counted
over all dp ranks) is sample `permutation(seed, epoch)[g % samples_per_epoch]` of epoch
g // samples_per_epoch. Step s consumes positions [s*G, (s+1)*G) for global batch G; dp rank r takes the
r-th contiguous block of G/dp and cuts it into micro-batches. The state is just the number of consumed
positions, so a run resumed with another dp size sees exactly the same global batches, and the random
masks are the same too: each sample's Generator is seeded from (seed, sample index[, epoch]), never from
the rank. Tensor- and pipeline-parallel ranks of one replica pass the same dp_rank and get the same data.

How the trainer uses this:

    data = build_datasets(cfg)                      # scaletrain.data.prepare: tokenizer + memmapped shards
    vocab = check_vocab(cfg.model, data.tokenizer, dims.tp)   # UserError if the model is too small
    objective = build_objective(cfg.data, data.tokenizer, cfg.trainer.seq_len)
    loader = Loader(data.train, objective, cfg.trainer.seq_len, cfg.trainer.global_batch,
                    cfg.trainer.micro_batch, dims.dp_rank, dims.dp_size, cfg.seed)
    loader.load_state_dict(saved["loader"])         # resume (any dp size)
    for step in range(start_step, max_steps):
        micro_batches = next(loader)                # loader.accumulation_steps dicts of (micro_batch, T) tensors
        ...
        saved["loader"] = loader.state_dict()
    for batch in validation_batches(data.validation, objective, cfg.trainer.seq_len, cfg.trainer.micro_batch,
                                    dims.dp_rank, dims.dp_size, cfg.trainer.eval_batches, cfg.seed): ...
"""

from __future__ import annotations

import logging
from typing import Dict, Iterator, List

import numpy as np
import torch

from scaletrain.data.indexed import IndexedTokens, out_of_range
from scaletrain.data.mixture import Mixture, MixtureOrder
from scaletrain.data.tasks import LabelledSet
from scaletrain.errors import DataError

log = logging.getLogger(__name__)

Batch = Dict[str, torch.Tensor]
_TRAIN_STREAM, _VALIDATION_STREAM = 0, 1  # separate random streams for train and validation masks


class SampleView:
    """Sample i of a split: tokens[i*stride : i*stride + window] of the packed stream."""

    def __init__(self, dataset: IndexedTokens, objective, seq_len: int, split: str = "train"):
        self.tokens, self.prefix, self.vocab_size = dataset.tokens, dataset.prefix, dataset.vocab_size
        self.window = objective.window_length(seq_len)
        self.stride = objective.stride(seq_len)
        if self.window < 4:
            raise DataError(f"trainer.seq_len={seq_len} leaves {self.window} tokens per sample for "
                            f"{objective.name}; raise trainer.seq_len")
        available = dataset.num_tokens
        self.num_samples = (available - self.window) // self.stride + 1 if available >= self.window else 0
        if self.num_samples == 0:
            raise DataError(f"the {split} split {dataset.prefix} has {available} tokens, fewer than one "
                            f"{objective.name} sample of {self.window}; use a larger corpus or lower "
                            f"trainer.seq_len")
        unused = available - ((self.num_samples - 1) * self.stride + self.window)
        log.info("%s split: %d samples of %d tokens (stride %d); the last %d tokens fill no sample", split,
                 self.num_samples, self.window, self.stride, unused)

    def __getitem__(self, index: int) -> np.ndarray:
        start = index * self.stride
        sample = np.asarray(self.tokens[start:start + self.window])
        # A damaged shard must not reach the embedding (an IndexError, or a CUDA assert): two reductions
        # over a sample cost nothing beside the step.
        bad = None if self.vocab_size is None else out_of_range(sample, self.vocab_size)
        if bad is not None:
            at = start + int(np.argmax(sample == bad))
            raise DataError(f"{self.prefix}.bin holds token id {bad} at token {at}, outside the vocabulary of "
                            f"{self.vocab_size} tokens: the shard is damaged or made with another tokenizer; "
                            f"prepare it again (scaletrain data prepare --check DIR tells what is wrong)")
        return sample


def make_example(view: SampleView, objective, index: int, seed: int, stream: int, epoch: int,
                 source: tuple = ()) -> dict:
    """`source` is () for a single dataset and (s,) for mixture source s, so sources draw other masks."""
    rng = None
    if objective.needs_rng:
        # Static masking (original BERT) reuses the epoch-0 masks; dynamic (RoBERTa) redraws every epoch.
        mask_epoch = epoch if getattr(objective, "dynamic", True) else 0
        rng = np.random.default_rng((seed, stream, mask_epoch, index) + source)
    other = None
    if getattr(objective, "needs_other", False):  # NSP's unrelated second segment: any other sample
        other_index = int(rng.integers(max(view.num_samples - 1, 1)))
        other_index += other_index >= index and view.num_samples > 1
        other = view[other_index]
    return objective(view[index], rng, other)


def collate(examples: List[dict]) -> Batch:
    return {key: torch.from_numpy(np.stack([example[key] for example in examples])) for key in examples[0]}


class Loader:
    """Iterating yields, per optimizer step, this dp rank's list of `accumulation_steps` micro-batches."""

    def __init__(self, dataset, objective, seq_len: int, global_batch: int, micro_batch: int,
                 dp_rank: int = 0, dp_size: int = 1, seed: int = 0):
        """`dataset`: IndexedTokens (or MegatronTokens), a data.mixture.Mixture of several, or a task's
        data.tasks.LabelledSet."""
        if global_batch % (micro_batch * dp_size) != 0:
            raise DataError(f"trainer.global_batch={global_batch} is not divisible by trainer.micro_batch x dp "
                            f"= {micro_batch} x {dp_size}; change global_batch or micro_batch")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} outside [0, {dp_size})")
        self.mixture = dataset if isinstance(dataset, Mixture) else None
        if self.mixture:
            self.views = [SampleView(source.train, objective, seq_len, split=f"{source.name} train")
                          for source in self.mixture.sources]
            self.order = MixtureOrder(self.mixture.weights, [v.num_samples for v in self.views], seed)
        # a task's LabelledSet is already one example per record; a token stream is cut into windows
        labelled = isinstance(dataset, LabelledSet)
        self.view = self.views[0] if self.mixture else dataset if labelled else SampleView(dataset, objective, seq_len)
        self.objective = objective
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.dp_rank, self.dp_size, self.seed = dp_rank, dp_size, seed
        self.accumulation_steps = global_batch // (micro_batch * dp_size)
        self.consumed_samples = 0  # global positions consumed by all dp ranks together
        self._permutation_epoch, self._permutation = -1, None

    @property
    def samples_per_epoch(self) -> int:
        return self.view.num_samples

    @property
    def epoch(self) -> int:
        return self.consumed_samples // self.samples_per_epoch

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._permutation_epoch:
            self._permutation = np.random.default_rng((self.seed, epoch)).permutation(self.samples_per_epoch)
            self._permutation_epoch = epoch
        return self._permutation

    def sample_at(self, position: int) -> dict:
        if self.mixture:
            source, index, epoch = self.order.locate(position)
            return make_example(self.views[source], self.objective, index, self.seed, _TRAIN_STREAM, epoch,
                                (source,))
        epoch, offset = divmod(position, self.samples_per_epoch)
        index = int(self.permutation(epoch)[offset])
        return make_example(self.view, self.objective, index, self.seed, _TRAIN_STREAM, epoch)

    def global_positions(self, step_start: int) -> np.ndarray:
        """This rank's positions of the global batch starting at `step_start`, (accumulation, micro)."""
        per_rank = self.global_batch // self.dp_size
        first = step_start + self.dp_rank * per_rank
        return np.arange(first, first + per_rank).reshape(self.accumulation_steps, self.micro_batch)

    def __iter__(self) -> Iterator[List[Batch]]:
        return self

    def __next__(self) -> List[Batch]:
        positions = self.global_positions(self.consumed_samples)
        micro_batches = [collate([self.sample_at(int(p)) for p in row]) for row in positions]
        self.consumed_samples += self.global_batch
        return micro_batches

    def log_plan(self, total_samples) -> None:
        """Logs each mixture source's weight and epochs over the run (nothing for a single dataset)."""
        if self.mixture:
            self.mixture.log_plan([view.num_samples for view in self.views], total_samples)

    def _identity(self) -> dict:
        if self.mixture:  # a mixture's samples_per_epoch is per source, and the weights are part of the order
            return {"samples_per_epoch": [view.num_samples for view in self.views],
                    "mixture_weights": [round(weight, 12) for weight in self.mixture.weights]}
        return {"samples_per_epoch": self.samples_per_epoch}

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples, "seed": self.seed, **self._identity(),
                "window": self.view.window, "objective": self.objective.name}

    def load_state_dict(self, state: dict) -> None:
        saved = ({key: state.get(key) for key in self._identity()}, state["window"], state["objective"],
                 state["seed"])
        current = (self._identity(), self.view.window, self.objective.name, self.seed)
        if saved != current:
            raise DataError(f"the loader state was saved for (samples, window, objective, seed) = {saved} but "
                            f"this run has {current}; resume with the same data, seq_len, objective and seed")
        if state["consumed_samples"] % self.global_batch:
            log.warning("resuming at sample %d, which is not a multiple of the global batch %d",
                        state["consumed_samples"], self.global_batch)
        self.consumed_samples = int(state["consumed_samples"])


def validation_batches(dataset: IndexedTokens, objective, seq_len: int, micro_batch: int, dp_rank: int = 0,
                       dp_size: int = 1, max_batches: int = 8, seed: int = 0) -> Iterator[Batch]:
    """The first max_batches x micro_batch x dp samples in file order, with masks fixed by the seed, so
    every evaluation of a run (and of a resumed run) scores the same tokens. Yields this rank's batches."""
    if max_batches <= 0:
        return
    view = SampleView(dataset, objective, seq_len, split="validation")
    per_batch = micro_batch * dp_size
    batches = min(max_batches, view.num_samples // per_batch)
    if batches == 0:
        raise DataError(f"the validation split {dataset.prefix} has {view.num_samples} samples, fewer than one "
                        f"batch of micro_batch x dp = {per_batch}; raise data.val_fraction or lower "
                        f"trainer.micro_batch")
    if batches < max_batches:
        log.info("validation: %d samples make %d batches, fewer than the %d asked for", view.num_samples,
                 batches, max_batches)
    for batch in range(batches):
        first = batch * per_batch + dp_rank * micro_batch
        yield collate([make_example(view, objective, index, seed, _VALIDATION_STREAM, 0)
                       for index in range(first, first + micro_batch)])
