"""data.mixture: exact shares over every window, dp-independent and resumable order, epochs per source,
one tokenizer, and the built-in corpus split into parts mixed at known weights."""

import json

import numpy as np
import pytest
import torch

from scaletrain import cli
from scaletrain.configs.store import compose_config
from scaletrain.data.indexed import IndexedTokens, IndexedWriter
from scaletrain.data.loader import Loader
from scaletrain.data.mixture import Mixture, MixtureOrder, MixtureSource
from scaletrain.data.objectives import CLM
from scaletrain.data.prepare import build_datasets, prepare
from scaletrain.data.corpus import load_corpus
from scaletrain.data.tokenizer import train_tokenizer
from scaletrain.errors import DataError

GPT3 = {"cc": 0.60, "webtext2": 0.22, "books1": 0.08, "books2": 0.08, "wiki": 0.03}  # sums to 1.01


def gpt3_order(seed=0):
    total = sum(GPT3.values())
    return [w / total for w in GPT3.values()], MixtureOrder(list(GPT3.values()), [977, 5000, 31, 64, 7], seed)


@pytest.mark.parametrize("seed", [0, 1234])
def test_every_window_of_1000_has_the_weights_within_1_percent(seed):
    weights, order = gpt3_order(seed)
    for start in (0, 7, 999_983, 10**12 + 5):
        sources = np.array([order.route(position)[0] for position in range(start, start + 1000)])
        shares = np.bincount(sources, minlength=len(weights)) / 1000
        assert np.abs(shares - weights).max() < 0.01, (start, shares)


def test_each_source_sees_every_local_index_once_and_wraps_with_a_new_shuffle():
    weights, order = gpt3_order()
    seen = {source: [] for source in range(len(weights))}
    for position in range(3000):
        source, local = order.route(position)
        seen[source].append(local)
    for source, locals_ in seen.items():
        assert locals_ == list(range(len(locals_)))  # consecutive: no position lost or repeated
    wiki = order.samples_per_source[4]  # 7 samples, ~89 draws in 3000: about 12 epochs
    draws, position = [], 0
    while len(draws) < 2 * wiki:  # the samples wiki's first two epochs serve, in order
        source, index, epoch = order.locate(position)
        if source == 4:
            assert epoch == len(draws) // wiki
            draws.append(index)
        position += 1
    first, second = draws[:wiki], draws[wiki:]
    assert sorted(first) == sorted(second) == list(range(wiki)) and first != second


def write_source(prefix, rng, count, low, high):
    """Documents of ids in [low, high): each source's tokens are disjoint, so a sample names its source."""
    writer = IndexedWriter(prefix, np.uint16)
    for _ in range(count):
        tokens = np.append(rng.integers(low, high, size=rng.integers(5, 60)), 2)
        writer.add_documents(tokens, np.array([tokens.size]))
    writer.finish()
    return IndexedTokens(prefix)


@pytest.fixture
def mixture(tmp_path):
    rng = np.random.default_rng(0)
    sources = [write_source(tmp_path / f"s{i}", rng, count, 100 * (i + 1), 100 * (i + 2))
               for i, count in enumerate((80, 15, 40))]
    return Mixture([MixtureSource(f"s{i}", w, d, d, str(d.prefix), "h") for i, (w, d) in
                    enumerate(zip((0.5, 0.3, 0.2), sources))])


def run(mixture, steps, dp_size, state=None, global_batch=8):
    loaders = [Loader(mixture, CLM(), 16, global_batch, 2, rank, dp_size, seed=3) for rank in range(dp_size)]
    for loader in loaders:
        if state is not None:
            loader.load_state_dict(state)
    batches = []
    for _ in range(steps):
        micro = [batch for loader in loaders for batch in next(loader)]
        batches.append(torch.cat([b["input_ids"] for b in micro]))
    return batches, loaders[0].state_dict()


