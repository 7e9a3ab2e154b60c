"""Tokenizers (the Rust `tokenizers` library): train one of the four classic kinds on a corpus, or load a
local tokenizer.json / Hugging Face tokenizer folder offline. `Tokenizer` wraps the backend with what the
pipeline needs: special-token ids by role, a content hash (shards record it), and per-vocab tables the
objectives use (which tokens start a word, which end a sentence)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Iterable, List, Optional

import numpy as np
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from scaletrain.configs.schema import minimum_tokenizer_vocab
from scaletrain.errors import DataError

log = logging.getLogger(__name__)

KINDS = ("byte_bpe", "wordpiece", "unigram", "bart_bpe")
NUM_SENTINELS = 100  # T5's <extra_id_0> ... <extra_id_99>
# Special tokens each kind is trained with, in id order (so BERT's [PAD] is 0 and RoBERTa's <s> is 0).
SPECIAL_TOKENS = {
    "byte_bpe": ["<|endoftext|>"],
    "wordpiece": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
    "unigram": ["<pad>", "</s>", "<unk>"],
    "bart_bpe": ["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
}
# role -> token strings to look for, first found wins; covers GPT-2, BERT, T5, RoBERTa/BART vocabularies.
_ROLE_NAMES = {
    "pad": ["[PAD]", "<pad>"],
    "unk": ["[UNK]", "<unk>"],
    "cls": ["[CLS]", "<s>"],
    "sep": ["[SEP]", "</s>"],
    "mask": ["[MASK]", "<mask>"],
    "bos": ["<s>", "[CLS]", "<|endoftext|>"],
    "eos": ["</s>", "[SEP]", "<|endoftext|>"],
    "eod": ["<|endoftext|>", "</s>", "[SEP]"],
}
_KINDS_WITH = {role: "data.tokenizer_type=" + " or ".join(k for k, names in SPECIAL_TOKENS.items()
                                                          if set(names) & set(_ROLE_NAMES[role]))
               for role in _ROLE_NAMES}
_WORD_PREFIXES = ("\u0120", "\u2581")  # byte-level BPE's 'Ġ' and SentencePiece's '▁' mark a leading space


class Tokenizer:
    def __init__(self, backend: Backend, source: str = ""):
        self.backend = backend
        self.source = source
        self.json = backend.to_str()
        self.hash = hashlib.sha256(self.json.encode()).hexdigest()
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self._ids = {role: self._find(names) for role, names in _ROLE_NAMES.items()}
        sentinels = [backend.token_to_id(f"<extra_id_{i}>") for i in range(NUM_SENTINELS)]
        self.sentinel_ids = [i for i in sentinels if i is not None]

    def _find(self, names: List[str]) -> Optional[int]:
        for name in names:
            token_id = self.backend.token_to_id(name)
            if token_id is not None:
                return token_id
        return None

    def special_id(self, role: str, needed_by: str = "") -> int:
        token_id = self._ids[role]
        if token_id is None:
            raise DataError(f"tokenizer {self.source or '(trained)'} has no {role} token "
                            f"({' / '.join(_ROLE_NAMES[role])}) but {needed_by or 'this objective'} needs one; "
                            f"use a tokenizer that has it: {_KINDS_WITH[role]}")
        return token_id

    def role_id(self, role: str) -> Optional[int]:
        """The id of the token playing `role` (pad, unk, cls, sep, mask, bos, eos, eod), or None."""
        return self._ids[role]

    def role_token(self, role: str) -> Optional[str]:
        token_id = self._ids[role]
        return None if token_id is None else self.backend.id_to_token(token_id)

    @property
    def eod_id(self) -> int:
        return self.special_id("eod", "document packing")

    @property
    def pad_id(self) -> int:
        # GPT-2 has no pad token; its end-of-text is the conventional stand-in.
        return self._ids["pad"] if self._ids["pad"] is not None else self.eod_id

    def encode(self, text: str) -> List[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: List[str]) -> List[List[int]]:
        # encode_batch_fast skips the character offsets we never use (~15-25% less CPU per token).
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        return [encoding.ids for encoding in encode(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def token_strings(self) -> List[str]:
        strings = [""] * self.vocab_size
        for token, token_id in self.backend.get_vocab(with_added_tokens=True).items():
            if token_id < self.vocab_size:
                strings[token_id] = token
        return strings

    def special_mask(self) -> np.ndarray:
        """(V,) bool: tokens an objective must never mask or corrupt."""
        mask = np.zeros(self.vocab_size, dtype=bool)
        for token_id in list(self._ids.values()) + self.sentinel_ids:
            if token_id is not None:
                mask[token_id] = True
        return mask

    def word_start_table(self) -> np.ndarray:
        """(V,) bool: the token begins a new word, for whole-word masking and SpanBERT's word spans."""
        strings = self.token_strings()
        wordpiece = isinstance(self.backend.model, models.WordPiece)
        table = np.zeros(self.vocab_size, dtype=bool)
        for token_id, token in enumerate(strings):
            if wordpiece:  # every piece starts a word unless it is a ## continuation
                table[token_id] = not token.startswith("##")
            else:
                table[token_id] = token.startswith(_WORD_PREFIXES) or not token[:1].isalnum()
        return table | self.special_mask()

    def sentence_end_table(self) -> np.ndarray:
        """(V,) bool: the token ends a sentence (., !, ? or end of document), for BART's permutation."""
        table = np.array([token.rstrip().endswith((".", "!", "?")) for token in self.token_strings()])
        table[self.eod_id] = True
        return table

    def save(self, path: Path) -> None:
        Path(path).write_text(self.json)


