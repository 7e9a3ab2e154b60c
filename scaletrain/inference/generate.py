"""Text generation from a model in one process: a KV cache (self-attention keys/values appended per token,
cross-attention ones computed once from the encoder output), greedy decoding, temperature / top-k / top-p
sampling, beam search, stop at eos, batched prompts (left padding for decoder-only models).

The decoding loops see a model only through a Steps object (`first()` -> logits of the next token,
`next(tokens)` -> the logits after feeding them, `reorder(rows)` for beam search), so one loop serves GPT
and encoder-decoders, with or without the cache. Logits are (B, V) fp32 throughout."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from scaletrain.errors import InputError
from scaletrain.models.blocks import KVCache

NEG = -1.0e9  # the score of an empty beam slot (finite, so sums of them stay comparable)


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 32
    do_sample: bool = False  # False: greedy (or beam search with num_beams > 1)
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1.0: no nucleus filter
    num_beams: int = 1
    length_penalty: float = 1.0  # beam scores are log p / generated_length ** length_penalty
    seed: int = 0
    use_cache: bool = True
    eos_token_id: int | None = None  # None: always generate max_new_tokens
    pad_token_id: int = 0  # fills left padding and the steps after a row stopped
    decoder_start_token_id: int | None = None  # encoder-decoders: the decoder's first input

    def __post_init__(self):
        checks = [(self.max_new_tokens >= 1, f"--max-new-tokens={self.max_new_tokens} must be at least 1"),
                  (self.temperature > 0, f"--temperature={self.temperature} must be positive (0 is greedy: "
                                         f"leave out --temperature)"),
                  (self.top_k >= 0, f"--top-k={self.top_k} must be 0 (off) or positive"),
                  (0.0 < self.top_p <= 1.0, f"--top-p={self.top_p} must be in (0, 1]"),
                  (self.num_beams >= 1, f"--num-beams={self.num_beams} must be at least 1"),
                  (not (self.do_sample and self.num_beams > 1),
                   "beam search is deterministic: use --num-beams without --temperature / --top-k / --top-p")]
        for ok, message in checks:
            if not ok:
                raise InputError(message)


# ------------------------------------------------------------------------------------------- sampling

def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """(B, V) logits -> scaled by 1 / temperature, with the tokens sampling may not pick set to -inf: all but
    the top_k highest, then all outside the smallest set of highest tokens whose probability reaches top_p
    (the top token always stays). The order Hugging Face applies them in."""
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        ranked, order = logits.sort(dim=-1, descending=True)
        probs = ranked.softmax(dim=-1)
        mass_above = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked higher than each one
        drop_ranked = mass_above >= top_p
        drop_ranked[:, 0] = False
        drop = torch.zeros_like(drop_ranked).scatter(1, order, drop_ranked)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def choose_next(logits: torch.Tensor, cfg: GenerationConfig, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) -> (B,) next tokens: the argmax, or a draw from the filtered distribution."""
    if not cfg.do_sample:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, cfg.temperature, cfg.top_k, cfg.top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


# ---------------------------------------------------------------------------------------------- steps

def full_logits(logits: torch.Tensor) -> torch.Tensor:
    """A tensor-parallel model's vocab-sharded DTensor logits -> the whole (..., V) tensor on every rank."""
    return logits.full_tensor() if hasattr(logits, "full_tensor") else logits