def test_mixture_batches_are_the_same_at_any_dp_size_and_resume_exactly(mixture):
    reference, _ = run(mixture, 10, 1)
    two, _ = run(mixture, 10, 2)
    head, state = run(mixture, 4, 4)
    tail, _ = run(mixture, 6, 2, state)
    for a, b, c in zip(reference, two, head + tail):
        assert torch.equal(a, b) and torch.equal(a, c)
    ids = torch.cat(reference).max(dim=1).values  # the source of each sample, read off its tokens
    shares = np.bincount((ids.numpy() // 100) - 1, minlength=3) / ids.numel()
    assert np.abs(shares - [0.5, 0.3, 0.2]).max() < 0.03  # 80 samples: within the tree's 2 samples


def test_resume_refuses_other_weights(mixture):
    _, state = run(mixture, 1, 1)
    mixture.sources[0].weight, mixture.sources[1].weight = 0.4, 0.4
    with pytest.raises(DataError, match="same data"):
        run(mixture, 1, 1, state)


# ----------------------------------------------------------------------------- the built-in corpus in parts

@pytest.fixture(scope="module")
def builtin_parts(tmp_path_factory):
    """The built-in corpus's first 79 documents (the pydoc topics it starts with, without parsing the
    stdlib) cut into three text folders, one document per file, of unequal size."""
    from pydoc_data.topics import topics

    root = tmp_path_factory.mktemp("parts")
    documents = [topics[name].strip() for name in sorted(topics)]
    for name, part in (("docs", documents[:40]), ("api", documents[40:65]), ("ref", documents[65:])):
        (root / name).mkdir()
        for i, text in enumerate(part):
            (root / name / f"{i:04d}.txt").write_text(text)
    return root


def overrides(root, mixture, *extra):
    return [f"data.mixture={mixture}", f"data.mixture_root={root}", f"data.cache_dir={root / 'cache'}",
            "data.tokenizer_vocab=512", "model.vocab_size=512", "data.num_workers=0", *extra]


def test_builtin_corpus_in_parts_realizes_the_weights(builtin_parts):
    cfg = compose_config(overrides(builtin_parts, "{docs: 3, api: 1.5, ref: 0.5}"))
    data = build_datasets(cfg, progress=False)
    assert [s.weight for s in data.mixture.sources] == pytest.approx([0.6, 0.3, 0.1])
    # Independent of the order: every sample's 33 tokens are looked up among each source's windows.
    windows = [{bytes(s.train.tokens[i:i + 33]) for i in range(0, s.train.num_tokens - 32, 32)}
               for s in data.mixture.sources]
    loader = Loader(data.mixture, CLM(), 32, 40, 40, seed=cfg.seed)
    origin = []
    for _ in range(25):  # 1,000 samples
        for batch in next(loader):
            for row in torch.cat([batch["input_ids"], batch["labels"][:, -1:]], 1).numpy():
                owners = [s for s, w in enumerate(windows) if bytes(row.astype(np.uint16)) in w]
                origin.append(owners[0])
    shares = np.bincount(origin, minlength=3) / len(origin)
    assert len(origin) == 1000 and np.abs(shares - [0.6, 0.3, 0.1]).max() < 0.01, shares


def test_sources_with_other_tokenizers_are_refused_naming_both(builtin_parts, tmp_path):
    documents = [path.read_text() for path in sorted((builtin_parts / "docs").iterdir())]
    corpus = load_corpus(str(builtin_parts / "ref"))
    hashes = []
    for name, vocab in (("a", 512), ("b", 600)):
        tokenizer = train_tokenizer("byte_bpe", documents, vocab)
        prepare(corpus, tokenizer, tmp_path / name, num_workers=0, progress=False)
        hashes.append(tokenizer.hash[:12])
    with pytest.raises(DataError, match=f"{hashes[0]}.*{hashes[1]}"):
        build_datasets(compose_config(overrides(tmp_path, "{a: 1, b: 1}")), progress=False)


@pytest.mark.parametrize("mixture, message", [
    ("{docs: -1, api: 2}", "negative"), ("{docs: 0, api: 0}", "sum to zero"),
    ("{docs: 1, missing: 1}", "missing"),
])
def test_bad_mixtures_exit_2_with_one_line(builtin_parts, tmp_path, capsys, mixture, message):
    code = cli.main(["train", *overrides(builtin_parts, mixture), "trainer.max_steps=1",
                     f"hydra.run.dir={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and message in err, err


def test_gpt3_mixture_experiment_documents_the_published_weights():
    cfg = compose_config(["experiment=gpt3_mixture"])
    assert cfg.data.mixture == {"common_crawl": 0.60, "webtext2": 0.22, "books1": 0.08, "books2": 0.08,
                                "wikipedia": 0.03}


def test_training_logs_a_validation_loss_per_source(builtin_parts, tmp_path):
    from tests.integration.train_utils import tiny_overrides, make_trainer

    run_dir = tmp_path / "run"
    trainer = make_trainer(run_dir, tiny_overrides("gpt", *overrides(builtin_parts, "{docs: 0.7, ref: 0.3}"),
                                                   "trainer.max_steps=2", "trainer.eval_batches=1",
                                                   "trainer.eval_every=2"))
    trainer.train()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if "val_loss" in r][-1]
    assert final["val_loss"] == pytest.approx(0.7 * final["val_loss/docs"] + 0.3 * final["val_loss/ref"])


def test_sources_that_share_a_last_path_component_get_distinct_metric_names():
    from scaletrain.data.mixture import metric_names

    assert metric_names(["cc", "/data/a/wiki", "/data/b/wiki/"]) == ["cc", "data_a_wiki", "data_b_wiki"]
    assert metric_names(["a/b", "a_b", "x/b"]) == ["a_b_0", "a_b_1", "x_b"]
