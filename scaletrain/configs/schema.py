"""Typed configs: the single source of truth. Hydra composes YAML onto these dataclasses; each validates
itself in __post_init__ (first every numeric field against its interval in the class's RANGES, which a test
requires for every int/float field, then the rules between its fields), and `validate_cross_fields` checks
the rules that span several groups before any process group exists. Every failure is a ConfigError with one
line naming the field and the fix."""

from __future__ import annotations

import os

import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional

from scaletrain.errors import ConfigError

FAMILIES = ("gpt", "bert", "encdec", "xlnet")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _choice(name: str, value: Any, allowed: tuple) -> None:
    _check(value in allowed, f"{name}={value!r} is not one of {', '.join(map(str, allowed))}")


_INTERVAL = re.compile(r"^([\[(])\s*(\S+)\s*,\s*(\S+)\s*([\])])$")


def _describe(interval: str) -> str:
    opening, low, high, closing = _INTERVAL.match(interval).groups()
    if high == "inf":
        if (opening, low) in (("(", "0"), ("[", "1")):
            return "positive"
        return f"{'>=' if opening == '[' else '>'} {low}"
    return f"in {interval}"


def check_ranges(config: Any, section: str) -> None:
    """Each field named in type(config).RANGES against its interval, written '[1, inf)', '(0, 1)', ...
    None (an optional field left unset) passes; NaN never does."""
    for name, interval in type(config).RANGES.items():
        value = getattr(config, name)
        if value is None:
            continue
        opening, low, high, closing = _INTERVAL.match(interval).groups()
        low, high = float(low), float(high)
        inside = (low <= value if opening == "[" else low < value) and (value <= high if closing == "]" else value < high)
        key = f"{section}.{name}" if section else name
        _check(inside and not (isinstance(value, float) and math.isnan(value)),
               f"{key}={value} must be {_describe(interval)}")


