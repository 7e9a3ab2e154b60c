"""Statistics of each objective over many samples against the papers' numbers, on synthetic streams."""

import math

import numpy as np
import pytest

from scaletrain.data.objectives import (CLM, MLM, BARTDenoise, SpanBERT, T5Span, infill, permute_sentences,
                                        place_spans, poisson_span_lengths, random_composition, t5_lengths,
                                        t5_raw_length, truncated_geometric)

VOCAB = 1000
PAD, CLS, SEP, MASK, EOS = 0, 1, 2, 3, 4
SPECIAL = np.zeros(VOCAB, dtype=bool)
SPECIAL[:5] = True
SENTINELS = np.arange(VOCAB - 1, VOCAB - 101, -1)  # <extra_id_0> has the highest id, as in T5


def stream(rng, length):
    return rng.integers(5, VOCAB - 100, size=length)


def binomial_close(observed, expected, n, sigmas=5.0):
    assert abs(observed - expected) <= sigmas * math.sqrt(expected * (1 - expected) / n) + 1e-12, \
        (observed, expected)


def assert_uniform(counts: dict, outcomes: int, draws: int) -> None:
    """Every one of `outcomes` equally likely outcomes was seen, each at 1/outcomes within 5 sigma."""
    assert len(counts) == outcomes
    for count in counts.values():
        binomial_close(count / draws, 1 / outcomes, draws)


def words_of(tokens, word_start):
    """Independent word segmentation: a new word at every word-start piece, special, or after a special."""
    words, current = [], -1
    for i, token in enumerate(tokens):
        if i == 0 or word_start[token] or SPECIAL[token] or SPECIAL[tokens[i - 1]]:
            current += 1
        words.append(current)
    return np.asarray(words)


def mlm(**kwargs):
    return MLM(cls_id=CLS, sep_id=SEP, mask_id=MASK, pad_id=PAD, special=SPECIAL, **kwargs)


# ----------------------------------------------------------------------------- helpers

def test_random_composition_is_uniform_and_exact():
    rng = np.random.default_rng(0)
    counts = {}
    for _ in range(6000):
        parts = random_composition(5, 3, rng)  # compositions of 5 into 3 positive parts: C(4,2) = 6
        assert parts.sum() == 5 and parts.min() >= 1
        counts[tuple(parts)] = counts.get(tuple(parts), 0) + 1
    assert_uniform(counts, 6, 6000)


def test_place_spans_never_overlap_or_touch():
    rng = np.random.default_rng(1)
    for _ in range(500):
        lengths = rng.integers(0, 5, size=rng.integers(1, 6))
        length = int(lengths.sum() + len(lengths) - 1 + rng.integers(0, 10))
        starts = place_spans(lengths, length, rng)
        ends = starts + lengths
        assert starts[0] >= 0 and ends[-1] <= length
        assert np.all(starts[1:] >= ends[:-1] + 1)


# ----------------------------------------------------------------------------- CLM

def test_clm_labels_are_next_tokens():
    window = np.arange(10, 19)
    example = CLM()(window)
    assert np.array_equal(example["input_ids"], window[:-1])
    assert np.array_equal(example["labels"], window[1:])
    assert CLM().window_length(8) == 9 and CLM().stride(8) == 8


# ----------------------------------------------------------------------------- MLM

def test_mlm_selects_15_percent_with_80_10_10():
    objective, rng = mlm(), np.random.default_rng(0)
    masked = randomized = kept = selected_total = 0
    for _ in range(2000):
        window = stream(rng, 126)
        example = objective(window, rng)
        tokens = np.concatenate(([CLS], window, [SEP]))
        selected = example["labels"] != -100
        assert selected.sum() == round(0.15 * 126)  # BERT: exactly round(15% of the maskable tokens)
        assert not selected[0] and not selected[-1]  # [CLS]/[SEP] never predicted
        assert np.array_equal(example["labels"][selected], tokens[selected])
        inputs = example["input_ids"][selected]
        masked += np.sum(inputs == MASK)
        kept += np.sum(inputs == tokens[selected])
        randomized += np.sum((inputs != MASK) & (inputs != tokens[selected]))
        assert not SPECIAL[inputs[inputs != MASK]].any()
        assert np.array_equal(example["input_ids"][~selected], tokens[~selected])
    selected_total = masked + kept + randomized
    p_random_hits_original = 1 / (VOCAB - 5)
    binomial_close(masked / selected_total, 0.8, selected_total)
    binomial_close(randomized / selected_total, 0.1 * (1 - p_random_hits_original), selected_total)
    binomial_close(kept / selected_total, 0.1 + 0.1 * p_random_hits_original, selected_total)