def _training_setup(kind: str, vocab_size: int):
    specials = SPECIAL_TOKENS[kind]
    if kind in ("byte_bpe", "bart_bpe"):
        backend = Backend(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, min_frequency=2,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    elif kind == "wordpiece":
        backend = Backend(models.WordPiece(unk_token="[UNK]"))
        backend.normalizer = normalizers.BertNormalizer(lowercase=True)
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    else:  # unigram (T5): the sentinels are added after training, at the top ids, <extra_id_0> last
        backend = Backend(models.Unigram())
        backend.normalizer = normalizers.NFKC()
        backend.pre_tokenizer = pre_tokenizers.Metaspace()
        backend.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size - NUM_SENTINELS, special_tokens=specials,
                                          unk_token="<unk>", show_progress=False)
    return backend, trainer


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int) -> Tokenizer:
    if kind not in KINDS:
        raise DataError(f"data.tokenizer_type={kind!r} is not one of {', '.join(KINDS)}")
    minimum = minimum_tokenizer_vocab(kind)
    if vocab_size < minimum:
        raise DataError(f"data.tokenizer_vocab={vocab_size} is too small for {kind}; use at least {minimum}")
    backend, trainer = _training_setup(kind, vocab_size)
    backend.train_from_iterator(texts, trainer=trainer)
    if kind == "unigram":
        backend.add_special_tokens([f"<extra_id_{i}>" for i in reversed(range(NUM_SENTINELS))])
    tokenizer = Tokenizer(backend, source=f"trained {kind}")
    log.info("trained a %s tokenizer: %d tokens", kind, tokenizer.vocab_size)
    return tokenizer


def load_tokenizer(path: str) -> Tokenizer:
    """A tokenizer.json, or a local Hugging Face folder (tokenizer.json, or vocab.txt for WordPiece, or
    vocab.json + merges.txt for byte-level BPE). Never touches the network."""
    location = Path(os.path.expanduser(path))
    if not location.exists():
        raise DataError(f"data.tokenizer path {path} does not exist; pass a tokenizer.json, a local tokenizer "
                        f"folder, or data.tokenizer=train")
    try:
        if location.is_file():
            return Tokenizer(Backend.from_file(str(location)), source=str(location))
        if (location / "tokenizer.json").is_file():
            return Tokenizer(Backend.from_file(str(location / "tokenizer.json")), source=str(location))
        if (location / "vocab.txt").is_file():
            return Tokenizer(_wordpiece_from_vocab(location), source=str(location))
        if (location / "vocab.json").is_file() and (location / "merges.txt").is_file():
            return Tokenizer(_byte_bpe_from_files(location), source=str(location))
    except Exception as error:  # the Rust library raises plain Exceptions for malformed files
        if isinstance(error, DataError):
            raise
        raise DataError(f"could not read the tokenizer at {path} ({str(error).splitlines()[0]}); pass a valid "
                        f"tokenizer.json") from None
    raise DataError(f"{path} holds no tokenizer.json, vocab.txt or vocab.json+merges.txt; save the tokenizer "
                    f"there or pass data.tokenizer=train")


