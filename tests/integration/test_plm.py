"""XLNet's permutation LM objective (data.objective=plm): the share of predicted tokens is 1/K within
sampling error, spans are at most plm_max_span long, every perm_mask is a valid factorization order (no
target sees itself or a later target, non-targets see no target and are seen by all), the inputs are
A <sep> B <sep> <cls>; and a tiny XLNet learns on it (its FLOPs: tests/unit/test_metrics.py)."""

import numpy as np
import pytest

from scaletrain.data.objectives import PLM
from train_utils import COMMON, make_trainer

SEP, CLS = 3, 4
SPECIAL = np.zeros(1000, dtype=bool)
SPECIAL[:5] = True


def examples(count, seq_len=64, k=6, max_span=5, seed=0):
    objective, rng = PLM(SEP, CLS, SPECIAL, k=k, max_span=max_span), np.random.default_rng(seed)
    return objective, [objective(rng.integers(5, 1000, objective.window_length(seq_len)), rng) for _ in range(count)]


def _targets(example):
    return example["target_mapping"].sum(axis=0) > 0  # (T,) the predicted positions


@pytest.mark.parametrize("k", [4, 6])
def test_one_token_in_k_is_predicted_in_spans_of_at_most_max_span(k):
    objective, batch = examples(400, seq_len=128, k=k)
    targets = np.stack([_targets(e) for e in batch])
    candidates = 125  # the window; <sep> <sep> <cls> are never predicted
    share, n = targets.sum() / (len(batch) * candidates), len(batch) * candidates
    assert abs(share - 1 / k) < 4 * np.sqrt((1 / k) * (1 - 1 / k) * 20 / n)  # spans: ~20x the binomial variance
    for example, row in zip(batch, targets):
        assert not row[np.isin(example["input_ids"], [SEP, CLS])].any() and (example["input_ids"][row] >= 5).all()
        runs = np.diff(np.flatnonzero(np.diff(np.concatenate([[0], row.astype(int), [0]]))))[::2]
        assert runs.max() <= 2 * 5  # one span per block; two may touch across a block boundary
        labels = example["labels"]
        assert (labels[:row.sum()] == example["input_ids"][row]).all() and (labels[row.sum():] == -100).all()
        assert example["target_mapping"].shape == (objective.num_predict(125), 128)


def test_every_perm_mask_is_a_factorization_order_with_the_context_first():
    _, batch = examples(50)
    for example in batch:
        hidden, targets = example["perm_mask"].astype(bool), _targets(example)
        assert not hidden[:, ~targets].any()  # every query sees every non-target
        assert hidden[np.ix_(~targets, targets)].all()  # the context sees no target
        sees = ~hidden[np.ix_(targets, targets)]  # among targets: i sees j
        assert not sees.diagonal().any()  # nor its own content
        # a strict total order: the number of targets each one sees is 0, 1, ..., n-1 (so acyclic)
        assert sorted(sees.sum(axis=1)) == list(range(targets.sum()))
        assert (sees & sees.T).sum() == 0


def test_segments_are_a_sep_b_sep_cls_and_the_order_differs_per_example():
    _, batch = examples(20)
    for example in batch:
        ids, types = example["input_ids"], example["token_type_ids"]
        assert ids[-1] == CLS and ids[-2] == SEP and (ids == SEP).sum() == 2 and types[-1] == 2
        cut = int(np.flatnonzero(ids == SEP)[0])
        assert (types[:cut + 1] == 0).all() and (types[cut + 1:-1] == 1).all()
    assert len({e["perm_mask"].tobytes() for e in batch}) == len(batch)


def test_a_tiny_xlnet_learns_the_permutation_lm(tmp_path):
    overrides = ["model=xlnet_tiny", "model.vocab_size=512", "data=xlnet_plm", "data.tokenizer_vocab=512",
                 *COMMON, "trainer.max_steps=30", "optim.lr=3e-3"]
    trainer = make_trainer(tmp_path, overrides)
    assert trainer.train() == 0
    first, last = np.mean(trainer.losses[:5]), np.mean(trainer.losses[-5:])
    assert last < first - 0.3, trainer.losses
