"""Hugging Face folders in and out: what `scaletrain export`, `model.init_from` and `inference.load_model`
read and write. The tensor mapping itself lives in models/hf.py; this module is about files.

    <folder>/config.json  generation_config.json
             model.safetensors  (or model-00001-of-00003.safetensors ... + model.safetensors.index.json)
             tokenizer.json  tokenizer_config.json  special_tokens_map.json

Weights are read lazily: safetensors files are memory-mapped and one tensor (or one slice of it) is read
at a time, so a rank that holds a shard never holds the whole model."""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from scaletrain.configs.schema import ModelConfig
from scaletrain.data.tokenizer import family_flavour, family_post_processor
from scaletrain.errors import CheckpointError
from scaletrain.models import hf

log = logging.getLogger(__name__)

CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_BIN = "pytorch_model.bin"
WEIGHT_FILES = (SAFETENSORS, SAFETENSORS_INDEX, PYTORCH_BIN)
# model_type -> the class a folder without a usable `architectures` entry is read as
MODEL_TYPE_CLASS = {"gpt2": "GPT2LMHeadModel", "openai-gpt": "OpenAIGPTLMHeadModel", "bert": "BertForMaskedLM",
                    "roberta": "RobertaForMaskedLM", "t5": "T5ForConditionalGeneration",
                    "bart": "BartForConditionalGeneration"}
# the prefix a class's backbone keys carry; a folder saved from the bare backbone (BertModel) lacks it
BASE_PREFIX = {"GPT2LMHeadModel": "transformer.", "OpenAIGPTLMHeadModel": "transformer.", "BertForMaskedLM": "bert.",
               "BertForPreTraining": "bert.", "RobertaForMaskedLM": "roberta.", "BartForConditionalGeneration": "model."}


# the token table of the classes that may hold an untied head
TOKEN_TABLE = {"GPT2LMHeadModel": "transformer.wte.weight", "T5ForConditionalGeneration": "shared.weight"}


def is_hf_folder(path: Path) -> bool:
    return (path / CONFIG).is_file() and any((path / name).is_file() for name in WEIGHT_FILES)


class HFWeights:
    """The tensors of a Hugging Face folder by key, read on demand: `get(key)`, `get_slice(key, slices)`."""

    def __init__(self, folder: Path, prefix: str = ""):
        self.folder = folder
        self._files: dict[str, str] = {}  # key -> file
        self._open: dict[str, object] = {}
        self._bin: Optional[dict] = None
        self.bytes_read = 0  # tensor bytes taken from the files so far (init_from's memory test reads it)
        if (folder / SAFETENSORS_INDEX).is_file():
            self._files = dict(json.loads((folder / SAFETENSORS_INDEX).read_text())["weight_map"])
        elif (folder / SAFETENSORS).is_file():
            self._files = {key: SAFETENSORS for key in self._handle(SAFETENSORS).keys()}
        else:  # a legacy pickle: memory-mapped, so still read tensor by tensor
            self._bin = torch.load(folder / PYTORCH_BIN, map_location="cpu", mmap=True, weights_only=True)
            self._files = {key: PYTORCH_BIN for key in self._bin}
        self.use_prefix(prefix)

    def use_prefix(self, prefix: str) -> None:
        """Name a bare backbone's keys as the class does (BertModel's `embeddings...` -> `bert.embeddings...`)."""
        self.prefix = prefix if prefix and not any(k.startswith(prefix) for k in self._files) else ""
        self._keys = {self.prefix + key for key in self._files}

    def _handle(self, file: str):
        if file not in self._open:
            from safetensors import safe_open

            path = self.folder / file
            if not path.is_file():
                raise CheckpointError(f"{self.folder}: {file} is listed in {SAFETENSORS_INDEX} but missing")
            self._open[file] = safe_open(str(path), framework="pt", device="cpu")
        return self._open[file]

    def keys(self) -> set[str]:
        """Keys as the class names them (a bare backbone's keys get the class's prefix)."""
        return self._keys

    def _stored(self, key: str) -> str:
        return key[len(self.prefix):] if self.prefix and key.startswith(self.prefix) else key

    def get(self, key: str) -> torch.Tensor:
        stored = self._stored(key)
        tensor = self._bin[stored] if self._bin is not None else self._handle(self._files[stored]).get_tensor(stored)
        self.bytes_read += tensor.nbytes
        return tensor

    def shape(self, key: str) -> tuple[int, ...]:
        stored = self._stored(key)
        if self._bin is not None:
            return tuple(self._bin[stored].shape)
        return tuple(self._handle(self._files[stored]).get_slice(stored).get_shape())

    def get_slice(self, key: str, slices: tuple[slice, ...]) -> torch.Tensor:
        """Only the rows/columns asked for are read from disk."""
        stored = self._stored(key)
        if self._bin is not None:
            tensor = self._bin[stored][slices]
        else:
            tensor = self._handle(self._files[stored]).get_slice(stored)[slices]
        self.bytes_read += tensor.nbytes
        return tensor


