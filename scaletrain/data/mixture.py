"""Weighted mixtures of sources (`data.mixture={cc: 0.6, webtext2: 0.22, ...}`), as GPT-3 trained.

A source is a folder written by `scaletrain data prepare`, a Megatron-LM `.bin`/`.idx` prefix, or a corpus
(anything `data.corpus` accepts) that is prepared into `data.cache_dir` on first use. All sources must
share one tokenizer.

Which source global sample position g comes from is a pure function of (seed, g): the sources are the
leaves of a binary tree, and each inner node with left share p (of its subtree's weight) sends its i-th
arriving position left exactly when floor(p (i+1) + d) > floor(p i + d), d a seeded offset in [0, 1).
That is a Sturmian (Beatty) sequence: in any window of n arrivals the left count is within 1 of p n, so a
leaf at depth k receives w n +- k positions of any n consecutive global positions, and its local index
(how many positions it received before g) is closed form too: floor(p i + d) going left, i minus that
going right. Source s's local index j is its sample permutation(seed, s, j // n_s)[j % n_s], so a source
that runs out starts a new epoch with a new shuffle. Nothing depends on the dp size, and the loader's
state stays one global counter."""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from scaletrain.data.corpus import Corpus, load_corpus
from scaletrain.data.tokenizer import Tokenizer, load_tokenizer
from scaletrain.errors import DataError

log = logging.getLogger(__name__)

_MIXTURE_STREAM = 2  # random stream of the tree's offsets (0 and 1 are the loader's train / validation)


def normalized_weights(mixture: Dict[str, float]) -> Dict[str, float]:
    total = float(sum(mixture.values()))
    return {name: float(weight) / total for name, weight in mixture.items()}


# ----------------------------------------------------------------------------- the sampling order

@dataclass
class _Node:
    source: int = -1  # a leaf's source; -1 for an inner node
    left: Optional["_Node"] = None
    right: Optional["_Node"] = None
    p_left: float = 0.0
    offset: float = 0.0


def _build_tree(sources: List[int], weights: List[float], rng: np.random.Generator) -> _Node:
    """Balanced by count (depth ceil(log2 K)), so the worst window error is ceil(log2 K) samples."""
    if len(sources) == 1:
        return _Node(source=sources[0])
    half = len(sources) // 2
    left_weight, total = sum(weights[s] for s in sources[:half]), sum(weights[s] for s in sources)
    node = _Node(p_left=left_weight / total, offset=float(rng.random()))
    node.left = _build_tree(sources[:half], weights, rng)
    node.right = _build_tree(sources[half:], weights, rng)
    return node


class MixtureOrder:
    """Global position -> (source, sample index within the source, that source's epoch)."""

    def __init__(self, weights: List[float], samples_per_source: List[int], seed: int):
        self.weights, self.samples_per_source, self.seed = list(weights), list(samples_per_source), seed
        active = [s for s, weight in enumerate(self.weights) if weight > 0]
        self.root = _build_tree(active, self.weights, np.random.default_rng((seed, _MIXTURE_STREAM)))
        self._permutations: Dict[int, Tuple[int, np.ndarray]] = {}

    def route(self, position: int) -> Tuple[int, int]:
        """-> (source, how many earlier global positions went to that source)."""
        node, local = self.root, position
        while node.source < 0:
            taken = math.floor(node.p_left * local + node.offset)  # positions sent left before this one
            if math.floor(node.p_left * (local + 1) + node.offset) > taken:
                node, local = node.left, taken
            else:
                node, local = node.right, local - taken
        return node.source, local

    def permutation(self, source: int, epoch: int) -> np.ndarray:
        cached = self._permutations.get(source)
        if cached is None or cached[0] != epoch:
            permutation = np.random.default_rng((self.seed, source, epoch)).permutation(self.samples_per_source[source])
            cached = self._permutations[source] = (epoch, permutation)
        return cached[1]

    def locate(self, position: int) -> Tuple[int, int, int]:
        source, local = self.route(position)
        epoch, offset = divmod(local, self.samples_per_source[source])
        return source, int(self.permutation(source, epoch)[offset]), epoch


# ----------------------------------------------------------------------------- sources

@dataclass
class MixtureSource:
    name: str  # the key as written in data.mixture
    weight: float  # normalized
    train: object  # IndexedTokens or MegatronTokens
    validation: object
    location: str
    tokenizer_hash: str


@dataclass
class Mixture:
    sources: List[MixtureSource]

    @property
    def weights(self) -> List[float]:
        return [source.weight for source in self.sources]

    def log_plan(self, samples_per_source: List[int], total_samples: Optional[int]) -> None:
        """Weights and the epochs each source will see over `total_samples` global samples."""
        for source, samples in zip(self.sources, samples_per_source):
            epochs = (f"{source.weight * total_samples / samples:.3f} epochs over the run" if total_samples
                      else "no run length set (trainer.max_steps / max_tokens)")
            log.info("mixture source %s: weight %.4f, %d samples (%d tokens), %s", source.name, source.weight,
                     samples, source.train.num_tokens, epochs)


