"""Few-shot in-context evaluation of a GPT (and cloze multiple choice for a BERT), as GPT-3 evaluated and lm-evaluation-harness does, on local JSONL:

    multiple choice   {"context": str, "choices": [str, ...], "answer": index}: each choice scored by
                      log p(delimiter + choice | prompt); acc takes the highest sum, acc_norm the highest sum
                      per character of the choice (lm-eval's acc_norm)
    generation        {"context": str, "answer": str}: greedy decoding up to the first newline, scored by
                      exact match after stripping whitespace
    cloze (encoders)  multiple choice for a BERT: the choice's tokens masked at once at the blank (___), or
                      after the context, scored by the sum of their masked-token log-probabilities
    encoder-decoders  multiple choice for T5 / BART: the prompt read by the encoder, each delimiter + choice
                      scored as the decoder's target, without special tokens, as lm-eval (acc and acc_norm)

A prompt is K demonstrations (context, delimiter, their answer), drawn with a fixed seed from a train file,
then the example's context, joined by the separator. Prompt and continuation are tokenized apart (no merge
across their boundary), and a prompt longer than the window loses its oldest tokens, which is logged. Every
prompt, with the chosen demonstrations and the per-choice scores, is returned so it can be saved and scored
again."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from scaletrain.errors import InputError
from scaletrain.inference.generate import full_logits, pad_batch

log = logging.getLogger(__name__)

SEPARATOR, DELIMITER = "\n\n", " "  # between demonstrations; between a context and its answer
IGNORE = -100  # an unscored label, as the losses' ignore index


@dataclass
class Example:
    context: str
    answer: Union[int, str]  # a choice index, or the text to generate
    choices: Optional[list[str]] = None  # None: a generation task

    def target(self) -> str:
        return self.choices[self.answer] if self.choices is not None else self.answer


def _example(record, where: str) -> Example:
    if not isinstance(record, dict) or not isinstance(record.get("context"), str) or "answer" not in record:
        raise InputError(f"{where}: a task record needs a string \"context\" and an \"answer\" (and \"choices\" "
                         f"for multiple choice)")
    choices, answer = record.get("choices"), record["answer"]
    if choices is None:
        if not isinstance(answer, str):
            raise InputError(f"{where}: a generation record's answer must be a string (give \"choices\" for "
                             f"multiple choice)")
        return Example(record["context"], answer)
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices) or len(choices) < 2:
        raise InputError(f"{where}: \"choices\" must list at least two strings")
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise InputError(f"{where}: \"answer\" must be the index of the right choice, 0..{len(choices) - 1} "
                         f"(it is {answer!r})")
    return Example(record["context"], answer, choices)


def read_task(path: Union[str, Path]) -> list[Example]:
    """A task file (JSONL, or any record format data.tasks reads) -> its examples, all of one kind."""
    from scaletrain.data.tasks import read_rows

    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"task file {path} does not exist; pass a JSONL file of context/choices/answer records")
    examples = [_example(record, where) for where, record in read_rows(path, "test", "strict")]
    if not examples:
        raise InputError(f"task file {path} holds no records; give it one JSON record per line")
    kinds = {example.choices is None for example in examples}
    if len(kinds) > 1:
        raise InputError(f"{path} mixes multiple-choice and generation records; split them into two task files")
    return examples


PROMPT_INPUTS = ("prompt", "demonstrations", "choices", "answer")  # what a saved prompt is scored from


def read_saved_prompts(path: Union[str, Path]) -> tuple[dict, list[dict]]:
    """A <task>.prompts.json written by scaletrain eval --out -> (its settings and saved scores, the prompts
    with only their inputs), so they can be scored again exactly as they were built."""
    import json

    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"--replay {path} does not exist; pass a <task>.prompts.json written by scaletrain eval --out")
    try:
        saved = json.loads(path.read_text())
    except ValueError as error:
        raise InputError(f"--replay {path} is not JSON ({error}); pass a <task>.prompts.json") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("prompts"), list) or not saved["prompts"]:
        raise InputError(f"--replay {path} holds no \"prompts\" list; pass a <task>.prompts.json written by "
                         f"scaletrain eval --out")
    prompts = []
    for index, p in enumerate(saved["prompts"]):
        where = f"{path} prompt {index}"
        record = p if isinstance(p, dict) else {}
        _example({"context": record.get("prompt"), "choices": record.get("choices"), "answer": record.get("answer")},
                 where)  # the same checks as a task record
        prompts.append({key: record.get(key) for key in PROMPT_INPUTS})
    if len({p["choices"] is None for p in prompts}) > 1:
        raise InputError(f"--replay {path} mixes multiple-choice and generation prompts")
    if saved.get("delimiter", DELIMITER) != DELIMITER:  # the choices are scored as delimiter + choice
        raise InputError(f"--replay {path} was built with delimiter {saved['delimiter']!r}; this version scores "
                         f"with {DELIMITER!r}, so its scores would not be comparable")
    return {k: v for k, v in saved.items() if k != "prompts"}, prompts


def build_prompts(examples: list[Example], demonstrations: list[Example], shots: int, seed: int) -> list[dict]:
    """One prompt per example: `shots` demonstrations drawn (without the example itself) with a generator
    seeded by (seed, example index), so a prompt never depends on the others."""
    available = len(demonstrations) - (demonstrations is examples)  # never an example's own record
    if shots > available:
        raise InputError(f"--shots {shots} needs at least {shots} demonstrations besides the example; the train "
                         f"file holds {available}: lower --shots or give a larger --train file")
    prompts = []
    for index, example in enumerate(examples):
        pool = [i for i, d in enumerate(demonstrations) if d is not example]
        chosen = random.Random(seed * 1_000_003 + index).sample(pool, shots) if shots else []
        parts = [demonstrations[i].context + DELIMITER + demonstrations[i].target() for i in chosen]
        prompts.append({"prompt": SEPARATOR.join(parts + [example.context]), "demonstrations": chosen,
                        "choices": example.choices, "answer": example.answer})
    return prompts


def _fit(prompt_ids: list[int], continuation: list[int], window: int, where: str) -> tuple[list[int], bool]:
    """prompt + continuation cut from the left to window + 1 tokens; refused when the continuation alone
    does not fit behind at least one prompt token."""
    if len(continuation) >= window + 1:
        raise InputError(f"{where}: the answer alone is {len(continuation)} tokens, more than the model's window "
                         f"of {window}; shorten it or use a model with a longer context")
    ids = prompt_ids + continuation
    return ids[-(window + 1):], len(ids) > window + 1


def labelled_rows(pairs: list[tuple[list[int], list[int]]], window: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, continuation ids) -> (input ids, labels), both <= window long: the fitted text but its
    last token, labelled with the next token where that is a continuation token and -100 elsewhere."""
    rows, truncated = [], 0
    for prompt_ids, continuation in pairs:
        ids, cut = _fit(prompt_ids, continuation, window, "a task record")
        truncated += cut
        rows.append((ids[:-1], [IGNORE] * (len(ids) - 1 - len(continuation)) + continuation))
    if truncated:
        log.warning("%d prompts were longer than the model's window of %d tokens: their oldest tokens were cut",
                    truncated, window)
    return rows