@dataclass
class HFSource:
    folder: Path
    hf_class: str
    hf_config: object  # transformers.PretrainedConfig
    model_cfg: ModelConfig
    weights: HFWeights


def _hf_class(hf_config, keys: set[str], folder: Path) -> str:
    for name in getattr(hf_config, "architectures", None) or []:
        if name in hf.ADAPTERS:
            return name
    model_type = getattr(hf_config, "model_type", "")
    if model_type not in MODEL_TYPE_CLASS:
        raise hf.UnsupportedHFModel(f"{folder}: model_type {model_type!r} is not supported; supported: "
                                    f"{', '.join(MODEL_TYPE_CLASS)}")
    if model_type == "bert" and any(key.endswith("cls.seq_relationship.weight") for key in keys):
        return "BertForPreTraining"
    return MODEL_TYPE_CLASS[model_type]


def _head_is_tied(weights: HFWeights, hf_class: str) -> bool:
    """Tied unless the folder holds a separate output projection that differs from the token table (some
    savers write the tied copy out too)."""
    head = hf.untied_head_key(hf_class)
    if head is None or head not in weights.keys():
        return True
    return torch.equal(weights.get(head), weights.get(TOKEN_TABLE[hf_class]))


def read_hf_folder(folder: str | Path) -> HFSource:
    """config.json + weights of a local Hugging Face folder -> our config and a lazy reader. Never touches
    the network."""
    import transformers

    folder = Path(folder).expanduser()
    if not is_hf_folder(folder):
        raise CheckpointError(f"{folder} is not a Hugging Face model folder (needs {CONFIG} and one of "
                              f"{', '.join(WEIGHT_FILES)})")
    try:
        hf_config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise CheckpointError(f"{folder}/{CONFIG} could not be read ({str(error).splitlines()[0]})") from None
    weights = HFWeights(folder)
    hf_class = _hf_class(hf_config, weights.keys(), folder)
    weights.use_prefix(BASE_PREFIX.get(hf_class, ""))
    model_cfg = hf.config_from_hf(hf_config, hf_class, _head_is_tied(weights, hf_class))
    return HFSource(folder, hf_class, hf_config, model_cfg, weights)


def full_state_from_hf(source: HFSource) -> dict[str, torch.Tensor]:
    """Every tensor of our model from the folder (one process: inference, tests)."""
    return hf.state_from_hf(source.model_cfg, source.hf_class, source.weights.keys(), source.weights.get)


# ------------------------------------------------------------------------------------------- export

# the tokenizer roles a family's Hugging Face tokenizer names (BERT has no bos/eos, GPT-2 no cls/sep/mask)
HF_TOKEN_ROLES = {"gpt": ("bos", "eos", "unk", "pad"), "bert": ("unk", "sep", "pad", "cls", "mask"),
                  "t5": ("eos", "unk", "pad"), "bart": ("bos", "eos", "unk", "pad", "cls", "sep", "mask"),
                  "roberta": ("bos", "eos", "unk", "pad", "cls", "sep", "mask"),
                  "xlnet": ("bos", "eos", "unk", "pad", "cls", "sep", "mask")}
# XLNet reads its summary from the last position (<cls>), so its tokenizer pads on the left
PADDING_SIDE = {"xlnet": "left"}