@dataclass
class ModelConfig:
    """Architecture only; nothing about parallelism. Sizes of the classic table live in configs/model/*.yaml."""

    name: str = "gpt_tiny"
    family: str = "gpt"  # gpt | bert | encdec | xlnet
    vocab_size: int = 50257  # the tokenizer's vocab; the trainer pads it (pad_vocab_multiple x tp)
    d_model: int = 768
    n_layers: int = 12  # decoder-only / encoder-only depth; encoder depth for encdec
    n_decoder_layers: int = 0  # encdec only; 0 means "same as n_layers"
    n_heads: int = 12
    d_head: int = 0  # 0 means d_model // n_heads (T5 sets it explicitly: d_kv)
    d_ff: int = 0  # 0 means 4 * d_model
    max_seq_len: int = 1024  # size of the learned position table (unused for sinusoidal / relative)
    position: str = "learned"  # learned | sinusoidal | relative
    position_offset: int = 0  # RoBERTa/BART position ids start at pad+1 = 2 (HF layout)
    relative_buckets: int = 32
    relative_max_distance: int = 128
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_position: str = "pre"  # pre | post
    norm_eps: float = 1e-5
    activation: str = "gelu"  # gelu | gelu_tanh | relu | gated_gelu | gated_relu
    bias: bool = True
    tie_embeddings: bool = True
    type_vocab_size: int = 0  # BERT 2, RoBERTa 1, others 0
    embedding_norm: bool = False  # LayerNorm after the embedding sum (BERT, BART)
    scale_embeddings: bool = False  # multiply token embeddings by sqrt(d_model) (Transformer, BART opt.)
    final_norm: bool = True
    pooler: bool = False
    nsp_head: bool = False
    num_labels: int = 0  # >0 adds a sequence-classification head
    dropout: float = 0.1
    attn_dropout: float = 0.1
    init_std: float = 0.02
    pad_token_id: int = 0
    pad_vocab_multiple: int = 128
    kernels: str = "auto"  # auto | triton | torch | compile
    attention: str = "auto"  # auto (FlexAttention for masks and biases on CUDA, SDPA elsewhere) | sdpa | flex
    scale_attention: bool = True  # False for T5: its 1/sqrt(d_head) is folded into the init of q_proj
    scale_decoder_output: bool = False  # T5 v1.0: decoder output * d_model**-0.5 before the tied lm_head
    final_logits_bias: bool = False  # BART: a (1, vocab) buffer added to the logits
    positions_from_padding: bool = False  # RoBERTa: position ids count non-pad tokens from pad_token_id + 1
    init_scheme: str = "normal"  # normal (BERT, GPT-1, BART) | gpt2 (scaled residuals) | t5 | xavier (Transformer)
    # XLNet (Transformer-XL relative attention): attn_type bi (bidirectional relative positions) | uni (causal);
    # bi_data: half the batch reads positions backwards; clamp_len > 0 clips relative distances;
    # mem_len: hidden states kept per layer as memory for the next segment (0: all); reuse_len: how many of a
    # segment's first tokens are cached (0: all).
    attn_type: str = "bi"
    bi_data: bool = False
    clamp_len: int = -1
    mem_len: int = 0
    reuse_len: int = 0
    # Table metadata (scaletrain table), not architecture.
    documented_params: Optional[float] = None
    documented_data: str = ""
    documented_training: str = ""
    extra: Dict[str, Any] = field(default_factory=dict)  # family-specific switches (e.g. t5_version)
    # start from these weights (a Hugging Face folder, a run folder or a step-* folder): a fresh optimizer,
    # schedule and data position; the trainer loads them right after materializing the model
    init_from: Optional[str] = None

    RANGES: ClassVar[Dict[str, str]] = {
        "vocab_size": "[1, inf)", "d_model": "[1, inf)", "n_layers": "[1, inf)", "n_decoder_layers": "[0, inf)",
        "n_heads": "[1, inf)", "d_head": "[0, inf)", "d_ff": "[0, inf)", "max_seq_len": "[1, inf)",
        "position_offset": "[0, inf)", "relative_buckets": "[1, inf)", "relative_max_distance": "[1, inf)",
        "norm_eps": "(0, 1)", "type_vocab_size": "[0, inf)", "num_labels": "[0, inf)", "dropout": "[0, 1)",
        "attn_dropout": "[0, 1)", "init_std": "(0, inf)", "pad_token_id": "[0, inf)",
        "pad_vocab_multiple": "[1, inf)", "documented_params": "(0, inf)",
        "clamp_len": "[-1, inf)", "mem_len": "[0, inf)", "reuse_len": "[0, inf)"}  # XLNet; clamp_len -1: off

    def __post_init__(self) -> None:
        check_ranges(self, "model")
        _choice("model.family", self.family, FAMILIES)
        if self.d_head == 0:
            _check(self.d_model % self.n_heads == 0,
                   f"model.n_heads={self.n_heads} does not divide model.d_model={self.d_model}; "
                   f"pick heads that divide the width or set model.d_head")
        _choice("model.position", self.position, ("learned", "sinusoidal", "relative"))
        _choice("model.norm", self.norm, ("layernorm", "rmsnorm"))
        _choice("model.norm_position", self.norm_position, ("pre", "post"))
        _choice("model.activation", self.activation, ("gelu", "gelu_tanh", "relu", "gated_gelu", "gated_relu"))
        _choice("model.kernels", self.kernels, ("auto", "triton", "torch", "compile"))
        _choice("model.attention", self.attention, ("auto", "sdpa", "flex"))
        _choice("model.init_scheme", self.init_scheme, ("normal", "gpt2", "t5", "xavier"))
        _check(self.position != "relative" or self.relative_buckets >= 4,
               f"model.relative_buckets={self.relative_buckets} must be >= 4 with relative positions")
        _check(self.pad_token_id < self.vocab_size,
               f"model.pad_token_id={self.pad_token_id} must be a token id below model.vocab_size={self.vocab_size}")
        _check(not self.nsp_head or self.pooler, "model.nsp_head needs model.pooler=true (NSP reads the pooled [CLS])")
        _check(self.family != "gpt" or not (self.pooler or self.nsp_head),
               "model.pooler/nsp_head are BERT heads; set them false for family gpt")
        _choice("model.attn_type", self.attn_type, ("bi", "uni"))
        if self.family == "xlnet":
            _check(self.norm_position == "post" and self.norm == "layernorm",
                   "family xlnet is post-LN with LayerNorm; set model.norm_position=post and model.norm=layernorm")
            _check(not self.nsp_head, "model.nsp_head is a BERT head; set it false for family xlnet")

    @property
    def head_dim(self) -> int:
        return self.d_head or self.d_model // self.n_heads

    @property
    def ffn_dim(self) -> int:
        return self.d_ff or 4 * self.d_model

    @property
    def decoder_layers(self) -> int:
        return self.n_decoder_layers or self.n_layers

    def padded_vocab_size(self, tp: int = 1) -> int:
        multiple = self.pad_vocab_multiple * tp
        return -(-self.vocab_size // multiple) * multiple


def minimum_tokenizer_vocab(tokenizer_type: str) -> int:
    """The smallest vocabulary data.tokenizer=train builds: byte-level BPE needs its 256 bytes plus the
    specials and some merges; unigram 256 pieces plus T5's 100 sentinels (data/tokenizer.py NUM_SENTINELS)."""
    return 256 + 100 if tokenizer_type == "unigram" else 512


TASKS = ("lm", "classification", "regression")
CLASSIFICATION_METRICS = ("val_accuracy", "val_f1", "val_mcc")
REGRESSION_METRICS = ("val_pearson", "val_spearman")


@dataclass
class DataConfig:
    corpus: str = "builtin"  # builtin | a path, directory or glob of text/jsonl/parquet files
    prepared: str = ""  # a directory written by `scaletrain data prepare`, or a Megatron .bin/.idx prefix
    # A weighted blend of sources: {prepared folder | Megatron prefix | corpus to prepare: weight}; the
    # weights are normalized. Relative keys are looked up under mixture_root. data/mixture.py.
    mixture: Dict[str, float] = field(default_factory=dict)
    mixture_root: str = ""
    format: str = "auto"  # auto | text | jsonl | parquet | hf_disk
    text_field: str = "text"
    split_blank_lines: bool = False  # text files: one document per blank-line block instead of per file
    decode_errors: str = "strict"  # strict | replace
    tokenizer: str = "train"  # train (on the corpus) | a tokenizer.json path | a local HF tokenizer folder
    tokenizer_type: str = "byte_bpe"  # byte_bpe | wordpiece | unigram | bart_bpe
    tokenizer_vocab: int = 8192
    objective: str = "clm"  # clm | mlm | span_bert | t5_span | bart_denoise | plm
    mlm_probability: float = 0.15
    whole_word_mask: bool = False
    dynamic_masking: bool = True
    nsp: bool = False
    noise_density: float = 0.15
    mean_span_length: float = 3.0
    span_geometric_p: float = 0.2  # span_bert: span length in words ~ Geometric(p) clipped at span_max_words
    span_max_words: int = 10
    bart_mask_ratio: float = 0.3  # bart_denoise: share of tokens in Poisson(bart_poisson_lambda) spans
    bart_poisson_lambda: float = 3.0
    bart_permute_sentences: bool = True
    plm_k: int = 6  # plm: 1/plm_k of the tokens are predicted (XLNet's K)
    plm_max_span: int = 5  # plm: predicted spans are 1..plm_max_span tokens long
    cache_dir: str = "~/.cache/scaletrain"
    num_workers: int = 2
    val_fraction: float = 0.02  # documents (or, for a task without validation_files, records) held out
    # Finetuning (data/tasks.py): lm trains `objective` on the corpus; classification | regression train the
    # model's head on labelled records of train_files (a JSONL, CSV/TSV with a header or parquet file, a
    # glob, a saved `datasets` folder, or "builtin": passages of the built-in corpus labelled by their source)
    task: str = "lm"
    train_files: str = ""
    validation_files: str = ""  # "": records of train_files held out by data.val_fraction
    text_pair_field: str = ""  # the second text of a pair (MNLI, QQP, MRPC); "": single texts
    label_field: str = "label"
    # T5 / BART and data.task=classification: train the model to write each record's label word(s) as the
    # decoder's target (text-to-text, scored by exact match) instead of a classification head
    text_to_text: bool = False
    # How a prepared folder's shards are checked when opened: size (a stat per file) | full (every byte
    # read once against the checksums in metadata.json, and every token id against the vocabulary).
    verify: str = "size"
    # `data prepare` closes a shard (a .bin/.idx pair) before it passes this many bytes of tokens, at a
    # document boundary; a split of more tokens gets train-00001.bin, ... beside train.bin (1 GiB).
    max_shard_bytes: int = 1 << 30

    RANGES: ClassVar[Dict[str, str]] = {
        "tokenizer_vocab": "[1, inf)", "max_shard_bytes": "[4, inf)", "mlm_probability": "(0, 1)", "noise_density": "(0, 1)",
        "mean_span_length": "[1, inf)", "span_geometric_p": "(0, 1)", "span_max_words": "[1, inf)",
        "bart_mask_ratio": "(0, 1)", "bart_poisson_lambda": "(0, inf)", "plm_k": "[2, inf)", "plm_max_span": "[1, inf)",
        "num_workers": "[0, inf)",
        "val_fraction": "(0, 0.5)"}

    def __post_init__(self) -> None:
        check_ranges(self, "data")
        _choice("data.format", self.format, ("auto", "text", "jsonl", "parquet", "hf_disk"))
        _choice("data.decode_errors", self.decode_errors, ("strict", "replace"))
        _choice("data.verify", self.verify, ("size", "full"))
        _choice("data.tokenizer_type", self.tokenizer_type, ("byte_bpe", "wordpiece", "unigram", "bart_bpe"))
        _choice("data.objective", self.objective, ("clm", "mlm", "span_bert", "t5_span", "bart_denoise", "plm"))
        _choice("data.task", self.task, TASKS)
        if self.task == "lm":
            _check(not self.train_files and not self.validation_files,
                   "data.train_files / validation_files hold labelled records for data.task=classification or "
                   "regression; set data.task, or point data.corpus at the text for language modelling")
        else:
            _check(bool(self.train_files), f"data.task={self.task} needs labelled records: set data.train_files="
                                           f"<file, glob or datasets folder> (or builtin)")
            _check(not self.mixture and not self.prepared, f"data.task={self.task} reads data.train_files; "
                                                           f"unset data.mixture / data.prepared")
        if self.tokenizer == "train" and not self.prepared:  # known before 25 s of tokenizer training
            minimum = minimum_tokenizer_vocab(self.tokenizer_type)
            _check(self.tokenizer_vocab >= minimum,
                   f"data.tokenizer_vocab={self.tokenizer_vocab} is too small for a {self.tokenizer_type} "
                   f"tokenizer; use at least {minimum}")
        if self.mixture:
            _check(not self.prepared, "data.mixture and data.prepared are both set; list the prepared folder "
                                      "as one of the mixture's sources instead")
            bad = {name: weight for name, weight in self.mixture.items()
                   if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0}
            _check(not bad, f"data.mixture weight {bad} is negative or not a number; give every source a "
                            f"weight >= 0")
            _check(sum(self.mixture.values()) > 0, "data.mixture weights sum to zero; give at least one "
                                                   "source a positive weight")


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | sgd (sgd is for exact-parity tests)
    lr: float = 6e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    momentum: float = 0.0  # sgd only
    schedule: str = "cosine"  # cosine | linear | constant | inverse_sqrt
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    implementation: str = "auto"  # auto (fused on CUDA/CPU, for_loop when TP mixes DTensors and tensors) | fused | foreach | for_loop

    RANGES: ClassVar[Dict[str, str]] = {
        "lr": "(0, inf)", "weight_decay": "[0, inf)", "beta1": "[0, 1)", "beta2": "[0, 1)", "eps": "(0, inf)",
        "momentum": "[0, 1)", "warmup_steps": "[0, inf)", "min_lr_ratio": "[0, 1]"}

    def __post_init__(self) -> None:
        check_ranges(self, "optim")
        _choice("optim.name", self.name, ("adamw", "sgd"))
        _choice("optim.schedule", self.schedule, ("cosine", "linear", "constant", "inverse_sqrt"))
        _choice("optim.implementation", self.implementation, ("auto", "fused", "foreach", "for_loop"))


@dataclass
class ParallelConfig:
    dp_replicate: int = 1
    dp_shard: int = -1  # -1: whatever is left of the world size
    tp: int = 1
    pp: int = 1
    cp: int = 1
    zero: int = 0  # 0 replicated | 1 optimizer state | 2 + grads (FSDP2, no reshard) | 3 fully_shard
    offload: str = "none"  # none | cpu | nvme (nvme: ZeRO-Infinity, parallel.engine=deepspeed only)
    offload_dir: str = ""  # the NVMe folder of offload=nvme
    engine: str = "native"  # native (FSDP2 / DTensor) | deepspeed (parallel/deepspeed.py)
    deepspeed_config: str = ""  # a user's ds_config.json merged into the one built from this config
    sequence_parallel: bool = False
    reduce_dtype: str = "fp32"  # fp32 | param (reduce gradients in the parameter dtype)
    pp_schedule: str = "1f1b"  # gpipe | 1f1b | interleaved_1f1b | looped_bfs | interleaved_zb | zbv | dualpipev
    pp_virtual: int = 1
    pp_split: Optional[List[int]] = None  # explicit first layer index of each stage after the first

    RANGES: ClassVar[Dict[str, str]] = {
        "dp_replicate": "[1, inf)", "dp_shard": "[-1, inf)", "tp": "[1, inf)", "pp": "[1, inf)", "cp": "[1, inf)",
        "zero": "[0, 3]", "pp_virtual": "[1, inf)"}

    def __post_init__(self) -> None:
        check_ranges(self, "parallel")
        _check(self.dp_shard != 0, "parallel.dp_shard must be >= 1 or -1 (auto)")
        _choice("parallel.offload", self.offload, ("none", "cpu", "nvme"))
        _choice("parallel.engine", self.engine, ("native", "deepspeed"))
        if self.engine == "deepspeed":
            from scaletrain.parallel.deepspeed import check_layout  # the engine's own rules

            check_layout(self)
        else:
            _check(self.offload != "nvme", "parallel.offload=nvme (ZeRO-Infinity) runs under DeepSpeed only; set "
                   "parallel.engine=deepspeed or parallel.offload=cpu")
            _check(not self.deepspeed_config, f"parallel.deepspeed_config={self.deepspeed_config} is read only by "
                   f"the DeepSpeed engine; set parallel.engine=deepspeed or drop parallel.deepspeed_config")
        _check(self.offload == "nvme" or not self.offload_dir, f"parallel.offload_dir={self.offload_dir} is the "
               f"folder of parallel.offload=nvme but offload is {self.offload}; set offload=nvme or drop offload_dir")
        _choice("parallel.reduce_dtype", self.reduce_dtype, ("fp32", "param"))
        _choice("parallel.pp_schedule", self.pp_schedule,
                ("gpipe", "1f1b", "interleaved_1f1b", "looped_bfs", "interleaved_zb", "zbv", "dualpipev"))
        _check(self.pp_schedule not in ("gpipe", "1f1b") or self.pp_virtual == 1,
               f"parallel.pp_schedule={self.pp_schedule} runs one stage per rank but parallel.pp_virtual="
               f"{self.pp_virtual}; set pp_virtual=1 or pick interleaved_1f1b / looped_bfs / interleaved_zb")
        _check(self.pp_schedule not in ("zbv", "dualpipev") or self.pp_virtual == 2,
               f"parallel.pp_schedule={self.pp_schedule} needs exactly 2 virtual stages per rank; "
               f"set parallel.pp_virtual=2 (it is {self.pp_virtual})")
        if self.pp_split is not None:  # the upper end needs the model: validate_cross_fields
            check_pp_split(self, None)


DEEPSPEED_EXTRA = "pip install -e '.[deepspeed]'"


def check_pp_split(parallel: ParallelConfig, n_layers: Optional[int]) -> None:
    """parallel.pp_split lists the first layer of each stage after the first: pp x pp_virtual - 1 strictly
    increasing indices in (0, n_layers)."""
    stages, split = parallel.pp * parallel.pp_virtual, list(parallel.pp_split)
    top = n_layers if n_layers is not None else math.inf
    _check(len(split) == stages - 1 and all(a < b for a, b in zip([0] + split, split + [top])),
           f"parallel.pp_split={split} must list {stages - 1} strictly increasing first-layer indices in "
           f"(0, {n_layers if n_layers is not None else 'layers'}) for pp x pp_virtual = {stages} stages"
           + (f" over {n_layers} layers" if n_layers is not None else "") + "; fix the list or set it to null")


@dataclass
class TrainerConfig:
    max_steps: int = 300
    max_tokens: int = 0  # 0: no token limit; otherwise stop at whichever limit comes first
    global_batch: int = 16  # sequences per optimizer step, across all data-parallel ranks
    micro_batch: int = 8  # sequences per forward pass on one rank
    seq_len: int = 128
    eval_every: int = 100
    eval_batches: int = 8  # LM objectives; a data.task evaluation scores every validation record
    # few-shot task files (evaluation/fewshot.py) scored at every evaluation: task/<name>/acc, ... (GPT)
    eval_tasks: List[str] = field(default_factory=list)
    eval_shots: int = 0  # demonstrations per prompt, drawn from the task file itself
    log_every: int = 10
    grad_clip: float = 1.0
    activation_checkpointing: str = "none"  # none | full | selective
    loss_scale_init: float = 2.0**16  # fp16 only
    loss_scale_growth_interval: int = 1000  # clean steps before the fp16 scale doubles
    max_nonfinite_steps: int = 5  # consecutive NaN/Inf losses before the run stops
    sample_tokens: int = 48  # length of the sample printed at the end (decoder families)
    progress_bar: bool = True

    RANGES: ClassVar[Dict[str, str]] = {
        "max_steps": "[0, inf)", "max_tokens": "[0, inf)", "global_batch": "[1, inf)", "micro_batch": "[1, inf)",
        "seq_len": "[1, inf)", "eval_every": "[0, inf)", "eval_batches": "[1, inf)", "eval_shots": "[0, inf)", "log_every": "[1, inf)",
        "grad_clip": "[0, inf]", "loss_scale_init": "(0, inf)", "loss_scale_growth_interval": "[1, inf)",
        "max_nonfinite_steps": "[1, inf)", "sample_tokens": "[0, inf)"}

    def __post_init__(self) -> None:
        check_ranges(self, "trainer")
        _check(self.max_steps > 0 or self.max_tokens > 0, "set trainer.max_steps or trainer.max_tokens")
        _choice("trainer.activation_checkpointing", self.activation_checkpointing, ("none", "full", "selective"))


@dataclass
class CheckpointConfig:
    every: int = 100  # steps between saves; 0 disables periodic saves (a final save still happens)
    keep: int = 3  # the last K complete checkpoints are kept
    keep_every: int = 0  # ...plus every Mth step forever (0: none)
    async_save: bool = False
    save_final: bool = True
    export_hf: bool = False  # the final checkpoint also as a Hugging Face folder, <run_dir>/hf/step-N
    # ...plus the checkpoint with the best value of this validation metric (val_loss: lowest; the others:
    # highest); an evaluation that improves it saves one. "": off
    keep_best: str = ""

    RANGES: ClassVar[Dict[str, str]] = {"every": "[0, inf)", "keep": "[1, inf)", "keep_every": "[0, inf)"}

    def __post_init__(self) -> None:
        check_ranges(self, "checkpoint")
        if self.export_hf and not self.save_final:
            raise ConfigError("checkpoint.export_hf=true exports the final checkpoint, which "
                              "checkpoint.save_final=false skips; set checkpoint.save_final=true")
        _choice("checkpoint.keep_best", self.keep_best, ("", "val_loss") + CLASSIFICATION_METRICS + REGRESSION_METRICS)


@dataclass
class LaunchConfig:
    name: str = "local"  # local (this process, or nproc_per_node elastic workers) | torchrun (print) | slurm
    nproc_per_node: int = 1
    max_restarts: int = 0  # local: the elastic agent restarts all workers this many times after a failure
    nodes: int = 1
    gpus_per_node: int = 0  # 0: CPU tasks (one per cpus_per_task)
    tasks_per_node: int = 0  # 0: gpus_per_node, or 1 on CPU
    cpus_per_task: int = 1
    partition: str = ""  # "" = the cluster's default partition
    account: str = ""
    time: str = "01:00:00"  # Slurm time limit: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS
    signal_grace_s: int = 120  # USR1 this long before the time limit: the trainer saves and requeues
    requeue: bool = True
    dependency_chain: int = 1  # K chained jobs (afterany), for runs longer than one time limit
    seconds_per_step: float = 1.0  # estimate used to check that a job reaches its first checkpoint
    job_name: str = "scaletrain"
    extra_sbatch: List[str] = field(default_factory=list)  # more "#SBATCH" lines, e.g. "--qos=high"

    RANGES: ClassVar[Dict[str, str]] = {
        "nproc_per_node": "[1, inf)", "max_restarts": "[0, inf)", "nodes": "[1, inf)", "gpus_per_node": "[0, inf)",
        "tasks_per_node": "[0, inf)", "cpus_per_task": "[1, inf)", "signal_grace_s": "[0, 65535]",  # Slurm's limit
        "dependency_chain": "[1, inf)", "seconds_per_step": "(0, inf)"}

    def __post_init__(self) -> None:
        check_ranges(self, "launcher")
        _choice("launcher.name", self.name, ("local", "torchrun", "slurm"))

    @property
    def slurm_tasks_per_node(self) -> int:
        """One task per GPU, or per CPU slot on CPU nodes."""
        return self.tasks_per_node or self.gpus_per_node or 1


@dataclass
class ClusterConfig:
    """One node type: what the trainer (MFU) and the planner need. GPU presets quote NVIDIA's data sheets."""

    name: str = "cpu_local"
    device: str = "cpu"  # cpu | cuda
    accelerator: str = "CPU"
    gpus_per_node: int = 0
    memory_gb: float = 24.0  # per device
    peak_tflops_bf16: float = 0.0  # dense (no 2:4 sparsity); 0 = not supported
    peak_tflops_fp16: float = 0.0
    peak_tflops_fp32: float = 0.2  # measured-order figure for a 2-core CPU; MFU on CPU is indicative only
    intra_node_gbps: float = 10.0  # GB/s per device, one direction, NVLink on GPU nodes
    inter_node_gbps: float = 1.0  # GB/s per device, one direction, InfiniBand on GPU clusters
    default_precision: str = "fp32"

    RANGES: ClassVar[Dict[str, str]] = {
        "gpus_per_node": "[0, inf)", "memory_gb": "(0, inf)", "peak_tflops_bf16": "[0, inf)",
        "peak_tflops_fp16": "[0, inf)", "peak_tflops_fp32": "(0, inf)", "intra_node_gbps": "(0, inf)",
        "inter_node_gbps": "(0, inf)"}

    def __post_init__(self) -> None:
        check_ranges(self, "cluster")
        _choice("cluster.device", self.device, ("cpu", "cuda"))
        _choice("cluster.default_precision", self.default_precision, ("fp32", "bf16", "fp16"))
        _check(self.peak_tflops(self.default_precision) > 0,
               f"cluster {self.name}: default_precision={self.default_precision} has no peak FLOP/s; set it")

    def peak_tflops(self, precision: str) -> float:
        return {"bf16": self.peak_tflops_bf16, "fp16": self.peak_tflops_fp16}.get(precision, self.peak_tflops_fp32)


@dataclass
class DryRunConfig:
    world_size: int = 0  # > 0: build rank `rank`'s shard on meta under a fake process group, report, exit
    rank: int = 0

    RANGES: ClassVar[Dict[str, str]] = {"world_size": "[0, inf)", "rank": "[0, inf)"}

    def __post_init__(self) -> None:
        check_ranges(self, "dry_run")
        _check(self.rank < max(self.world_size, 1),
               f"dry_run.rank={self.rank} must be in [0, dry_run.world_size={self.world_size})")


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    launcher: LaunchConfig = field(default_factory=LaunchConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    dry_run: DryRunConfig = field(default_factory=DryRunConfig)
    seed: int = 1234
    precision: str = "fp32"  # fp32 | bf16 | fp16
    resume: str = "auto"  # auto | none | a checkpoint directory
    run_dir: str = "."  # Hydra sets the working directory; checkpoints and metrics go below it
    logger: str = "jsonl"  # jsonl | wandb (always writes JSONL too)

    RANGES: ClassVar[Dict[str, str]] = {"seed": "[0, 4294967295]"}  # numpy's seed range

    def __post_init__(self) -> None:
        check_ranges(self, "")
        _choice("precision", self.precision, ("fp32", "bf16", "fp16"))
        _choice("logger", self.logger, ("jsonl", "wandb"))


def missing_resume_message(resume: str) -> str:
    return (f"resume={resume}: the path does not exist; pass a step-* checkpoint folder or a run folder, "
            f"resume=auto or resume=none")


def data_parallel_degree(parallel: ParallelConfig, world_size: int) -> int:
    """dp_replicate * dp_shard, resolving dp_shard=-1 to whatever the world size leaves."""
    others = parallel.dp_replicate * parallel.tp * parallel.pp * parallel.cp
    dp_shard = parallel.dp_shard if parallel.dp_shard != -1 else max(world_size // others, 1)
    return parallel.dp_replicate * dp_shard


def validate_cross_fields(cfg: TrainConfig, world_size: int) -> None:
    """Rules that span config groups. Called before any process group or model exists."""
    p, m, t = cfg.parallel, cfg.model, cfg.trainer
    dp = data_parallel_degree(p, world_size)
    product = dp * p.tp * p.pp * p.cp
    _check(product == world_size,
           f"parallel degrees dp_replicate x dp_shard x tp x pp x cp = {product} but the world size is "
           f"{world_size}; change the degrees or the number of processes")
    _check(p.tp <= m.n_heads, f"parallel.tp={p.tp} is larger than model.n_heads={m.n_heads}; lower tp")
    _check(m.n_heads % p.tp == 0, f"model.n_heads={m.n_heads} is not divisible by parallel.tp={p.tp}")
    _check(m.ffn_dim % p.tp == 0, f"the FFN width {m.ffn_dim} is not divisible by parallel.tp={p.tp}")
    if p.sequence_parallel:
        _check(t.seq_len % p.tp == 0,
               f"trainer.seq_len={t.seq_len} is not divisible by parallel.tp={p.tp} (sequence parallel is on)")
    # A dry run builds one rank's shards and never reads a batch, so it accepts any batch size.
    _check(cfg.dry_run.world_size > 0 or t.global_batch % (t.micro_batch * dp) == 0,
           f"trainer.global_batch={t.global_batch} is not divisible by trainer.micro_batch x dp = "
           f"{t.micro_batch} x {dp}; change global_batch or micro_batch")
    layers = m.n_layers + (m.decoder_layers if m.family == "encdec" else 0)
    stages = p.pp * p.pp_virtual
    _check(p.pp_split is not None or layers >= stages,
           f"{layers} layers cannot fill parallel.pp x pp_virtual = {stages} stages; lower pp or pp_virtual")
    _check(m.attention != "flex" or cfg.cluster.device != "cpu" or cfg.dry_run.world_size > 0,
           "model.attention=flex cannot train on the CPU (torch's FlexAttention has no CPU backward); use "
           "model.attention=auto or sdpa")
    if p.pp_split is not None:
        check_pp_split(p, layers)
    _check(p.pp == 1 or (m.num_labels == 0 and cfg.data.task == "lm"), "pipeline parallelism trains the LM "
           "objectives; finetuning (data.task=classification|regression, model.num_labels > 0) needs parallel.pp=1")
    _check_task(cfg)
    _check_eval_tasks(cfg)
    if p.engine == "deepspeed":
        from scaletrain.parallel.deepspeed import check_run

        check_run(cfg, dp)
    if m.family == "xlnet":
        _check(not (m.bi_data and t.micro_batch % 2), f"model.bi_data reads half of each micro-batch backwards; "
               f"trainer.micro_batch={t.micro_batch} must be even")
        _check(not p.sequence_parallel, "parallel.sequence_parallel is not supported for family xlnet; set it false")
        _check(p.pp == 1 or m.mem_len == 0, f"model.mem_len={m.mem_len}: pipeline stages carry no segment memory "
               "(training runs independent segments); set model.mem_len=0 or parallel.pp=1")
    if m.position == "learned":
        _check(t.seq_len <= m.max_seq_len,
               f"trainer.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}; lower seq_len")


def _check_eval_tasks(cfg: TrainConfig) -> None:
    tasks, p, family = cfg.trainer.eval_tasks, cfg.parallel, cfg.model.family
    if not tasks:
        return
    _check(family in ("gpt", "bert", "encdec") and cfg.data.task == "lm", "trainer.eval_tasks scores a pretrained "
           f"GPT, BERT (cloze) or T5 / BART (data.task=lm); this run is family {family}, data.task={cfg.data.task}"
           + (" (XLNet's permutation LM has no few-shot scoring here)" if family == "xlnet" else ""))
    _check(p.pp == 1 or family == "gpt", f"trainer.eval_tasks under pipeline parallelism (parallel.pp={p.pp}) "
           f"scores a GPT only; for family {family} set parallel.pp=1 or evaluate the checkpoints with scaletrain eval")
    _check(cfg.trainer.eval_every > 0, "trainer.eval_tasks runs at evaluations; set trainer.eval_every > 0")
    from scaletrain.evaluation.fewshot import read_task  # bad task files fail here, before any worker starts

    for path in tasks:
        _check(os.path.isfile(os.path.expanduser(path)), f"trainer.eval_tasks: {path} is not a file; give JSONL "
               f"task files (context, choices, answer)")
        generation = read_task(path)[0].choices is None
        _check(not generation or family == "gpt", f"trainer.eval_tasks: {path} is a generation task; family "
               f"{family} scores multiple-choice tasks only (give records with \"choices\")")
        _check(not generation or p.pp == 1, f"trainer.eval_tasks: {path} is a generation task, which parallel.pp="
               f"{p.pp} does not decode (greedy decoding runs one token per forward, and the schedule runs fixed-"
               f"shape batches of every micro-batch at once); keep multiple-choice tasks or set parallel.pp=1")


def _check_task(cfg: TrainConfig) -> None:
    task, best = cfg.data.task, cfg.checkpoint.keep_best
    _check(not cfg.data.text_to_text or (task == "classification" and cfg.model.family == "encdec"),
           f"data.text_to_text=true trains a T5 / BART to write the label words; it needs data.task=classification "
           f"and an encoder-decoder model (this run: data.task={task}, family {cfg.model.family})")
    _check(not cfg.data.text_to_text or cfg.model.num_labels == 0, f"data.text_to_text=true has no classification "
           f"head; set model.num_labels=0 (it is {cfg.model.num_labels})")
    _check(task != "regression" or cfg.model.num_labels in (0, 1), f"data.task=regression predicts one number "
           f"but model.num_labels={cfg.model.num_labels}; set model.num_labels=1 (or 0)")
    wanted = {"classification": CLASSIFICATION_METRICS, "regression": REGRESSION_METRICS}.get(task, ())
    _check(best in ("", "val_loss") or best in wanted, f"checkpoint.keep_best={best} is not a metric of "
           f"data.task={task}; use val_loss" + "".join(f" or {name}" for name in wanted))
    _check(not best or cfg.trainer.eval_every > 0, f"checkpoint.keep_best={best} needs evaluations; set "
           f"trainer.eval_every > 0")

