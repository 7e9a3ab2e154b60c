"""The loader: a global sample order independent of dp, exact resume (also across a dp change), epochs."""

import numpy as np
import pytest
import torch

from scaletrain.data.indexed import IndexedTokens, IndexedWriter
from scaletrain.data.loader import Loader, validation_batches
from scaletrain.data.objectives import CLM, MLM, T5Span
from scaletrain.errors import DataError

EOD, VOCAB = 2, 500
SPECIAL = np.zeros(VOCAB, dtype=bool)
SPECIAL[:5] = True


def write_documents(prefix, documents):
    writer = IndexedWriter(prefix, np.uint16)
    for document in documents:
        tokens = np.append(document, EOD)
        writer.add_documents(tokens, np.array([tokens.size]))
    writer.finish()
    return IndexedTokens(prefix)


@pytest.fixture
def documents():
    rng = np.random.default_rng(0)
    return [rng.integers(5, VOCAB, size=rng.integers(1, 80)) for _ in range(120)]


@pytest.fixture
def dataset(tmp_path, documents):
    return write_documents(tmp_path / "train", documents)


def mlm_objective():
    return MLM(cls_id=0, sep_id=EOD, mask_id=1, pad_id=3, special=SPECIAL)


def global_batches(dataset, objective, steps, dp_size, start_state=None, global_batch=8, micro_batch=2):
    """Runs dp_size loaders side by side and reassembles each step's global batch in rank order."""
    loaders = [Loader(dataset, objective, 16, global_batch, micro_batch, rank, dp_size, seed=7)
               for rank in range(dp_size)]
    if start_state is not None:
        for loader in loaders:
            loader.load_state_dict(start_state)
    batches = []
    for _ in range(steps):
        per_rank = [next(loader) for loader in loaders]
        assert all(len(micro) == global_batch // (micro_batch * dp_size) for micro in per_rank)
        micro_batches = [batch for rank_batches in per_rank for batch in rank_batches]
        batches.append({key: torch.cat([b[key] for b in micro_batches]) for key in micro_batches[0]})
    return batches, loaders[0].state_dict()


def assert_same(first, second):
    assert len(first) == len(second)
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_clm_windows_are_the_packed_stream(dataset, documents):
    stream = np.concatenate([np.append(document, EOD) for document in documents])  # independent packing
    loader = Loader(dataset, CLM(), 16, 4, 4, seed=3)
    permutation = np.random.default_rng((3, 0)).permutation(loader.samples_per_epoch)
    assert loader.samples_per_epoch == (stream.size - 17) // 16 + 1
    batch = next(loader)[0]
    for row, index in enumerate(permutation[:4]):
        window = stream[index * 16:index * 16 + 17]
        assert torch.equal(batch["input_ids"][row], torch.from_numpy(window[:-1].astype(np.int64)))
        assert torch.equal(batch["labels"][row], torch.from_numpy(window[1:].astype(np.int64)))


@pytest.mark.parametrize("objective", [CLM(), mlm_objective()], ids=["clm", "mlm"])
def test_dp_ranks_split_the_same_global_batches(dataset, objective):
    reference, _ = global_batches(dataset, objective, steps=4, dp_size=1)
    for dp_size in (2, 4):
        batches, _ = global_batches(dataset, objective, steps=4, dp_size=dp_size)
        assert_same(reference, batches)


@pytest.mark.parametrize("objective", [CLM(), mlm_objective()], ids=["clm", "mlm"])
def test_resume_is_exact_even_with_another_dp_size(dataset, objective):
    sizes = dict(global_batch=32, micro_batch=4)
    uninterrupted, _ = global_batches(dataset, objective, steps=12, dp_size=1, **sizes)
    head, state = global_batches(dataset, objective, steps=5, dp_size=2, **sizes)
    tail, end = global_batches(dataset, objective, steps=7, dp_size=4, start_state=state, **sizes)
    assert state["consumed_samples"] == 160
    assert end["consumed_samples"] == 384 > state["samples_per_epoch"]  # the run crossed an epoch
    assert_same(uninterrupted, head + tail)


def test_each_epoch_is_a_permutation_and_epochs_differ(dataset):
    loader = Loader(dataset, CLM(), 16, 4, 2, seed=1)
    per_epoch = loader.samples_per_epoch
    positions = range(2 * per_epoch)
    indices = [int(loader.permutation(p // per_epoch)[p % per_epoch]) for p in positions]
    assert sorted(indices[:per_epoch]) == list(range(per_epoch))
    assert sorted(indices[per_epoch:]) == list(range(per_epoch))
    assert indices[:per_epoch] != indices[per_epoch:]


@pytest.mark.parametrize("dynamic", [True, False])
def test_dynamic_masking_redraws_masks_each_epoch(dataset, dynamic):
    objective = MLM(cls_id=0, sep_id=EOD, mask_id=1, pad_id=3, special=SPECIAL, dynamic=dynamic)
    loader = Loader(dataset, objective, 16, 4, 4, seed=5)
    per_epoch = loader.samples_per_epoch
    first = loader.permutation(0)[0]
    second_position = per_epoch + int(np.flatnonzero(loader.permutation(1) == first)[0])
    epoch0, epoch1 = loader.sample_at(0), loader.sample_at(second_position)
    assert np.array_equal(epoch0["labels"] != -100, epoch1["labels"] != -100) != dynamic


def test_seeds_change_the_order(dataset):
    first = next(Loader(dataset, CLM(), 16, 4, 4, seed=1))[0]["input_ids"]
    again = next(Loader(dataset, CLM(), 16, 4, 4, seed=1))[0]["input_ids"]
    other = next(Loader(dataset, CLM(), 16, 4, 4, seed=2))[0]["input_ids"]
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_t5_batches_have_exact_shapes(dataset):
    objective = T5Span(np.arange(VOCAB - 1, VOCAB - 101, -1), EOD, 3, seq_len=32)
    micro = next(Loader(dataset, objective, 32, 4, 2, seed=0))
    assert len(micro) == 2
    assert micro[0]["input_ids"].shape == (2, 32) and micro[0]["labels"].shape == (2, objective.target_length)
    assert micro[0]["input_ids"].dtype == torch.int64


def test_validation_batches_are_fixed_and_split_across_ranks(dataset):
    objective = mlm_objective()
    one = list(validation_batches(dataset, objective, 16, 4, 0, 1, max_batches=3, seed=0))
    again = list(validation_batches(dataset, objective, 16, 4, 0, 1, max_batches=3, seed=0))
    assert_same(one, again)
    halves = [list(validation_batches(dataset, objective, 16, 2, rank, 2, max_batches=3, seed=0))
              for rank in range(2)]
    for batch, rank0, rank1 in zip(one, *halves):
        assert torch.equal(batch["input_ids"], torch.cat([rank0["input_ids"], rank1["input_ids"]]))


def test_bad_inputs_raise_user_errors(tmp_path, dataset):
    with pytest.raises(DataError, match="not divisible"):
        Loader(dataset, CLM(), 16, 10, 4, 0, 1)
    tiny = write_documents(tmp_path / "tiny", [np.arange(5, 9)])
    with pytest.raises(DataError, match="fewer than one clm sample"):
        Loader(tiny, CLM(), 16, 4, 4)
    with pytest.raises(DataError, match="fewer than one batch"):
        list(validation_batches(tiny, CLM(), 4, 4, max_batches=2))
    state = Loader(dataset, CLM(), 16, 4, 4, seed=1).state_dict()
    with pytest.raises(DataError, match="same data, seq_len"):
        Loader(dataset, CLM(), 32, 4, 4, seed=1).load_state_dict(state)