def _wordpiece_from_vocab(folder: Path) -> Backend:
    vocab = {token: i for i, token in enumerate(folder.joinpath("vocab.txt").read_text().splitlines())}
    config_path = folder / "tokenizer_config.json"
    lowercase = json.loads(config_path.read_text()).get("do_lower_case", True) if config_path.exists() else True
    backend = Backend(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece()
    return backend


def _byte_bpe_from_files(folder: Path) -> Backend:
    backend = Backend(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def check_vocab(model_cfg, tokenizer: Tokenizer, tp: int = 1) -> int:
    """The model's embedding must cover every token id; returns the padded size the model is built with
    (a multiple of pad_vocab_multiple x tp, so vocab-parallel shards are equal) and logs the padding."""
    if model_cfg.vocab_size < tokenizer.vocab_size:
        raise DataError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's "
                        f"{tokenizer.vocab_size} tokens ({tokenizer.source or 'trained'}); set "
                        f"model.vocab_size={tokenizer.vocab_size} or use a smaller data.tokenizer_vocab")
    if model_cfg.pad_token_id != tokenizer.pad_id:
        log.warning("model.pad_token_id=%d but the tokenizer pads with %d; batches use the tokenizer's id",
                    model_cfg.pad_token_id, tokenizer.pad_id)
    padded = model_cfg.padded_vocab_size(tp)
    log.info("vocab: tokenizer %d, model %d, padded to %d (multiple of %d x tp %d): %d padding rows",
             tokenizer.vocab_size, model_cfg.vocab_size, padded, model_cfg.pad_vocab_multiple, tp,
             padded - tokenizer.vocab_size)
    return padded


# ----------------------------------------------------------------------------- family templates

# the tokens each family's post-processor puts around its inputs
TEMPLATE_ROLES = {"gpt": (), "bert": ("cls", "sep"), "roberta": ("cls", "sep"), "t5": ("eos",), "bart": ("cls", "sep"),
                  "xlnet": ("cls", "sep")}


def family_flavour(cfg) -> str:
    """gpt | bert | roberta | t5 | bart | xlnet: which Hugging Face tokenizer (and template) a model config
    matches."""
    if cfg.family == "encdec":
        return "t5" if cfg.position == "relative" else "bart"
    if cfg.family == "bert" and cfg.positions_from_padding:
        return "roberta"
    return cfg.family


def family_post_processor(tokenizer: Tokenizer, flavour: str):
    """What the objectives train with: [CLS] a [SEP] (b [SEP]) for BERT, <s> a </s> (</s> b </s>) for
    RoBERTa and BART, a </s> (b </s>) for T5, a <sep> (b <sep>) <cls> for XLNet (token types 0, 1 and 2 for
    <cls>, as the plm objective packs them); GPT-2's tokenizer adds nothing (None). Export, inference and
    the finetuning tasks all frame texts with it."""
    from tokenizers.processors import TemplateProcessing

    missing = [role for role in TEMPLATE_ROLES[flavour] if tokenizer.role_id(role) is None]
    if missing:
        raise DataError(f"the run's tokenizer has no {missing[0]} token, which a {flavour} tokenizer adds around "
                        f"its inputs; train with a tokenizer that has it")
    if flavour == "gpt":
        return None
    if flavour == "t5":
        eos = tokenizer.role_token("eos")
        return TemplateProcessing(single=f"$A:0 {eos}:0", pair=f"$A:0 {eos}:0 $B:1 {eos}:1",
                                  special_tokens=[(eos, tokenizer.role_id("eos"))])
    cls, sep = tokenizer.role_token("cls"), tokenizer.role_token("sep")
    specials = [(cls, tokenizer.role_id("cls")), (sep, tokenizer.role_id("sep"))]
    if flavour == "bert":
        return TemplateProcessing(single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
                                  special_tokens=specials)
    if flavour == "xlnet":
        return TemplateProcessing(single=f"$A:0 {sep}:0 {cls}:2", pair=f"$A:0 {sep}:0 $B:1 {sep}:1 {cls}:2",
                                  special_tokens=specials)
    return TemplateProcessing(single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} {sep} $B {sep}", special_tokens=specials)


def framing_backend(tokenizer: Tokenizer, cfg) -> Backend:
    """A copy of the backend whose post-processor is the tokenizer's own (exported and Hugging Face folders
    have one), else the family's."""
    backend = Backend.from_str(tokenizer.json)
    if backend.post_processor is None:
        processor = family_post_processor(tokenizer, family_flavour(cfg))
        if processor is not None:
            backend.post_processor = processor
    return backend