def assert_whole_words_selected(example, window, word_start) -> np.ndarray:
    """Every word with a selected (labelled) piece is selected whole; returns the selection (with CLS/SEP)."""
    tokens = np.concatenate(([CLS], window, [SEP]))
    selected = example["labels"] != -100
    words = words_of(tokens, word_start)
    for word in np.unique(words[selected]):
        assert selected[words == word].all(), "a word was only partly masked"
    return selected


def test_whole_word_masking_takes_whole_words():
    rng = np.random.default_rng(2)
    word_start = rng.random(VOCAB) < 0.6  # ~1.7 pieces per word
    objective = mlm(word_start=word_start)
    fractions = []
    for _ in range(500):
        window = stream(rng, 254)
        example = objective(window, rng)
        selected = assert_whole_words_selected(example, window, word_start)
        budget = round(0.15 * 254)
        assert selected.sum() <= budget + 3  # only the very first word may overshoot
        fractions.append(selected.sum() / 254)
    assert abs(np.mean(fractions) - 0.15) < 0.005


def test_nsp_pairs_are_half_random_half_continuations():
    rng = np.random.default_rng(3)
    sentence_end = np.zeros(VOCAB, dtype=bool)
    sentence_end[5:50] = True
    objective = mlm(nsp=True, sentence_end=sentence_end)
    assert objective.window_length(128) == 125
    labels = []
    for _ in range(4000):
        window, other = stream(rng, 125), stream(rng, 125)
        example = objective(window, rng, other)
        labels.append(int(example["next_sentence_label"]))
        types, labels_ = example["token_type_ids"], example["labels"]
        original = np.where(labels_ != -100, labels_, example["input_ids"])
        assert original.size == 128 and original[0] == CLS and original[-1] == SEP
        first_sep = int(np.flatnonzero(original == SEP)[0])
        a, b = original[1:first_sep], original[first_sep + 1:-1]
        assert np.array_equal(a, window[:a.size])
        assert np.all(types[:first_sep + 1] == 0) and np.all(types[first_sep + 1:] == 1)
        expected_b = other[:b.size] if labels[-1] else window[a.size:]
        assert np.array_equal(b, expected_b)
        if a.size < 124 and sentence_end[window[a.size - 1:a.size + 1]].any():
            assert sentence_end[window[a.size - 1]]  # split after a sentence end when one is in range
    binomial_close(np.mean(labels), 0.5, len(labels))


# ----------------------------------------------------------------------------- SpanBERT

def runs(mask):
    padded = np.concatenate(([0], mask.astype(np.int8), [0]))
    edges = np.flatnonzero(np.diff(padded))
    return edges[0::2], edges[1::2] - edges[0::2]


def test_truncated_geometric_mean_is_spanberts_3_8():
    rng = np.random.default_rng(4)
    lengths = truncated_geometric(0.2, 10, 200_000, rng)
    k = np.arange(1, 11)
    pmf = 0.2 * 0.8 ** (k - 1) / (1 - 0.8 ** 10)
    assert abs((k * pmf).sum() - 3.7965) < 1e-3  # the paper's 3.8
    assert lengths.min() == 1 and lengths.max() == 10
    assert abs(lengths.mean() - 3.7965) < 0.03
    for length, p in zip(k, pmf):
        binomial_close(np.mean(lengths == length), p, lengths.size)


def test_span_bert_masks_15_percent_in_geometric_word_spans():
    rng = np.random.default_rng(5)
    objective = SpanBERT(cls_id=CLS, sep_id=SEP, mask_id=MASK, pad_id=PAD, special=SPECIAL)
    span_lengths, fractions, span_treatments = [], [], []
    for _ in range(600):
        window = stream(rng, 510)
        example = objective(window, rng)
        selected = example["labels"] != -100
        fractions.append(selected.sum() / 510)
        starts, lengths = runs(selected)
        span_lengths.extend(lengths)
        for start, length in zip(starts, lengths):
            span_inputs = example["input_ids"][start:start + length]
            span_labels = example["labels"][start:start + length]
            if (span_inputs == MASK).all():
                span_treatments.append("mask")
            elif (span_inputs == span_labels).all():
                span_treatments.append("keep")
            else:  # random replacements: no token of the span may be [MASK] or kept wholesale
                assert not (span_inputs == MASK).any()
                span_treatments.append("random")
    assert abs(np.mean(span_lengths) - 3.8) < 0.1
    assert 0.15 <= np.mean(fractions) < 0.16  # the last span may overshoot the 15% budget
    n = len(span_treatments)
    binomial_close(span_treatments.count("mask") / n, 0.8, n)
    binomial_close(span_treatments.count("random") / n, 0.1, n, sigmas=6)


