"""`scaletrain eval <run | step | HF dir>`, for a GPT (a BERT or a T5 / BART: multiple-choice tasks only):

    --data PATH        perplexity on a corpus (a text / JSONL / parquet file, a glob, a folder, or "builtin")
                       or a split of a folder written by `scaletrain data prepare` with the model's tokenizer;
                       documents are tokenized as prepare packs them (the text, then end-of-document)
    --tasks F.jsonl    few-shot multiple-choice or generation tasks (evaluation/fewshot.py), --shots K
                       demonstrations drawn from --train (default: the task file itself) with --seed; with
                       --out DIR each task writes <name>.json (scores, settings) and <name>.prompts.json
    --tp N             the same in N local processes, the model sharded over them (tensor parallel); rank 0
                       prints and writes, and the scores equal one process's
    --replay F.json    scores the prompts a <name>.prompts.json saved, exactly as saved (same window and
                       generation length; no task or train file), and says whether the scores are the saved
                       ones: exit 1 when they differ"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from scaletrain.cli import ArgumentParser
from scaletrain.errors import InputError


def _parser() -> ArgumentParser:
    parser = ArgumentParser(prog="scaletrain eval", description="Evaluate a trained model: perplexity on a corpus.")
    parser.add_argument("path", help="a run folder, a checkpoint step-* folder or a Hugging Face folder")
    parser.add_argument("--data", help='perplexity on a corpus (file, glob, folder or "builtin") or a prepared folder')
    parser.add_argument("--tasks", nargs="+", default=[], help="few-shot task files (JSONL)")
    parser.add_argument("--replay", nargs="+", default=[], help="saved <task>.prompts.json files to score again")
    parser.add_argument("--shots", type=int, default=0, help="demonstrations per prompt (default 0)")
    parser.add_argument("--train", help="where demonstrations come from (default: each task file itself)")
    parser.add_argument("--seed", type=int, default=1234, help="draws the demonstrations (default 1234)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="generation tasks (default 32)")
    parser.add_argument("--split", default="validation", choices=("train", "validation"),
                        help="the split of a prepared folder (default validation)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens of context per window (default: the "
                                                                    "model's window, else 1024)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens")
    parser.add_argument("--out", help="also write the results: a JSON file (--data) or a folder (--tasks)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--tp", type=int, default=1, help="shard the model over N local processes (tensor "
                        "parallel, for a model too big for one device); rank 0 prints and writes")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def token_stream(data: str, split: str, tokenizer) -> tuple[np.ndarray, str]:
    """-> (the tokens, what they are) for a prepared folder's split, or a corpus packed here as prepare packs it."""
    from scaletrain.data.corpus import load_corpus
    from scaletrain.data.prepare import open_prepared
    from scaletrain.data.streaming import pack_documents

    path = Path(os.path.expanduser(data))
    if (path / "metadata.json").is_file():
        prepared = open_prepared(path)
        made_with = prepared.metadata["tokenizer_hash"]
        if made_with != tokenizer.hash:
            raise InputError(f"{path} was prepared with tokenizer {made_with[:12]}, not the model's "
                             f"({tokenizer.hash[:12]}); prepare the corpus again with --tokenizer {tokenizer.source}, "
                             f"or pass the corpus itself")
        return getattr(prepared, split).tokens, f"{path} ({split} split)"
    corpus = load_corpus(data)
    documents = [document for document in corpus.documents() if document.strip()]
    tokens = pack_documents(tokenizer, documents)[0] if documents else np.zeros(0, np.int64)
    return tokens.astype(np.int64), f"corpus {corpus.name}"


