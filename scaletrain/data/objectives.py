"""Pretraining objectives. Each turns a window of the packed token stream (documents separated by EOD) and
a numpy Generator into one example (a dict of 1-D int arrays); the loader stacks examples into the batch
keys of docs/contracts.md. Everything random comes from the Generator, so an example is a pure function of
(window, rng) and the loader makes rng a function of (seed, sample index[, epoch]).

    clm           GPT: labels are the inputs shifted by one, documents packed with EOD
    mlm           BERT/RoBERTa: 15% of tokens, 80% [MASK] / 10% random / 10% kept; whole words optional; NSP
    span_bert     SpanBERT: the 15% in contiguous spans of whole words, length ~ Geometric(0.2) clipped at 10
    t5_span       T5: noise density 0.15, mean span 3, one sentinel per span, exact input/target lengths
    bart_denoise  BART: sentence permutation, then Poisson(3) spans covering 30% each become one <mask>
    plm           XLNet: spans of <= 5 tokens, 1/K of the tokens (K=6), predicted in a random factorization
                  order; A <sep> B <sep> <cls>"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Tuple

import numpy as np

from scaletrain.errors import DataError

if TYPE_CHECKING:  # only the annotations name torch; the data path runs without importing it
    import torch

IGNORE_INDEX = -100
Example = Dict[str, np.ndarray]


# ----------------------------------------------------------------------------- shared helpers

def random_composition(total: int, parts: int, rng: np.random.Generator, minimum: int = 1) -> np.ndarray:
    """`parts` integers >= minimum summing to `total`, uniformly over all such compositions (stars and bars)."""
    free = total - parts * minimum
    if parts <= 0 or free < 0:
        raise ValueError(f"cannot split {total} into {parts} parts of at least {minimum}")
    bars = np.sort(rng.choice(free + parts - 1, parts - 1, replace=False))
    edges = np.concatenate(([-1], bars, [free + parts - 1]))
    return np.diff(edges) - 1 + minimum


def place_spans(span_lengths: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
    """Start positions of non-overlapping, non-adjacent spans placed uniformly in [0, length)."""
    count = len(span_lengths)
    # Gaps: before the first span >= 0, between spans >= 1, after the last >= 0. Shift the two outer gaps
    # by one so every part is >= 1, compose, shift back.
    gaps = random_composition(length - int(span_lengths.sum()) + 2, count + 1, rng, minimum=1)
    gaps[0] -= 1
    starts = np.cumsum(np.concatenate(([gaps[0]], span_lengths[:-1] + gaps[1:-1])))
    return starts


def word_ids(tokens: np.ndarray, word_start: np.ndarray, special: np.ndarray) -> np.ndarray:
    """(T,) word index of each token: a word is a word-start token plus its continuation pieces; a special
    token is a word of its own, so whatever follows one starts a new word."""
    is_special = special[tokens]
    starts = word_start[tokens] | is_special
    starts[0] = True
    starts[1:] |= is_special[:-1]
    return np.cumsum(starts) - 1


def truncated_geometric(p: float, maximum: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths in [1, maximum] with P(k) ∝ p(1-p)^(k-1), the renormalized truncation SpanBERT samples from
    (mean 3.8 for p=0.2, maximum=10)."""
    support = np.arange(1, maximum + 1)
    probabilities = p * (1 - p) ** (support - 1)
    return rng.choice(support, size=size, p=probabilities / probabilities.sum())


# ----------------------------------------------------------------------------- CLM

@dataclass
class CLM:
    name = "clm"
    needs_rng = False

    def window_length(self, seq_len: int) -> int:
        return seq_len + 1  # one extra token: the last input's label

    def stride(self, seq_len: int) -> int:
        return seq_len  # consecutive windows overlap by that one token, so no token goes unpredicted

    def __call__(self, window: np.ndarray, rng=None, other: np.ndarray = None) -> Example:
        tokens = window.astype(np.int64)
        return {"input_ids": tokens[:-1], "labels": tokens[1:]}


# ----------------------------------------------------------------------------- MLM / SpanBERT

