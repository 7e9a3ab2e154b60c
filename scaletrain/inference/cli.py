"""`scaletrain generate` and `scaletrain fill-mask`: text in, text out, from a run folder (its latest complete
checkpoint), a checkpoint step-* folder or a Hugging Face folder, loaded by inference.load_model; on the CPU
by default, on one GPU with --device cuda. Tokens around the input are those the objective trained with,
as `scaletrain export` writes them into the tokenizer: [CLS] .. [SEP] (BERT), <s> .. </s> (RoBERTa, BART),
.. </s> (T5), nothing for GPT."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from scaletrain.cli import ArgumentParser
from scaletrain.errors import InputError

MASK_SPELLINGS = ("[MASK]", "<mask>")  # either is accepted whatever the tokenizer's own mask token is


def input_encoder(loaded) -> Callable[[str], list[int]]:
    """text -> ids through the tokenizer's own post-processor (exported and Hugging Face folders have one),
    else the family's, built as export builds it."""
    return framed_encoder(loaded.tokenizer, loaded.model_cfg)


def framed_encoder(tokenizer, model_cfg) -> Callable[[str], list[int]]:
    from scaletrain.data.tokenizer import framing_backend

    backend = framing_backend(tokenizer, model_cfg)
    return lambda text: backend.encode(text, add_special_tokens=True).ids


def _first(value):
    return value[0] if isinstance(value, list) else value


def special_token_ids(loaded) -> dict:
    """eos, pad and decoder start: from a Hugging Face folder's config.json and generation_config.json (which
    wins), else the ones the run trained with (t5_span starts the decoder with pad, bart_denoise with eos)."""
    tokenizer, cfg = loaded.tokenizer, loaded.model_cfg
    if loaded.hf_class is not None:
        values = {}
        for name in ("config.json", "generation_config.json"):
            path = Path(loaded.source) / name
            if path.is_file():
                values.update({k: v for k, v in json.loads(path.read_text()).items() if v is not None})
        eos = _first(values.get("eos_token_id"))
        return dict(eos_token_id=eos, pad_token_id=_first(values.get("pad_token_id", eos if eos is not None else 0)),
                    decoder_start_token_id=_first(values.get("decoder_start_token_id")))
    from scaletrain.checkpoint.manager import read_manifest

    objective = None if cfg.family == "gpt" else read_manifest(loaded.source).get("config", {}).get("data", {}).get(
        "objective")
    return trained_special_ids(tokenizer, cfg, objective)


def trained_special_ids(tokenizer, cfg, objective) -> dict:
    """eos, pad and decoder start of a model trained here with data.objective `objective` (None: unknown)."""
    if cfg.family == "gpt":
        eos = tokenizer.role_id("eod")
        return dict(eos_token_id=eos, pad_token_id=tokenizer.pad_id if eos is not None else cfg.pad_token_id,
                    decoder_start_token_id=None)
    eos = tokenizer.role_id("eos")
    start = cfg.pad_token_id if objective == "t5_span" or (objective is None and cfg.position == "relative") else eos
    return dict(eos_token_id=eos, pad_token_id=cfg.pad_token_id, decoder_start_token_id=start)


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.backend.decode(ids, skip_special_tokens=True)


# ------------------------------------------------------------------------------------------- generate

def _generation_config(args, special: dict):
    from scaletrain.inference.generate import GenerationConfig

    filters = args.top_k is not None or args.top_p is not None
    if args.temperature == 0 and filters:
        raise InputError("--temperature 0 is greedy decoding; drop --top-k / --top-p, or give a temperature > 0")
    sample = (args.temperature is not None and args.temperature != 0) or filters
    return GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=sample,
                            temperature=args.temperature if sample and args.temperature else 1.0,
                            top_k=args.top_k or 0, top_p=args.top_p if args.top_p is not None else 1.0,
                            num_beams=args.num_beams, seed=args.seed, use_cache=not args.no_cache, **special)