def cli(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    for name in ("seq_len", "batch_size", "max_tokens", "max_new_tokens", "tp"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InputError(f"--{name.replace('_', '-')}={value} must be at least 1")
    if args.shots < 0:
        raise InputError(f"--shots={args.shots} must be 0 or more")
    if not args.data and not args.tasks and not args.replay:
        raise InputError("nothing to evaluate: give --data CORPUS|PREPARED (perplexity) and/or --tasks FILE.jsonl "
                         "(or --replay NAME.prompts.json)")
    if args.replay and (args.data or args.tasks or args.train or args.shots or args.seq_len):
        raise InputError("--replay scores the saved prompts with their saved window: drop --data, --tasks, --train, "
                         "--shots and --seq-len")
    if args.data and args.tasks and args.out:
        raise InputError("--out names one result: evaluate --data and --tasks in two calls")
    from scaletrain.evaluation.fewshot import read_saved_prompts, read_task

    tasks = {Path(path).stem: read_task(path) for path in args.tasks}  # bad task files fail before the model loads
    replays = [(path, *read_saved_prompts(path)) for path in args.replay]
    demonstrations = read_task(args.train) if args.train else None

    from scaletrain.inference.load import load_model, model_config

    if args.tp > 1 and "WORLD_SIZE" not in os.environ:  # bad task files were refused above, in this process
        _check_shardable(model_config(args.path), args.tp)  # the config and shapes only, no weights
        return _launch(argv, args.tp)
    args.writes = int(os.environ.get("RANK", "0")) == 0
    loaded = load_model(args.path, "cpu" if args.tp > 1 else args.device)
    if args.tp > 1:
        _shard(loaded, args.tp, args.device)
    _check_family(args, loaded, tasks, replays)
    window = _window(args, loaded, replays)
    if args.data:
        _perplexity(args, loaded, window)
    for name, examples in tasks.items():
        _task(args, loaded, window, name, examples, demonstrations)
    code = max([_replay(args, loaded, window, *replay) for replay in replays], default=0)
    if args.tp > 1:  # leave together: rank 0 hosts the store, and a peer still tearing down when it goes aborts
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return code


def _check_family(args, loaded, tasks: dict, replays: list) -> None:
    # a BERT (as a cloze) and a T5 / BART score multiple choice only: no perplexity, no generation here
    choices_only = not args.data and all(t[0].choices for t in tasks.values()) and all(
        prompts[0]["choices"] for _, _, prompts in replays)
    if loaded.family != "gpt" and not (loaded.family in ("bert", "encdec") and choices_only):
        raise InputError(f"scaletrain eval scores a GPT (perplexity, multiple choice, generation), a BERT (cloze "
                         f"multiple choice) or a T5 / BART (multiple choice); {args.path} is family {loaded.family}"
                         + (" and it has no perplexity or generation here" if loaded.family in ("bert", "encdec")
                            else ""))


def _window(args, loaded, replays: list) -> int:
    """Tokens of context: --seq-len, else the model's window (1024 for T5's relative positions)."""
    from scaletrain.inference.generate import context_length

    window = context_length(loaded.model_cfg)
    if args.seq_len is not None and window is not None and args.seq_len > window:
        raise InputError(f"--seq-len={args.seq_len} exceeds the model's window of {window} tokens; lower it")
    for path, settings, _ in replays:
        if window is not None and (settings.get("window") or 0) > window:
            raise InputError(f"{path} was scored with a window of {settings['window']} tokens, more than this "
                             f"model's {window}: replay it on a model with that window")
    return args.seq_len or window or 1024


def _launch(argv: list[str], tp: int) -> int:
    """`scaletrain eval ... --tp N` again in N local workers (torch's elastic agent, as training launches)."""
    import sys
    import tempfile

    from scaletrain.configs.schema import LaunchConfig
    from scaletrain.launch.local import run_elastic

    with tempfile.TemporaryDirectory(prefix="scaletrain-eval-") as logs:  # the agent's per-attempt folders
        return run_elastic(LaunchConfig(nproc_per_node=tp), [sys.executable, "-m", "scaletrain.cli", "eval", *argv],
                           logs)


def _check_shardable(cfg, tp: int) -> None:
    for what, size in (("model.n_heads", cfg.n_heads), ("the vocabulary", cfg.vocab_size)):
        if size % tp:
            raise InputError(f"--tp {tp} must divide {what} ({size}); pick a divisor")


def _shard(loaded, tp: int, device: str) -> None:
    """A worker of --tp: the model loaded on the CPU is sharded onto this rank's device over a tp mesh."""
    import torch
    import torch.distributed as dist

    from scaletrain.parallel import apply_tensor_parallel
    from scaletrain.parallel.dims import ParallelDims

    world = int(os.environ["WORLD_SIZE"])
    if world != tp:
        raise InputError(f"--tp {tp} runs in {tp} processes, not WORLD_SIZE={world}; launch it without torchrun")
    _check_shardable(loaded.model_cfg, tp)
    target = torch.device(device, int(os.environ.get("LOCAL_RANK", "0"))) if device == "cuda" else torch.device(device)
    if target.type == "cuda":
        torch.cuda.set_device(target)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo")
    dims = ParallelDims(dp_replicate=1, dp_shard=1, tp=tp, pp=1, cp=1, world_size=tp)
    dims.build_mesh(target.type)
    apply_tensor_parallel(loaded.model, dims.tp_mesh)  # moves each shard to the mesh's device
    loaded.model.to(target)  # and what no plan covers (norms' buffers, position tables)


def _perplexity(args, loaded, window: int) -> None:
    from scaletrain.evaluation.perplexity import perplexity

    stream, what = token_stream(args.data, args.split, loaded.tokenizer)
    if args.max_tokens is not None:
        stream = stream[:args.max_tokens]
    if len(stream) < 2:
        raise InputError(f"{what} holds {len(stream)} tokens; perplexity needs at least 2")
    device = next(loaded.model.parameters()).device
    result = perplexity(loaded.model, stream, window, args.batch_size, device, progress=not args.no_progress)
    if not args.writes:
        return
    print(f"{args.path} on {what}: perplexity {result.perplexity:.3f} (loss {result.loss:.4f} nats/token over "
          f"{result.tokens:,} tokens, {result.windows} windows of up to {window})")
    if args.out:
        record = dict(model=str(args.path), data=what, window=window, **vars(result))
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


def _score(args, loaded, window: int, prompts: list[dict], max_new_tokens: int) -> dict:
    from scaletrain.evaluation import fewshot
    from scaletrain.inference.cli import input_encoder, special_token_ids

    return fewshot.score_task(loaded.model, loaded.family, loaded.tokenizer, input_encoder(loaded), prompts, window,
                              args.batch_size, next(loaded.model.parameters()).device, special_token_ids(loaded),
                              max_new_tokens)


def _task(args, loaded, window: int, name: str, examples, demonstrations) -> None:
    from scaletrain.evaluation import fewshot

    prompts = fewshot.build_prompts(examples, demonstrations or examples, args.shots, args.seed)
    scores = _score(args, loaded, window, prompts, args.max_new_tokens)
    settings = dict(task=name, model=str(args.path), shots=args.shots, seed=args.seed, train=args.train,
                    separator=fewshot.SEPARATOR, delimiter=fewshot.DELIMITER, window=window,
                    max_new_tokens=args.max_new_tokens)
    if args.writes:
        print(f"{name}: {_describe(scores)} ({args.shots}-shot)")
        _write_results(args.out, name, settings, scores, prompts)


def _describe(scores: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in scores.items())


def _write_results(out, name: str, settings: dict, scores: dict, prompts: list[dict]) -> None:
    if out:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.json").write_text(json.dumps({**settings, **scores}, indent=2) + "\n")
        (out / f"{name}.prompts.json").write_text(json.dumps({**settings, "scores": scores, "prompts": prompts},
                                                             indent=1) + "\n")


def _replay(args, loaded, model_window: int, path: str, settings: dict, prompts: list[dict]) -> int:
    """Scores saved prompts again -> 0 when every score is the saved one, 1 when one differs."""
    name = settings.get("task") or Path(path).name.removesuffix(".prompts.json")
    settings = dict(settings)
    saved = settings.pop("scores", None) or _sibling_scores(Path(path), name) or {}
    window = settings.get("window") or model_window
    scores = _score(args, loaded, window, prompts, settings.get("max_new_tokens", args.max_new_tokens))
    differ = {k: (v, saved[k]) for k, v in scores.items() if k in saved and saved[k] != v}
    if not saved:
        verdict = "no saved scores to compare with"
    elif differ:
        verdict = "DIFFERENT from the saved scores: " + ", ".join(
            f"{k} {v} (saved {s})" for k, (v, s) in differ.items())
    else:
        verdict = "the saved scores"
    if args.writes:
        print(f"{name} (replayed {len(prompts)} prompts of {path}, window {window}): {_describe(scores)}; {verdict}")
        _write_results(args.out, name, {**settings, "model": str(args.path), "replayed": str(path)}, scores, prompts)
    return int(bool(differ))


def _sibling_scores(path: Path, name: str):
    """Scores of a prompts file written before they were saved in it: the <task>.json beside it."""
    sibling = path.with_name(f"{name}.json")
    return json.loads(sibling.read_text()) if sibling.is_file() else {}