def pad_batch(sequences: list[list[int]], pad_id: int, left: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> ids (B, T) and 0/1 mask (B, T), padded on the left (decoders continue every row from
    its last column) or on the right (encoders)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, tokens in enumerate(sequences):
        columns = slice(width - len(tokens), width) if left else slice(0, len(tokens))
        ids[row, columns] = torch.tensor(tokens, dtype=torch.long)
        mask[row, columns] = 1
    return ids.to(device), mask.to(device)


class DecoderOnlySteps:
    """GPT. Positions count from each prompt's first real token, as Hugging Face's generate does, so a
    left-padded row computes what it would alone. Without a cache every step recomputes the whole prefix."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, use_cache: bool, capacity: int):
        self.model, self.ids = model, ids
        self.padded = bool((mask == 0).any())
        self.mask = mask
        self.positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)  # (B, T)
        self.cache = KVCache(capacity) if use_cache else None

    def _logits(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        mask = self.mask if self.padded else None  # no padding: SDPA's causal fast path
        return full_logits(self.model(ids, mask, positions, cache))[:, -1].float()

    def first(self) -> torch.Tensor:
        return self._logits(self.ids, self.positions, self.cache)

    def next(self, tokens: torch.Tensor) -> torch.Tensor:
        self.ids = torch.cat([self.ids, tokens[:, None]], dim=1)
        self.mask = torch.cat([self.mask, torch.ones_like(tokens)[:, None]], dim=1)
        self.positions = torch.cat([self.positions, self.positions[:, -1:] + 1], dim=1)
        if self.cache is None:
            return self._logits(self.ids, self.positions, None)
        return self._logits(tokens[:, None], self.positions[:, -1:], self.cache)

    def reorder(self, rows: torch.Tensor) -> None:
        self.ids, self.mask, self.positions = self.ids[rows], self.mask[rows], self.positions[rows]
        if self.cache is not None:
            self.cache.reorder(rows)


class EncoderDecoderSteps:
    """T5, BART, the Transformer: the encoder runs once; the decoder starts from decoder_start_token_id.
    `expand` repeats each example's encoder output for its beams."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, start_id: int, use_cache: bool,
                 capacity: int, expand: int = 1):
        self.model = model
        padded = bool((mask == 0).any())
        memory = model.encode(ids, mask if padded else None)  # (B, S, D)
        self.memory = memory.repeat_interleave(expand, dim=0)
        self.mask = mask.repeat_interleave(expand, dim=0) if padded else None
        self.decoded = torch.full((self.memory.shape[0], 1), start_id, dtype=torch.long, device=ids.device)
        self.cache = KVCache(capacity) if use_cache else None

    def _logits(self, ids: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        states = self.model.decode(ids, self.memory, self.mask, None, cache)
        return full_logits(self.model.output_logits(states[:, -1:]))[:, 0].float()

    def first(self) -> torch.Tensor:
        return self._logits(self.decoded, self.cache)

    def next(self, tokens: torch.Tensor) -> torch.Tensor:
        self.decoded = torch.cat([self.decoded, tokens[:, None]], dim=1)
        if self.cache is None:
            return self._logits(self.decoded, None)
        return self._logits(tokens[:, None], self.cache)

    def reorder(self, rows: torch.Tensor) -> None:
        # the memory rows of one example's beams are equal and beams never leave their example: keep it
        self.decoded = self.decoded[rows]
        if self.cache is not None:
            self.cache.reorder(rows)


# ------------------------------------------------------------------------------------- decoding loops

def _cut_at_eos(rows: torch.Tensor, eos_id: int | None) -> list[list[int]]:
    out = []
    for row in rows.tolist():
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id) + 1]
        out.append(row)
    return out


def sample_or_greedy(steps, batch: int, cfg: GenerationConfig, device) -> list[list[int]]:
    """One token per row per step; a row that produced eos continues with pad (it is cut away) until every
    row has stopped or max_new_tokens are out."""
    generator = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.do_sample else None
    running = torch.ones(batch, dtype=torch.bool, device=device)
    chosen = []
    logits = steps.first()
    for step in range(cfg.max_new_tokens):
        tokens = torch.where(running, choose_next(logits, cfg, generator), cfg.pad_token_id)  # (B,)
        chosen.append(tokens)
        if cfg.eos_token_id is not None:
            running &= tokens != cfg.eos_token_id
        if step + 1 == cfg.max_new_tokens or not bool(running.any()):  # the one host sync per step
            break
        logits = steps.next(tokens)
    return _cut_at_eos(torch.stack(chosen, dim=1), cfg.eos_token_id)