def hf_tokenizer(tokenizer, cfg: ModelConfig, model_max_length: int):
    """Our tokenizer as a transformers fast tokenizer with the family's special tokens and post-processor."""
    import transformers
    from tokenizers import Tokenizer as Backend

    flavour = family_flavour(cfg)
    backend = Backend.from_str(tokenizer.json)
    processor = family_post_processor(tokenizer, flavour)
    if processor is not None:
        backend.post_processor = processor
    specials = {f"{role}_token": tokenizer.role_token(role) for role in HF_TOKEN_ROLES[flavour]
                if tokenizer.role_id(role) is not None}
    # BERT and XLNet read segment ids (a pair's second text, XLNet's <cls>): the tokenizer must return them
    if flavour in ("bert", "xlnet") and (flavour == "xlnet" or cfg.type_vocab_size > 1):
        specials["model_input_names"] = ["input_ids", "token_type_ids", "attention_mask"]
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=model_max_length,
                                                padding_side=PADDING_SIDE.get(flavour, "right"), **specials)


def _set_special_token_ids(hf_model, tokenizer, cfg: ModelConfig) -> None:
    """config.json and generation_config.json name the run's special tokens (and the decoder's start)."""
    from transformers import GenerationConfig

    flavour, config = family_flavour(cfg), hf_model.config
    for role in ("bos", "eos", "mask"):
        if role in HF_TOKEN_ROLES[flavour] and tokenizer.role_id(role) is not None:
            setattr(config, f"{role}_token_id", tokenizer.role_id(role))
    if flavour == "gpt":  # GPT-2 pads with end-of-text only when generating; a classifier finds its last token by it
        config.pad_token_id = tokenizer.pad_id if cfg.num_labels else None
    if flavour == "t5":  # the t5_span objective starts the decoder with pad, bart_denoise with eos
        config.decoder_start_token_id = cfg.pad_token_id
    if flavour == "bart":
        config.decoder_start_token_id = config.eos_token_id
        config.forced_eos_token_id = config.eos_token_id
    generation = GenerationConfig.from_model_config(config)
    if generation.pad_token_id is None and config.eos_token_id is not None:
        generation.pad_token_id = config.eos_token_id
    hf_model.generation_config = generation


def write_hf_folder(model, tokenizer, out: str | Path, model_max_length: int, max_shard_size: str = "5GB",
                    dtype: Optional[torch.dtype] = None, id2label: Optional[dict[int, str]] = None) -> Path:
    """Our (single-process) model + tokenizer -> a Hugging Face folder, written next to `out` and renamed into
    place, so a failed export never leaves a half folder under that name. `id2label`: a classifier's label
    names (a finetuning checkpoint's labels.json)."""
    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"--out {out} exists and is not empty; choose a new folder (nothing was written)")
    hf_model = hf.to_hf_model(model)
    if dtype is not None:
        hf_model.to(dtype)
    if id2label and len(id2label) == model.cfg.num_labels:  # regression keeps transformers' default LABEL_0
        hf_model.config.id2label = dict(id2label)
        hf_model.config.label2id = {name: i for i, name in id2label.items()}
    _set_special_token_ids(hf_model, tokenizer, model.cfg)
    partial = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    hf_model.save_pretrained(str(partial), max_shard_size=max_shard_size)
    hf_tokenizer(tokenizer, model.cfg, model_max_length).save_pretrained(str(partial))
    _write_special_tokens_map(partial)
    if out.exists():
        out.rmdir()  # empty (checked above): rename cannot replace a directory on every platform
    os.replace(partial, out)
    return out


def _write_special_tokens_map(folder: Path) -> None:
    """transformers 5 keeps the special tokens in tokenizer_config.json only; older readers and tools look
    for special_tokens_map.json too."""
    path = folder / "special_tokens_map.json"
    if path.exists():
        return
    config = json.loads((folder / "tokenizer_config.json").read_text())
    tokens = {key: value for key, value in config.items() if key.endswith("_token") and value is not None}
    path.write_text(json.dumps(tokens, indent=2) + "\n")