def test_span_bert_spans_cover_whole_words():
    rng = np.random.default_rng(6)
    word_start = rng.random(VOCAB) < 0.5
    objective = SpanBERT(cls_id=CLS, sep_id=SEP, mask_id=MASK, pad_id=PAD, special=SPECIAL, word_start=word_start)
    for _ in range(200):
        window = stream(rng, 254)
        example = objective(window, rng)
        assert_whole_words_selected(example, window, word_start)


# ----------------------------------------------------------------------------- T5

def test_t5_lengths_match_random_spans_helper():
    assert t5_raw_length(512, 0.15, 3.0) == (568, 114)  # the numbers T5's pretraining uses for 512
    for inputs_length in (32, 64, 100, 128, 256, 1024):
        raw, targets = t5_raw_length(inputs_length)
        assert t5_lengths(raw, 0.15, 3.0)[0] == inputs_length
        assert t5_lengths(raw + 1, 0.15, 3.0)[0] > inputs_length
        assert t5_lengths(raw, 0.15, 3.0)[1] == targets


def test_t5_span_corruption_exact_lengths_and_statistics():
    rng = np.random.default_rng(7)
    objective = T5Span(SENTINELS, EOS, PAD, seq_len=512)
    assert objective.window_length(512) == 568
    span_lengths, noise_positions = [], np.zeros(568)
    for _ in range(400):
        window = stream(rng, 568)
        example = objective(window, rng)
        inputs, targets = example["input_ids"], example["labels"]
        assert inputs.size == 512 and targets.size == 114
        assert inputs[-1] == EOS and targets[-1] == EOS
        assert np.array_equal(example["decoder_input_ids"], np.concatenate(([PAD], targets[:-1])))
        # Rebuild the original from the two halves: sentinel i in the input stands for target span i.
        target_spans = np.split(targets[:-1], np.flatnonzero(np.isin(targets[:-1], SENTINELS)))[1:]
        rebuilt, noise = [], []
        for token in inputs[:-1]:
            if token in SENTINELS:
                span = target_spans.pop(0)
                assert span[0] == token
                rebuilt.extend(span[1:])
                noise.extend([True] * (span.size - 1))
                span_lengths.append(span.size - 1)
            else:
                rebuilt.append(token)
                noise.append(False)
        assert np.array_equal(rebuilt, window)
        sentinels_used = inputs[np.isin(inputs, SENTINELS)]
        assert np.array_equal(sentinels_used, SENTINELS[:sentinels_used.size])  # in order from <extra_id_0>
        assert sum(noise) == round(568 * 0.15)
        noise_positions += noise
    assert abs(np.mean(span_lengths) - 85 / 28) < 1e-9  # 85 noise tokens in 28 spans: mean span ~3
    # Away from the edges every position is noise with probability 0.15.
    middle = noise_positions[100:468] / 400
    assert abs(middle.mean() - 0.15) < 0.01


# ----------------------------------------------------------------------------- BART

def test_poisson_spans_cover_the_budget_exactly():
    rng = np.random.default_rng(8)
    first_lengths = []
    for _ in range(20000):
        lengths = poisson_span_lengths(38, 3.0, rng)
        assert lengths.sum() == 38 and lengths.min() >= 0
        # Only the first draw is unconditioned: the ones before the stop are biased short and the last
        # one long (the inspection paradox), and the last is cut to fit.
        first_lengths.append(lengths[0])
    first_lengths = np.asarray(first_lengths)
    assert abs(first_lengths.mean() - 3.0) < 0.07 and abs(first_lengths.var() - 3.0) < 0.2
    for k in range(6):
        binomial_close(np.mean(first_lengths == k), math.exp(-3) * 3.0**k / math.factorial(k), first_lengths.size)


def test_infill_replaces_each_span_with_one_mask():
    rng = np.random.default_rng(9)
    for _ in range(300):
        tokens = stream(rng, 126)
        lengths = poisson_span_lengths(round(0.3 * 126), 3.0, rng)
        corrupted, masked = infill(tokens, lengths, MASK, rng)
        assert masked.sum() == round(0.3 * 126)
        assert corrupted.size == 126 - lengths.sum() + lengths.size
        assert np.sum(corrupted == MASK) == lengths.size
        assert np.array_equal(corrupted[corrupted != MASK], tokens[~masked])
        position, span = 0, 0  # walk both: the k-th mask must stand exactly where span k was cut out
        for token in corrupted:
            if token == MASK:
                assert masked[position:position + lengths[span]].all()
                position, span = position + lengths[span], span + 1
            else:
                assert token == tokens[position] and not masked[position]
                position += 1
        assert position == tokens.size and span == lengths.size