def row_loglikelihoods(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits (B, T, V) (vocab-sharded under tp) and labels (B, T) -> (B,) float64: each row's summed
    log-probability of its labels; the one reduction behind every left-to-right score, pipelined or not."""
    logprobs = F.log_softmax(full_logits(logits).float(), dim=-1)  # (B, T, V)
    picked = logprobs.gather(-1, labels.clamp(min=0)[..., None])[..., 0]  # (B, T)
    return torch.where(labels != IGNORE, picked, 0.0).double().sum(dim=-1)


def score_rows_in_process(model: nn.Module, batch_size: int, device):
    """-> score_rows(rows) -> [summed log-likelihood]: the rows in batches through a model in this process."""

    @torch.no_grad()
    def score_rows(rows: list[tuple[list[int], list[int]]]) -> list[float]:
        scores = []
        for first in range(0, len(rows), batch_size):
            chunk = rows[first:first + batch_size]
            # right padding: causal attention never reads it, and its labels are ignored
            inputs, _ = pad_batch([ids for ids, _ in chunk], pad_id=0, left=False, device=device)
            labels, _ = pad_batch([labels for _, labels in chunk], pad_id=IGNORE, left=False, device=device)
            scores += row_loglikelihoods(model(inputs), labels).tolist()
        return scores

    return score_rows


def score_multiple_choice(model, encode, prompts: list[dict], window: int, batch_size: int, device,
                          score_rows=None) -> dict:
    """`score_rows(labelled rows) -> [float]` scores the (input, labels) rows; default: `model` in this process
    (the trainer passes the pipeline's, under parallel.pp > 1)."""
    pairs = [(encode(p["prompt"]), encode(DELIMITER + choice)) for p in prompts for choice in p["choices"]]
    score_rows = score_rows or score_rows_in_process(model, batch_size, device)
    flat = iter(score_rows(labelled_rows(pairs, window)))
    for p in prompts:
        p["loglikelihoods"] = [next(flat) for _ in p["choices"]]
    return grade_choices(prompts)


def grade_choices(prompts: list[dict]) -> dict:
    """Each prompt's predictions from its per-choice `loglikelihoods` -> acc, and acc_norm per character."""
    correct = correct_norm = 0
    for p in prompts:
        p["prediction"] = _argmax(p["loglikelihoods"])
        p["prediction_norm"] = _argmax([s / len(c) for s, c in zip(p["loglikelihoods"], p["choices"])])
        correct += p["prediction"] == p["answer"]
        correct_norm += p["prediction_norm"] == p["answer"]
    return {"acc": correct / len(prompts), "acc_norm": correct_norm / len(prompts), "examples": len(prompts)}


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # the first of equal scores, as numpy's argmax


def score_generation(model, encode, decode, prompts: list[dict], window: int, special: dict,
                     max_new_tokens: int, batch_size: int) -> dict:
    from scaletrain.inference.generate import GenerationConfig, generate

    if max_new_tokens >= window:
        raise InputError(f"--max-new-tokens={max_new_tokens} leaves no room for the prompt in the model's window of "
                         f"{window} tokens; lower it")
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=special["eos_token_id"],
                           pad_token_id=special["pad_token_id"])
    correct = 0
    for first in range(0, len(prompts), batch_size):
        chunk = prompts[first:first + batch_size]
        ids = [encode(p["prompt"])[-(window - max_new_tokens):] for p in chunk]
        for p, new in zip(chunk, generate(model, ids, cfg)):
            text = decode(new).split("\n")[0].strip()  # up to the first newline, as lm-eval's until
            p["generated"] = text
            correct += text == p["answer"].strip()
    return {"exact_match": correct / len(prompts), "examples": len(prompts)}


# ------------------------------------------------------------------------------------------- encoders

BLANKS = ("___", "[MASK]", "<mask>")  # where a cloze choice goes; without one it follows the context


def cloze_text(prompt: str, choice_tokens: int, mask_token: str) -> str:
    """The prompt with its blank (or its end) replaced by one mask token per token of the choice."""
    masks = " ".join([mask_token] * choice_tokens)
    for blank in BLANKS:
        if blank in prompt:
            before, _, after = prompt.rpartition(blank)  # the example's own blank: the last one
            return before + masks + after
    return prompt + DELIMITER + masks


@torch.no_grad()
def score_cloze(model: nn.Module, frame, encode, mask_token: str, mask_id: int, prompts: list[dict],
                window: int, device) -> dict:
    """A masked LM's multiple choice: every token of the choice masked at once in the prompt, the score the
    sum of log p(choice token | the masked text) at those positions. `frame(text)` -> ids with the family's
    special tokens, `encode(text)` -> bare ids."""
    for p in prompts:
        scores = []
        for choice in p["choices"]:
            ids, target = cloze_inputs(frame, encode, mask_token, mask_id, p["prompt"], choice, window)
            ids = torch.tensor([ids], device=device)
            labels = torch.where(ids == mask_id, ids, IGNORE)
            logits = full_logits(model(ids, labels=labels)[0]).float()  # (n, V): the masked positions in order
            logprobs = F.log_softmax(logits, dim=-1)
            scores.append(float(logprobs[torch.arange(len(target)), torch.tensor(target)].double().sum()))
        p["loglikelihoods"] = scores
    return grade_choices(prompts)


def cloze_inputs(frame, encode, mask_token: str, mask_id: int, prompt: str, choice: str,
                 window: int) -> tuple[list[int], list[int]]:
    """-> (the framed prompt with one mask per token of the choice at its blank, the choice's ids)."""
    target = encode(DELIMITER + choice)
    ids = frame(cloze_text(prompt, len(target), mask_token))
    if len(ids) > window:  # an encoder reads the whole text: no left truncation keeps the blank
        raise InputError(f"a cloze prompt is {len(ids)} tokens, more than the model's window of {window}; "
                         f"use fewer --shots or shorter contexts")
    masks = sum(i == mask_id for i in ids)
    if masks != len(target):
        raise InputError(f"a cloze prompt holds {masks} mask tokens for a choice of {len(target)}; remove mask "
                         f"tokens from the context (mark the blank with ___)")
    return ids, target


# ------------------------------------------------------------------------------------ encoder-decoders

@torch.no_grad()
def score_seq2seq_choices(model: nn.Module, frame, encode, prompts: list[dict], window: int, batch_size: int,
                          device, start_id: int, pad_id: int) -> dict:
    """T5 / BART multiple choice, as lm-evaluation-harness scores a seq2seq model: the prompt, framed with the
    family's special tokens (T5: text </s>; BART: <s> text </s>), is the encoder's input and each bare
    delimiter + choice (no special tokens, so no </s> is scored) the decoder's target. The score is
    sum log p(target token | prompt, the target before it), the decoder reading [start] + target[:-1]."""
    pairs = seq2seq_pairs(frame, encode, prompts, window)
    scores = []
    for first in range(0, len(pairs), batch_size):
        chunk = pairs[first:first + batch_size]
        source, source_mask = pad_batch([s for s, _ in chunk], pad_id, left=False, device=device)
        # right padding of the decoder: causal attention never reads it, and only target positions are scored
        decoder, _ = pad_batch([[start_id] + t[:-1] for _, t in chunk], pad_id, left=False, device=device)
        logits = full_logits(model(source, decoder, source_mask))
        logprobs = F.log_softmax(logits.float(), dim=-1)  # (B, T, V)
        for row, (_, target) in enumerate(chunk):
            picked = logprobs[row, torch.arange(len(target), device=device), torch.tensor(target, device=device)]
            scores.append(float(picked.double().sum()))
    flat = iter(scores)
    for p in prompts:
        p["loglikelihoods"] = [next(flat) for _ in p["choices"]]
    return grade_choices(prompts)


def seq2seq_pairs(frame, encode, prompts: list[dict], window: int) -> list[tuple[list[int], list[int]]]:
    """-> (framed prompt, bare delimiter + choice) ids for each prompt's choices, both within the window."""
    pairs = []
    for p in prompts:
        source = frame(p["prompt"])
        if len(source) > window:  # the encoder reads it whole: no left cut keeps its leading special token
            raise InputError(f"a prompt is {len(source)} tokens, more than the encoder's window of {window}; use "
                             f"fewer --shots or shorter contexts")
        for choice in p["choices"]:
            target = encode(DELIMITER + choice)
            if len(target) > window:
                raise InputError(f"a choice is {len(target)} tokens, more than the decoder's window of {window}; "
                                 f"shorten it")
            pairs.append((source, target))
    return pairs


def check_prompts_fit(family: str, tokenizer, frame, prompts: list[dict], window: int) -> None:
    """The refusals scoring would raise on these prompts (too long for the window, stray mask tokens), raised
    without a model: the trainer checks its eval_tasks at start rather than at its first evaluation."""
    if family == "bert":
        mask_token, mask_id = _mask(tokenizer)
        for p in prompts:
            for choice in p["choices"]:
                cloze_inputs(frame, tokenizer.encode, mask_token, mask_id, p["prompt"], choice, window)
    elif family == "encdec":
        seq2seq_pairs(frame, tokenizer.encode, prompts, window)
    elif prompts[0]["choices"] is not None:
        labelled_rows([(tokenizer.encode(p["prompt"]), tokenizer.encode(DELIMITER + c)) for p in prompts
                       for c in p["choices"]], window)


def _mask(tokenizer) -> tuple[str, int]:
    mask = tokenizer.role_token("mask")
    if mask is None:
        raise InputError("the model's tokenizer has no mask token, which cloze scoring needs")
    return mask, tokenizer.role_id("mask")


def score_task(model: nn.Module, family: str, tokenizer, frame, prompts: list[dict], window: int, batch_size: int,
               device, special: dict, max_new_tokens: int, score_rows=None) -> dict:
    """One task's metrics, by the model's family and the task's kind (scaletrain eval and the trainer):
    a BERT's cloze, a T5 / BART's multiple choice, a GPT's multiple choice or generation. `frame(text)` -> ids
    with the family's specials. `score_rows`: a GPT's rows scored elsewhere (the pipeline), multiple choice only."""
    if family == "bert":
        return score_cloze(model, frame, tokenizer.encode, *_mask(tokenizer), prompts, window, device)
    if family == "encdec":
        if prompts[0]["choices"] is None:
            raise InputError("an encoder-decoder (T5, BART) is scored on multiple-choice tasks here; generation "
                             "tasks need a GPT")
        return score_seq2seq_choices(model, frame, tokenizer.encode, prompts, window, batch_size, device,
                                     special["decoder_start_token_id"], special["pad_token_id"])
    if prompts[0]["choices"] is not None:
        return score_multiple_choice(model, tokenizer.encode, prompts, window, batch_size, device, score_rows)
    if score_rows is not None:
        raise InputError("a generation task decodes token by token in one process; here only multiple choice "
                         "is scored through the pipeline")
    decode = lambda ids: tokenizer.backend.decode(ids, skip_special_tokens=True)  # noqa: E731
    return score_generation(model, tokenizer.encode, decode, prompts, window, special, max_new_tokens, batch_size)