def mask_tokens(tokens: np.ndarray, selected: np.ndarray, mask_id: int, random_ids: np.ndarray,
                rng: np.random.Generator, groups: np.ndarray = None) -> Tuple[np.ndarray, np.ndarray]:
    """BERT's replacement: each selected unit becomes [MASK] with p=0.8, a random token with p=0.1, stays
    with p=0.1. A unit is one token, or one group (SpanBERT decides per span). -> (inputs, labels)."""
    inputs, labels = tokens.copy(), np.full_like(tokens, IGNORE_INDEX)
    labels[selected] = tokens[selected]
    units = groups[selected] if groups is not None else np.arange(selected.sum())
    unit_draw = rng.random(int(units.max()) + 1 if units.size else 0)
    draw = unit_draw[units]
    positions = np.flatnonzero(selected)
    masked, randomized = positions[draw < 0.8], positions[(draw >= 0.8) & (draw < 0.9)]
    inputs[masked] = mask_id
    inputs[randomized] = rng.choice(random_ids, size=randomized.size)
    return inputs, labels


@dataclass
class MLM:
    """BERT/RoBERTa masked LM over [CLS] A [SEP] (B [SEP]); `word_start` enables whole-word masking."""

    cls_id: int
    sep_id: int
    mask_id: int
    pad_id: int
    special: np.ndarray  # (V,) bool: never masked, never drawn as a random replacement
    word_start: np.ndarray = None  # (V,) bool; set for whole-word masking
    sentence_end: np.ndarray = None  # (V,) bool; NSP splits A|B after one when it can
    probability: float = 0.15
    nsp: bool = False
    dynamic: bool = True
    name = "mlm"
    needs_rng = True

    def __post_init__(self):
        self.random_ids = np.flatnonzero(~self.special)

    def window_length(self, seq_len: int) -> int:
        return seq_len - (3 if self.nsp else 2)

    def stride(self, seq_len: int) -> int:
        return self.window_length(seq_len)

    @property
    def needs_other(self) -> bool:
        return self.nsp

    def select(self, tokens: np.ndarray, candidates: np.ndarray, rng) -> Tuple[np.ndarray, np.ndarray]:
        """-> (selected (T,) bool, replacement groups or None): exactly round(p x candidates) tokens, or
        whole words until that many tokens are covered."""
        budget = max(1, int(round(self.probability * candidates.sum())))
        if self.word_start is None:
            chosen = rng.choice(np.flatnonzero(candidates), size=budget, replace=False)
            selected = np.zeros(tokens.size, dtype=bool)
            selected[chosen] = True
            return selected, None
        words = word_ids(tokens, self.word_start, self.special)
        word_sizes = np.bincount(words[candidates], minlength=words[-1] + 1)
        chosen_words = np.zeros(words[-1] + 1, dtype=bool)
        order = rng.permutation(np.flatnonzero(word_sizes))
        # BERT's whole-word rule: words in random order, skipping any that would overshoot the budget. The
        # prefix that fits is taken at once; only the few words after it are looked at one by one.
        prefix = max(1, int(np.searchsorted(np.cumsum(word_sizes[order]), budget, side="right")))
        chosen_words[order[:prefix]] = True
        covered = int(word_sizes[order[:prefix]].sum())
        for word in order[prefix:]:
            if covered >= budget:
                break
            if covered + word_sizes[word] <= budget:
                chosen_words[word] = True
                covered += word_sizes[word]
        return chosen_words[words] & candidates, None

    def pair(self, window: np.ndarray, other: np.ndarray, rng) -> Tuple[np.ndarray, np.ndarray, int]:
        """NSP: A = a prefix of the window; B = its continuation (label 0) or, with p=0.5, the same length
        from an unrelated window (label 1). Splits after a sentence end when one is in range."""
        length = window.size
        boundaries = np.flatnonzero(self.sentence_end[window[:-1]]) + 1 if self.sentence_end is not None else []
        boundaries = [b for b in boundaries if 1 <= b < length]
        split = int(rng.choice(boundaries)) if len(boundaries) else int(rng.integers(1, length))
        is_random = rng.random() < 0.5
        second = other[:length - split] if is_random else window[split:]
        return window[:split], second, int(is_random)

    def __call__(self, window: np.ndarray, rng: np.random.Generator, other: np.ndarray = None) -> Example:
        window = window.astype(np.int64)
        if self.nsp:
            first, second, nsp_label = self.pair(window, other.astype(np.int64), rng)
            tokens = np.concatenate(([self.cls_id], first, [self.sep_id], second, [self.sep_id]))
            token_types = np.zeros(tokens.size, dtype=np.int64)
            token_types[first.size + 2:] = 1
        else:
            tokens = np.concatenate(([self.cls_id], window, [self.sep_id]))
            token_types = np.zeros(tokens.size, dtype=np.int64)
        selected, groups = self.select(tokens, ~self.special[tokens], rng)
        inputs, labels = mask_tokens(tokens, selected, self.mask_id, self.random_ids, rng, groups)
        example = {"input_ids": inputs, "token_type_ids": token_types,
                   "attention_mask": np.ones(tokens.size, dtype=np.int64), "labels": labels}
        if self.nsp:
            example["next_sentence_label"] = np.array(nsp_label, dtype=np.int64)
        return example