def _read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts is not None:
        path = Path(args.prompts).expanduser()
        if not path.is_file():
            raise InputError(f"--prompts {args.prompts} is not a file; give a text file with one prompt per line")
        prompts += [line for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise InputError("no prompt given; pass --prompt TEXT (repeatable) or --prompts FILE (one per line)")
    return prompts


def generate_cli(argv: list[str]) -> int:
    parser = ArgumentParser(prog="scaletrain generate", description="Generate text from a checkpoint or a Hugging "
                            "Face folder (greedy unless --temperature/--top-k/--top-p).")
    parser.add_argument("path", help="a run folder, a checkpoint step-* folder or a Hugging Face folder")
    parser.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    parser.add_argument("--prompts", help="a text file with one prompt per line")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=None, help="sample at this temperature (0: greedy)")
    parser.add_argument("--top-k", type=int, default=None, help="sample from the k most probable tokens")
    parser.add_argument("--top-p", type=float, default=None, help="sample from the smallest set reaching p")
    parser.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (left-padded)")
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole prefix every step")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = parser.parse_args(argv)
    prompts = _read_prompts(args)
    if args.batch_size < 1:
        raise InputError(f"--batch-size={args.batch_size} must be at least 1")

    from scaletrain.inference.generate import generate
    from scaletrain.inference.load import load_model

    loaded = load_model(args.path, args.device)
    if loaded.family == "bert":
        raise InputError("a BERT / RoBERTa (masked LM) does not generate text; use scaletrain fill-mask")
    special = special_token_ids(loaded)
    cfg = _generation_config(args, special)
    encode = input_encoder(loaded)
    encoded = [encode(prompt) for prompt in prompts]
    outputs = []
    for start in range(0, len(encoded), args.batch_size):
        outputs += generate(loaded.model, encoded[start:start + args.batch_size], cfg)
    for index, (prompt, tokens) in enumerate(zip(prompts, outputs), start=1):
        if tokens and tokens[-1] == cfg.eos_token_id:
            tokens = tokens[:-1]
        print(f"[{index}] {prompt}")
        print(f"  -> {_decode(loaded.tokenizer, tokens)}")
    return 0


# ------------------------------------------------------------------------------------------ fill-mask

def _with_own_mask(text: str, mask_token: str) -> str:
    for spelling in MASK_SPELLINGS:
        if spelling != mask_token:
            text = text.replace(spelling, mask_token)
    return text


def format_fillers(text: str, fillers: list[list[tuple[str, float]]]) -> str:
    """The lecture's table: one block per mask, rank / token / probability."""
    lines = [text]
    width = max([len(token) for block in fillers for token, _ in block] + [5])
    for number, block in enumerate(fillers, start=1):
        lines.append(f"mask {number} of {len(fillers)}:" if len(fillers) > 1 else "")
        lines.append(f"  {'rank':>4}  {'token':<{width}}  probability")
        lines += [f"  {rank:>4}  {token:<{width}}  {probability:.4f}"
                  for rank, (token, probability) in enumerate(block, start=1)]
    return "\n".join(line for line in lines if line)


def fill_mask_cli(argv: list[str]) -> int:
    parser = ArgumentParser(prog="scaletrain fill-mask",
                            description="Fill the [MASK] tokens of a text with a masked language model.")
    parser.add_argument("path", help="a run folder, a checkpoint step-* folder or a Hugging Face folder")
    parser.add_argument("text", help='text with one or more [MASK] (or the tokenizer\'s own mask token, e.g. <mask>)')
    parser.add_argument("--top-k", type=int, default=5, help="fillers to list per mask (default 5)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = parser.parse_args(argv)
    if not any(spelling in args.text for spelling in MASK_SPELLINGS):
        raise InputError(f"the text has no mask token; write {' or '.join(MASK_SPELLINGS)} where a word should "
                         f"be filled in")

    from scaletrain.inference.fill_mask import fill_mask
    from scaletrain.inference.load import load_model

    loaded = load_model(args.path, args.device)
    if loaded.family != "bert":
        kind = "a GPT (decoder-only)" if loaded.family == "gpt" else "an encoder-decoder"
        raise InputError(f"fill-mask needs a masked language model (BERT, RoBERTa); {args.path} is {kind}: use "
                         f"scaletrain generate")
    tokenizer = loaded.tokenizer
    mask_token = tokenizer.role_token("mask")
    if mask_token is None:
        raise InputError(f"the tokenizer of {args.path} has no mask token ({' / '.join(MASK_SPELLINGS)})")
    ids = input_encoder(loaded)(_with_own_mask(args.text, mask_token))
    fillers = fill_mask(loaded.model, ids, tokenizer.role_id("mask"), args.top_k)
    named = [[(tokenizer.decode([token]).strip(), p) for token, p in block] for block in fillers]
    print(format_fillers(args.text, named))
    return 0