def test_sentence_permutation_is_uniform():
    rng = np.random.default_rng(10)
    sentence_end = np.zeros(VOCAB, dtype=bool)
    sentence_end[7] = True
    tokens = np.array([10, 11, 7, 20, 7, 30, 31, 32])  # sentences: [10 11 7] [20 7] [30 31 32]
    orders = {}
    for _ in range(6000):
        permuted = permute_sentences(tokens, sentence_end, rng)
        assert sorted(permuted) == sorted(tokens)
        orders[tuple(permuted)] = orders.get(tuple(permuted), 0) + 1
    assert_uniform(orders, 6, 6000)


def test_bart_example_layout():
    rng = np.random.default_rng(11)
    sentence_end = np.zeros(VOCAB, dtype=bool)
    sentence_end[5:100] = True
    objective = BARTDenoise(bos_id=CLS, eos_id=SEP, mask_id=MASK, pad_id=PAD, sentence_end=sentence_end)
    masks = []
    for _ in range(300):
        window = stream(rng, 126)
        example = objective(window, rng)
        assert all(example[key].size == 128 for key in example)
        assert np.array_equal(example["labels"], np.concatenate(([CLS], window, [SEP])))
        assert np.array_equal(example["decoder_input_ids"], np.concatenate(([SEP], example["labels"][:-1])))
        length = int(example["attention_mask"].sum())
        encoder = example["input_ids"][:length]
        assert encoder[0] == CLS and encoder[-1] == SEP and np.all(example["input_ids"][length:] == PAD)
        kept = encoder[1:-1][encoder[1:-1] != MASK]
        assert kept.size == 126 - round(0.3 * 126)  # exactly 30% of the tokens went into spans
        masks.append(np.sum(encoder == MASK))
    assert abs(np.mean(masks) - 0.3 * 126 / 3) < 1.5  # about one <mask> per 3 masked tokens


@pytest.mark.parametrize("objective", [mlm(), mlm(nsp=True), T5Span(SENTINELS, EOS, PAD, 64)])
def test_examples_are_pure_functions_of_window_and_rng(objective):
    window = stream(np.random.default_rng(12), 200)[:objective.window_length(64)]
    other = stream(np.random.default_rng(13), objective.window_length(64))
    first = objective(window, np.random.default_rng(99), other)
    second = objective(window.copy(), np.random.default_rng(99), other.copy())
    assert all(np.array_equal(first[key], second[key]) for key in first)


@pytest.mark.parametrize("preset", ["builtin", "bert_mlm", "roberta_mlm", "span_bert", "t5_span", "bart_denoise", "xlnet_plm"])
def test_presets_build_their_objective_from_a_real_tokenizer(preset):
    from scaletrain.configs.store import compose_config
    from scaletrain.data.objectives import build_objective
    from scaletrain.data.tokenizer import train_tokenizer

    data_cfg = compose_config([f"data={preset}", "data.span_max_words=6", "data.bart_mask_ratio=0.2"]).data
    rng = np.random.default_rng(14)
    words = ["".join(rng.choice(list("abcdefghij"), size=rng.integers(2, 7))) for _ in range(2000)]
    texts = [" ".join(rng.choice(words, size=40)) + ". The end!" for _ in range(300)]
    tokenizer = train_tokenizer(data_cfg.tokenizer_type, texts, 700)
    objective = build_objective(data_cfg, tokenizer, 64)
    assert objective.name == data_cfg.objective
    window = np.asarray(tokenizer.encode(" ".join(texts[:5])))[:objective.window_length(64)]
    example = objective(window, np.random.default_rng(0), window)
    assert example["input_ids"].shape == (64,)
    if preset == "bert_mlm":
        assert objective.nsp and not objective.dynamic and "next_sentence_label" in example
        assert tokenizer.decode([example["input_ids"][0]]) == "[CLS]"
    if preset == "span_bert":
        assert objective.max_span == 6 and objective.word_start is not None
    if preset == "t5_span":
        assert example["labels"][-1] == tokenizer.special_id("eos") and objective.sentinel_ids[0] == 699
    if preset == "bart_denoise":
        assert objective.mask_ratio == 0.2 and example["decoder_input_ids"][0] == tokenizer.special_id("eos")