def metric_name(source_name: str) -> str:
    """A source key (maybe a path) as a metric suffix: its last path component, [A-Za-z0-9_.-] only."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", Path(source_name.rstrip("/")).name or source_name)


def metric_names(source_names: list[str]) -> list[str]:
    """One distinct metric suffix per source: the last path component, or, where two sources share it
    (a/wiki and b/wiki), the whole key; a number where even those agree once sanitized."""
    short = [metric_name(name) for name in source_names]
    names = [metric_name_full(name) if short.count(s) > 1 else s for name, s in zip(source_names, short)]
    return [f"{name}_{i}" if names.count(name) > 1 else name for i, name in enumerate(names)]


def metric_name_full(source_name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", source_name.strip("/"))


def _resolve(name: str, root: str) -> Path:
    path = Path(os.path.expanduser(name))
    if not path.is_absolute() and root:
        path = Path(os.path.expanduser(root)) / path
    return path


def _kind(name: str, path: Path) -> str:
    from scaletrain.data.megatron import is_megatron_prefix

    if path.is_dir() and (path / "metadata.json").is_file():
        return "prepared"
    if is_megatron_prefix(path):
        return "megatron"
    if name == "builtin" or path.exists() or any(char in str(path) for char in "*?["):
        return "corpus"
    raise DataError(f"data.mixture source {name!r} is missing: {path} is neither a prepared folder, a Megatron "
                    f".bin/.idx prefix nor a corpus; fix the path (relative keys are looked up under "
                    f"data.mixture_root)")


def _mixture_tokenizer(data_cfg, kinds: Dict[str, Tuple[str, Path]], corpora: Dict[str, Corpus]) -> Tokenizer:
    """data.tokenizer when named; else the first prepared source's; else one trained on the corpora."""
    from scaletrain.data.prepare import tokenizer_from_config

    if data_cfg.tokenizer != "train":
        return load_tokenizer(data_cfg.tokenizer)
    for name, (kind, path) in kinds.items():
        if kind == "prepared":
            tokenizer = load_tokenizer(str(path / "tokenizer.json"))
            tokenizer.source = f"the tokenizer of mixture source {name} ({path})"
            return tokenizer
    if not corpora:
        raise DataError("data.mixture has only Megatron sources, which carry no tokenizer; name it with "
                        "data.tokenizer=PATH")
    union = Corpus(name="mixture", fingerprint=hashlib.sha256("|".join(c.fingerprint for c in corpora.values())
                                                              .encode()).hexdigest(),
                   _read=lambda: itertools.chain.from_iterable(c.documents() for c in corpora.values()))
    return tokenizer_from_config(data_cfg, union)


def _check_same_tokenizer(sources: List[MixtureSource]) -> None:
    first = sources[0]
    for source in sources[1:]:
        if source.tokenizer_hash != first.tokenizer_hash:
            raise DataError(f"data.mixture sources {first.name} (tokenizer {first.tokenizer_hash[:12]}) and "
                            f"{source.name} (tokenizer {source.tokenizer_hash[:12]}) use different tokenizers; "
                            f"re-prepare one with the other's tokenizer.json (data.tokenizer=PATH)")


def build_mixture(cfg, progress: bool = True):
    """PreparedData whose train/validation are the first source's and whose `mixture` holds them all."""
    from scaletrain.data.megatron import open_megatron
    from scaletrain.data.prepare import PreparedData, open_prepared, prepare, prepared_cache_dir

    data_cfg = cfg.data
    weights = normalized_weights(data_cfg.mixture)
    paths = {name: _resolve(name, data_cfg.mixture_root) for name in weights}
    kinds = {name: (_kind(name, path), path) for name, path in paths.items()}
    corpora = {name: load_corpus("builtin" if name == "builtin" else str(path), data_cfg.format,
                                 data_cfg.text_field, data_cfg.split_blank_lines, data_cfg.decode_errors)
               for name, (kind, path) in kinds.items() if kind == "corpus"}
    tokenizer = _mixture_tokenizer(data_cfg, kinds, corpora)
    sources = []
    for name, (kind, path) in kinds.items():
        if kind == "megatron":
            train, validation = open_megatron(path, tokenizer, data_cfg.val_fraction, data_cfg.verify)
            sources.append(MixtureSource(name, weights[name], train, validation, str(path), tokenizer.hash))
            continue
        if kind == "corpus":
            path = prepared_cache_dir(data_cfg, corpora[name], tokenizer)
            prepare(corpora[name], tokenizer, path, data_cfg.val_fraction, data_cfg.num_workers, progress,
                    verify=data_cfg.verify, max_shard_bytes=data_cfg.max_shard_bytes)
        # its own tokenizer: compared below, naming both sources; a corpus's was just verified by prepare
        prepared = open_prepared(path, None, data_cfg.verify if kind == "prepared" else "size")
        sources.append(MixtureSource(name, weights[name], prepared.train, prepared.validation, str(path),
                                     prepared.metadata["tokenizer_hash"]))
    _check_same_tokenizer(sources)
    if sources[0].tokenizer_hash != tokenizer.hash:
        raise DataError(f"data.mixture source {sources[0].name} was tokenized with {sources[0].tokenizer_hash[:12]} "
                        f"but data.tokenizer is {tokenizer.hash[:12]} ({tokenizer.source}); re-prepare the "
                        f"source with it or set data.tokenizer to the source's tokenizer.json")
    log.info("data.mixture: %s", ", ".join(f"{s.name} {s.weight:.4f} ({s.location})" for s in sources))
    first = sources[0]
    return PreparedData(tokenizer, first.train, first.validation, Path(first.location),
                        {"mixture": {s.name: s.weight for s in sources}}, mixture=Mixture(sources))
