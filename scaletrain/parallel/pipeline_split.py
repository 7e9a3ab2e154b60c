"""Pipeline stage split: which layers each of the pp x pp_virtual stages owns, and the stage modules.

The layer sequence is the model's blocks in execution order: `layers.0..L-1` for GPT/BERT; for the
encoder-decoders `encoder.layers.*` then `decoder.layers.*`, so encoder stages come first and one stage may
hold the encoder's tail and the decoder's head. A stage is the full model with every module it does not own
deleted; its surviving children are adopted by a small per-family stage module under the same attribute
names, so parameter names (and checkpoints) never depend on the layout.

Ownership: the first stage holds every embedding (token, position, token type, embedding norm and the T5
relative-bias tables, whose (1, H, T, T) biases then travel down the pipe with their gradients); the stage
holding the last encoder layer holds `encoder.final_norm`; the last stage holds the final norm and the
heads. With tied embeddings the last stage keeps its own copy of the table (see TiedEmbeddings)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scaletrain.configs.schema import ModelConfig, ParallelConfig, check_pp_split
from scaletrain.errors import ConfigError
from scaletrain.models.blocks import Block
from scaletrain.models.xlnet import XLNetBlock

V_SHAPED_SCHEDULES = ("zbv", "dualpipev")  # stage s and stage 2pp-1-s live on the same rank


@dataclass(frozen=True)
class StagePlan:
    index: int
    num_stages: int
    start: int  # first layer of the execution-order sequence this stage owns
    end: int  # one past its last layer
    n_encoder: int  # encoder depth (0 for GPT/BERT): sequence positions below it are encoder layers

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1

    def layer_keys(self, family: str) -> dict[str, list[str]]:
        """Owned layer ids per stack: {"layers": [...]} or {"encoder": [...], "decoder": [...]}."""
        owned = range(self.start, self.end)
        if family != "encdec":
            return {"layers": [str(i) for i in owned]}
        return {"encoder": [str(i) for i in owned if i < self.n_encoder],
                "decoder": [str(i - self.n_encoder) for i in owned if i >= self.n_encoder]}

    @property
    def encoder_done_before(self) -> bool:  # this stage receives the finished encoder output (memory)
        return self.start >= self.n_encoder

    @property
    def encoder_done_after(self) -> bool:  # this stage sends the finished encoder output
        return self.end >= self.n_encoder


def layer_sequence_length(cfg: ModelConfig) -> int:
    return cfg.n_layers + (cfg.decoder_layers if cfg.family == "encdec" else 0)


def layer_costs(cfg: ModelConfig) -> tuple[list[int], int]:
    """(parameter count of each layer in execution order, cost of the LM head). The head's V x D matmul
    costs per token what V x D layer parameters do, so it weighs on the last stage; embedding lookups do
    no matmul and are not counted."""
    block = XLNetBlock if cfg.family == "xlnet" else Block  # XLNet's adds r_proj and the per-head biases
    with torch.device("meta"):
        encoder_block = sum(p.numel() for p in block(cfg).parameters())
        decoder_block = sum(p.numel() for p in Block(cfg, cross_attention=True).parameters())
    if cfg.family != "encdec":
        return [encoder_block] * cfg.n_layers, cfg.vocab_size * cfg.d_model
    return [encoder_block] * cfg.n_layers + [decoder_block] * cfg.decoder_layers, cfg.vocab_size * cfg.d_model


def balanced_boundaries(costs: list[int], n_stages: int, last_extra: int = 0) -> list[int]:
    """First layer index of each stage after the first, minimizing the most expensive stage (linear
    partition by dynamic programming; every stage gets at least one layer)."""
    n = len(costs)
    if n < n_stages:
        raise ConfigError(f"{n} layers cannot fill {n_stages} pipeline stages; lower parallel.pp or pp_virtual")
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[s][j]: the smallest possible max stage cost putting the first j layers into s stages
    best = [[inf] * (n + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0
    for s in range(1, n_stages + 1):
        extra = last_extra if s == n_stages else 0
        for j in range(s, n - (n_stages - s) + 1):
            for i in range(s - 1, j):
                cost = max(best[s - 1][i], prefix[j] - prefix[i] + extra)
                if cost < best[s][j]:
                    best[s][j], cut[s][j] = cost, i
    boundaries, j = [], n
    for s in range(n_stages, 1, -1):
        j = cut[s][j]
        boundaries.append(j)
    return boundaries[::-1]


def stage_plans(cfg: ModelConfig, parallel: ParallelConfig) -> list[StagePlan]:
    """One plan per stage (pp x pp_virtual of them), from parallel.pp_split or balanced by parameters."""
    n_stages = parallel.pp * parallel.pp_virtual
    n = layer_sequence_length(cfg)
    if parallel.pp_split is not None:
        check_pp_split(parallel, n)
        boundaries = list(parallel.pp_split)
    else:
        costs, head = layer_costs(cfg)
        boundaries = balanced_boundaries(costs, n_stages, head)
    edges = [0] + boundaries + [n]
    n_encoder = cfg.n_layers if cfg.family == "encdec" else 0
    return [StagePlan(s, n_stages, edges[s], edges[s + 1], n_encoder) for s in range(n_stages)]


def stage_to_rank(stage: int, pp: int, schedule: str) -> int:
    """Loop placement (stage s on rank s mod pp), or the V placement of ZBV / DualPipeV."""
    if schedule in V_SHAPED_SCHEDULES:
        return stage if stage < pp else 2 * pp - 1 - stage
    return stage % pp


def local_stage_indices(pp_rank: int, parallel: ParallelConfig) -> list[int]:
    n_stages = parallel.pp * parallel.pp_virtual
    return [s for s in range(n_stages) if stage_to_rank(s, parallel.pp, parallel.pp_schedule) == pp_rank]