@dataclass
class SpanBERT(MLM):
    """Masks 15% of the words in spans whose length (in words) is Geometric(p) truncated at max_span; each
    span is [MASK]ed, randomized or kept as a whole. No NSP (the paper drops it)."""

    geometric_p: float = 0.2
    max_span: int = 10
    name = "span_bert"

    def span_lengths(self, budget: int, rng) -> np.ndarray:
        """i.i.d. lengths until they cover the budget (the last span may overshoot it, as in the paper)."""
        lengths: List[int] = []
        while sum(lengths) < budget:
            lengths.extend(truncated_geometric(self.geometric_p, self.max_span, max(1, budget // 3), rng))
        cut = int(np.searchsorted(np.cumsum(lengths), budget)) + 1
        return np.asarray(lengths[:cut])

    def select(self, tokens: np.ndarray, candidates: np.ndarray, rng) -> Tuple[np.ndarray, np.ndarray]:
        word_start = self.word_start if self.word_start is not None else np.ones_like(self.special)
        words = word_ids(tokens, word_start, self.special)
        # Spans live on the maskable words; specials ([CLS], [SEP]) are never inside one.
        maskable = np.unique(words[candidates])
        lengths = self.span_lengths(max(1, int(round(self.probability * maskable.size))), rng)
        while lengths.sum() + len(lengths) - 1 > maskable.size:  # keep them placeable in a short window
            lengths = lengths[:-1]
        starts = place_spans(lengths, maskable.size, rng)
        span_of_word = np.full(words[-1] + 1, -1)
        offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)  # 0..len-1 per span
        span_of_word[maskable[np.repeat(starts, lengths) + offsets]] = np.repeat(np.arange(lengths.size), lengths)
        groups = span_of_word[words]
        return (groups >= 0) & candidates, np.maximum(groups, 0)


# ----------------------------------------------------------------------------- T5 span corruption

def t5_lengths(tokens_length: int, noise_density: float, mean_span: float) -> Tuple[int, int]:
    """Raw tokens -> (encoder length, decoder length) after span corruption, EOS included in both."""
    noise = int(round(tokens_length * noise_density))
    spans = int(round(noise / mean_span))
    return tokens_length - noise + spans + 1, noise + spans + 1


def t5_raw_length(inputs_length: int, noise_density: float = 0.15, mean_span: float = 3.0) -> Tuple[int, int]:
    """The longest raw window whose corrupted encoder input fits `inputs_length` exactly, like T5's
    random_spans_helper: -> (raw tokens, target length). 512 -> (568, 114)."""
    length = inputs_length
    while t5_lengths(length + 1, noise_density, mean_span)[0] <= inputs_length:
        length += 1
    return length, t5_lengths(length, noise_density, mean_span)[1]


def t5_noise_mask(length: int, noise_density: float, mean_span: float, rng) -> np.ndarray:
    """(length,) bool; round(length x density) noise tokens in round(noise / mean) spans, interleaved with
    as many non-noise runs, starting with non-noise, all run lengths uniform over compositions."""
    noise = min(max(int(round(length * noise_density)), 1), length - 1)
    spans = max(int(round(noise / mean_span)), 1)
    noise_lengths = random_composition(noise, spans, rng)
    keep_lengths = random_composition(length - noise, spans, rng)
    runs = np.stack([keep_lengths, noise_lengths], axis=1).reshape(-1)  # keep, noise, keep, noise, ...
    return np.repeat(np.tile([False, True], spans), runs)


def collapse_spans(tokens: np.ndarray, noise: np.ndarray, sentinels: np.ndarray) -> np.ndarray:
    """Each run of noise tokens becomes the next sentinel; other tokens stay."""
    span_start = noise & ~np.concatenate(([False], noise[:-1]))
    span_index = np.cumsum(span_start) - 1
    out = np.where(span_start, sentinels[np.maximum(span_index, 0)], tokens)
    return out[~noise | span_start]


@dataclass
class T5Span:
    sentinel_ids: np.ndarray  # <extra_id_0>, <extra_id_1>, ...
    eos_id: int
    pad_id: int  # T5's decoder start token
    seq_len: int
    noise_density: float = 0.15
    mean_span: float = 3.0
    dynamic: bool = True
    name = "t5_span"
    needs_rng = True
    needs_other = False

    def __post_init__(self):
        self.raw_length, self.target_length = t5_raw_length(self.seq_len, self.noise_density, self.mean_span)
        spans = int(round(int(round(self.raw_length * self.noise_density)) / self.mean_span))
        if spans > len(self.sentinel_ids):
            raise DataError(f"t5_span with seq_len={self.seq_len} needs {spans} sentinels but the tokenizer has "
                            f"{len(self.sentinel_ids)}; lower trainer.seq_len or add <extra_id_N> tokens")

    def window_length(self, seq_len: int) -> int:
        return self.raw_length

    def stride(self, seq_len: int) -> int:
        return self.raw_length

    def __call__(self, window: np.ndarray, rng: np.random.Generator, other: np.ndarray = None) -> Example:
        tokens = window.astype(np.int64)
        noise = t5_noise_mask(tokens.size, self.noise_density, self.mean_span, rng)
        sentinels = np.asarray(self.sentinel_ids, dtype=np.int64)
        inputs = np.append(collapse_spans(tokens, noise, sentinels), self.eos_id)
        targets = np.append(collapse_spans(tokens, ~noise, sentinels), self.eos_id)
        return {"input_ids": inputs, "attention_mask": np.ones(inputs.size, dtype=np.int64),
                "decoder_input_ids": np.concatenate(([self.pad_id], targets[:-1])), "labels": targets}


# ----------------------------------------------------------------------------- BART denoising

def permute_sentences(tokens: np.ndarray, sentence_end: np.ndarray, rng) -> np.ndarray:
    ends = np.flatnonzero(sentence_end[tokens[:-1]]) + 1
    sentences = np.split(tokens, ends)
    return np.concatenate([sentences[i] for i in rng.permutation(len(sentences))])


def poisson_span_lengths(budget: int, lam: float, rng) -> np.ndarray:
    """Poisson(lam) lengths (zeros included: they insert a <mask>) until they cover `budget` tokens; the
    last is cut so they cover it exactly."""
    if budget <= 0:
        return np.zeros(0, dtype=np.int64)
    lengths: List[int] = []
    while sum(lengths) < budget:
        lengths.extend(rng.poisson(lam, size=max(1, budget // int(max(lam, 1)))).tolist())
    lengths = np.asarray(lengths)
    cut = int(np.searchsorted(np.cumsum(lengths), budget)) + 1
    lengths = lengths[:cut]
    lengths[-1] -= lengths.sum() - budget
    return lengths


def infill(tokens: np.ndarray, span_lengths: np.ndarray, mask_id: int, rng) -> Tuple[np.ndarray, np.ndarray]:
    """Replaces each span (placed uniformly, non-overlapping) by one mask token -> (corrupted, masked (T,))."""
    starts = place_spans(span_lengths, tokens.size, rng)
    boundaries = np.zeros(tokens.size + 1, dtype=np.int64)  # +1 at each span start, -1 after its end
    np.add.at(boundaries, starts, 1)
    np.add.at(boundaries, starts + span_lengths, -1)
    masked = np.cumsum(boundaries[:-1]) > 0
    masked_before = np.concatenate(([0], np.cumsum(masked)))[starts]
    # In the kept tokens, span i's mask goes where its first token was: start minus the masked ones before.
    corrupted = np.insert(tokens[~masked].astype(np.int64), starts - masked_before, mask_id)
    return corrupted, masked


@dataclass
class BARTDenoise:
    bos_id: int
    eos_id: int
    mask_id: int
    pad_id: int
    sentence_end: np.ndarray  # (V,) bool
    mask_ratio: float = 0.3
    poisson_lambda: float = 3.0
    permute: bool = True
    dynamic: bool = True
    name = "bart_denoise"
    needs_rng = True
    needs_other = False

    def window_length(self, seq_len: int) -> int:
        return seq_len - 2  # room for <s> and </s>

    def stride(self, seq_len: int) -> int:
        return seq_len - 2

    def __call__(self, window: np.ndarray, rng: np.random.Generator, other: np.ndarray = None) -> Example:
        original = window.astype(np.int64)
        source = permute_sentences(original, self.sentence_end, rng) if self.permute else original
        lengths = poisson_span_lengths(int(round(self.mask_ratio * source.size)), self.poisson_lambda, rng)
        while lengths.sum() + len(lengths) - 1 > source.size:  # a very short window: fewer spans
            lengths = lengths[:-1]
        corrupted = infill(source, lengths, self.mask_id, rng)[0] if lengths.size else source
        seq_len = original.size + 2
        encoder = np.concatenate(([self.bos_id], corrupted[:seq_len - 2], [self.eos_id]))
        input_ids = np.full(seq_len, self.pad_id, dtype=np.int64)
        input_ids[:encoder.size] = encoder
        attention_mask = (np.arange(seq_len) < encoder.size).astype(np.int64)
        labels = np.concatenate(([self.bos_id], original, [self.eos_id]))
        # BART starts decoding from </s>: the decoder input is the target shifted right by one.
        decoder_input_ids = np.concatenate(([self.eos_id], labels[:-1]))
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "decoder_input_ids": decoder_input_ids, "labels": labels}


# ----------------------------------------------------------------------------- from the config

# ----------------------------------------------------------------------------- PLM (XLNet)

def plm_targets(candidates: np.ndarray, k: int, max_span: int, rng) -> np.ndarray:
    """XLNet's span prediction over the (T,) bool `candidates`: the sequence is cut into consecutive blocks of
    span_length * K tokens, span_length ~ U{1..max_span}, and one span at a random offset of each block is
    predicted, so 1/K of the tokens are targets on average. -> (T,) bool."""
    length = candidates.size
    targets = np.zeros(length, dtype=bool)
    start = 0
    while start < length:
        span = int(rng.integers(1, max_span + 1))
        block = span * k
        offset = start + int(rng.integers(0, block - span + 1))
        targets[offset:offset + span] = True
        start += block
    return targets & candidates


def plm_perm_mask(targets: np.ndarray, rng) -> np.ndarray:
    """A random factorization order in which every non-target precedes every target -> (T, T) int8 perm_mask,
    1 where query i may not see key j: j is a target that does not come strictly before i in the order
    (a target never sees itself; non-targets, seen by all, never see a target)."""
    order = np.full(targets.size, -1, dtype=np.int64)  # non-targets: before everything
    order[targets] = rng.permutation(int(targets.sum()))
    return ((order[:, None] <= order[None, :]) & targets[None, :]).astype(np.int8)


@dataclass
class PLM:
    """XLNet's permutation LM over A <sep> B <sep> <cls> (token types 0, 1, 2), the window split at a random
    point. num_predict = ceil(window / K) + max_span rows of target_mapping; unused rows are zero, their labels
    ignored."""

    sep_id: int
    cls_id: int
    special: np.ndarray  # (V,) bool: never predicted
    k: int = 6
    max_span: int = 5
    name = "plm"
    needs_rng = True

    def window_length(self, seq_len: int) -> int:
        return seq_len - 3

    def stride(self, seq_len: int) -> int:
        return self.window_length(seq_len)

    def num_predict(self, window: int) -> int:
        return -(-window // self.k) + self.max_span

    def __call__(self, window: np.ndarray, rng: np.random.Generator, other: np.ndarray = None) -> Example:
        tokens = window.astype(np.int64)
        cut = int(rng.integers(1, tokens.size))
        inputs = np.concatenate([tokens[:cut], [self.sep_id], tokens[cut:], [self.sep_id, self.cls_id]])
        types = np.concatenate([np.zeros(cut + 1), np.ones(tokens.size - cut + 1), [2]]).astype(np.int64)
        targets = plm_targets(~self.special[inputs], self.k, self.max_span, rng)
        positions = np.flatnonzero(targets)[:self.num_predict(tokens.size)]
        targets = np.zeros_like(targets)
        targets[positions] = True
        mapping = np.zeros((self.num_predict(tokens.size), inputs.size), dtype=np.float32)  # (M, T)
        mapping[np.arange(positions.size), positions] = 1.0
        labels = np.full(mapping.shape[0], IGNORE_INDEX, dtype=np.int64)
        labels[:positions.size] = inputs[positions]
        return {"input_ids": inputs, "token_type_ids": types, "attention_mask": np.ones_like(inputs),
                "perm_mask": plm_perm_mask(targets, rng), "target_mapping": mapping, "labels": labels}


def synthetic_plm_batch(batch: int, seq_len: int, vocab: int, seed: int, k: int = 6,
                        max_span: int = 5) -> Dict[str, "torch.Tensor"]:
    """A PLM batch of random tokens (ids 0 and 1 play <sep> and <cls>): equivalence tests, the dry run."""
    import torch

    special = np.zeros(vocab, dtype=bool)
    special[:2] = True
    objective, rng = PLM(sep_id=0, cls_id=1, special=special, k=k, max_span=max_span), np.random.default_rng(seed)
    rows = [objective(rng.integers(2, vocab, objective.window_length(seq_len)), rng) for _ in range(batch)]
    return {key: torch.from_numpy(np.stack([row[key] for row in rows])) for key in rows[0]}


def build_objective(data_cfg, tokenizer, seq_len: int):
    """DataConfig + Tokenizer -> an objective with the tokenizer's special ids."""
    name = data_cfg.objective
    if name == "clm":
        return CLM()
    needed_by = f"data.objective={name}"
    if name in ("mlm", "span_bert"):
        word_start = tokenizer.word_start_table() if (data_cfg.whole_word_mask or name == "span_bert") else None
        common = dict(cls_id=tokenizer.special_id("cls", needed_by), sep_id=tokenizer.special_id("sep", needed_by),
                      mask_id=tokenizer.special_id("mask", needed_by), pad_id=tokenizer.pad_id,
                      special=tokenizer.special_mask(), word_start=word_start,
                      sentence_end=tokenizer.sentence_end_table(), probability=data_cfg.mlm_probability,
                      dynamic=data_cfg.dynamic_masking)
        if name == "span_bert":
            return SpanBERT(**common, geometric_p=data_cfg.span_geometric_p, max_span=data_cfg.span_max_words)
        return MLM(**common, nsp=data_cfg.nsp)
    if name == "t5_span":
        if not tokenizer.sentinel_ids:
            raise DataError(f"{needed_by} needs sentinel tokens <extra_id_0..99> but tokenizer "
                            f"{tokenizer.source} has none; use data.tokenizer_type=unigram")
        return T5Span(np.asarray(tokenizer.sentinel_ids), tokenizer.special_id("eos", needed_by),
                      tokenizer.pad_id, seq_len, data_cfg.noise_density, data_cfg.mean_span_length,
                      dynamic=data_cfg.dynamic_masking)
    if name == "plm":
        return PLM(tokenizer.special_id("sep", needed_by), tokenizer.special_id("cls", needed_by),
                   tokenizer.special_mask(), k=data_cfg.plm_k, max_span=data_cfg.plm_max_span)
    return BARTDenoise(tokenizer.special_id("bos", needed_by), tokenizer.special_id("eos", needed_by),
                       tokenizer.special_id("mask", needed_by), tokenizer.pad_id, tokenizer.sentence_end_table(),
                       mask_ratio=data_cfg.bart_mask_ratio, poisson_lambda=data_cfg.bart_poisson_lambda,
                       permute=data_cfg.bart_permute_sentences, dynamic=data_cfg.dynamic_masking)