def _gather(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tensor (B, N, ...) indexed along dim 1 by index (B, K) -> (B, K, ...)."""
    index = index.view(*index.shape, *([1] * (tensor.dim() - 2))).expand(*index.shape, *tensor.shape[2:])
    return tensor.gather(1, index)


def beam_search(steps, batch: int, cfg: GenerationConfig, device) -> list[list[int]]:
    """Beam search over `steps` built with num_beams rows per example (row b * beams + j is beam j).

    Each step ranks the beams x V continuations of an example by total log-probability and keeps 2 x beams:
    one ending in eos among the best `beams` becomes a finished hypothesis scored by log p / length **
    length_penalty; the best `beams` not ending continue. An example is done once it holds `beams` finished
    hypotheses and its best running beam, scored at its current length, does not beat the worst of them
    (Hugging Face's default, early_stopping=False). At max_new_tokens every running beam finishes."""
    beams, eos = cfg.num_beams, cfg.eos_token_id
    width, lp = cfg.max_new_tokens, cfg.length_penalty
    running_scores = torch.full((batch, beams), NEG, device=device)
    running_scores[:, 0] = 0.0  # all beams start equal: only the first may expand at step one
    running = torch.zeros((batch, beams, 0), dtype=torch.long, device=device)
    finished = torch.full((batch, beams, width), cfg.pad_token_id, dtype=torch.long, device=device)
    finished_scores = torch.full((batch, beams), NEG, device=device)
    finished_length = torch.zeros((batch, beams), dtype=torch.long, device=device)
    finished_filled = torch.zeros((batch, beams), dtype=torch.bool, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    top_ranks = torch.arange(2 * beams, device=device) < beams
    logits = steps.first()
    for step in range(width):
        length = step + 1
        log_probs = F.log_softmax(logits, dim=-1)
        vocab = log_probs.shape[-1]
        totals = log_probs.view(batch, beams, vocab) + running_scores[..., None]
        candidate_scores, flat = totals.view(batch, -1).topk(2 * beams, dim=-1)  # (B, 2 beams), descending
        parent, token = flat // vocab, flat % vocab
        ends = torch.full_like(token, length == width, dtype=torch.bool)
        if eos is not None:
            ends |= token == eos
        candidates = torch.cat([_gather(running, parent), token[..., None]], dim=-1)  # (B, 2 beams, length)

        # finished hypotheses: keep the best `beams` of the old ones and the ones ending now
        finishing = ends & top_ranks & ~done[:, None]
        new_scores = torch.where(finishing, candidate_scores / length**lp, NEG)
        padded = F.pad(candidates, (0, width - length), value=cfg.pad_token_id)
        finished_scores, keep = torch.cat([finished_scores, new_scores], dim=1).topk(beams, dim=-1)
        finished = _gather(torch.cat([finished, padded], dim=1), keep)
        finished_length = _gather(torch.cat([finished_length, torch.full_like(token, length)], dim=1), keep)
        finished_filled = _gather(torch.cat([finished_filled, finishing], dim=1), keep)

        # running beams: the best `beams` continuations that did not end
        running_scores, pick = torch.where(ends, candidate_scores + NEG, candidate_scores).topk(beams, dim=-1)
        running = _gather(candidates, pick)
        if length == width:
            break
        can_improve = running_scores[:, 0] / length**lp > finished_scores.min(dim=-1).values
        done |= finished_filled.all(dim=-1) & ~can_improve
        if bool(done.all()):
            break
        rows = (torch.arange(batch, device=device)[:, None] * beams + _gather(parent, pick)).view(-1)
        steps.reorder(rows)
        logits = steps.next(_gather(token, pick).view(-1))
    best = finished[:, 0].tolist()
    return [row[:n] for row, n in zip(best, finished_length[:, 0].tolist())]


# ------------------------------------------------------------------------------------------ entry point

def context_length(model_cfg) -> int | None:
    """Positions a model can take: its learned or sinusoidal table; T5's relative buckets have no limit."""
    return None if model_cfg.position == "relative" else model_cfg.max_seq_len


def _check_lengths(prompts: list[list[int]], model_cfg, cfg: GenerationConfig) -> None:
    if any(len(p) == 0 for p in prompts):
        raise InputError("a prompt encodes to no tokens; give some text")
    limit = context_length(model_cfg)
    if limit is None:
        return
    longest = max(len(p) for p in prompts)
    if longest > limit:
        raise InputError(f"a prompt of {longest} tokens is longer than the model's context of {limit} "
                         f"(model.max_seq_len); shorten it")
    decoder_only = model_cfg.family == "gpt"
    needed = (longest if decoder_only else 1) + cfg.max_new_tokens
    if needed > limit:
        room = limit - (longest if decoder_only else 1)
        raise InputError(f"{'a prompt of ' + str(longest) + ' tokens + ' if decoder_only else 'the decoder start + '}"
                         f"--max-new-tokens {cfg.max_new_tokens} exceeds the model's context of {limit}; use "
                         f"--max-new-tokens {room} or less")


@torch.no_grad()
def generate(model: nn.Module, prompts: list[list[int]], cfg: GenerationConfig) -> list[list[int]]:
    """Token lists -> the new tokens of each (ending with eos where it stopped there). A GPT continues
    its prompt; an encoder-decoder reads it and decodes from cfg.decoder_start_token_id."""
    model_cfg = model.cfg
    if model_cfg.family not in ("gpt", "encdec"):
        raise InputError(f"a {model_cfg.family} model (masked LM) does not generate text; use scaletrain "
                         f"fill-mask, or a GPT / T5 / BART checkpoint")
    _check_lengths(prompts, model_cfg, cfg)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        beams = cfg.num_beams
        if model_cfg.family == "gpt":
            ids, mask = pad_batch(prompts, cfg.pad_token_id, left=True, device=device)
            if beams > 1:
                ids, mask = ids.repeat_interleave(beams, dim=0), mask.repeat_interleave(beams, dim=0)
            steps = DecoderOnlySteps(model, ids, mask, cfg.use_cache, ids.shape[1] + cfg.max_new_tokens)
        else:
            if cfg.decoder_start_token_id is None:
                raise InputError("an encoder-decoder needs decoder_start_token_id (T5: the pad token, BART: "
                                 "</s>); the checkpoint's generation config names it")
            ids, mask = pad_batch(prompts, cfg.pad_token_id, left=False, device=device)
            steps = EncoderDecoderSteps(model, ids, mask, cfg.decoder_start_token_id, cfg.use_cache,
                                        1 + cfg.max_new_tokens, expand=beams)
        if beams > 1:
            return beam_search(steps, len(prompts), cfg, device)
        return sample_or_greedy(steps, len(prompts), cfg, device)
    finally:
        model.train(was_training)
