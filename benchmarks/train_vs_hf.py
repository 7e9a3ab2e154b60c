"""Training throughput and peak memory: scaletrain's models vs Hugging Face transformers, per family.

Same architecture (GPT2LMHeadModel, BertForMaskedLM, T5ForConditionalGeneration built from the matching
config), same batch, same AdamW (torch's fused kernel: the default of both scaletrain's trainer and Hugging
Face's Trainer), dropout off, fp32. Every measurement runs in a fresh worker
process so its peak memory is its own (CPU: peak RSS above the RSS right after building the model and the
optimizer; CUDA: max_memory_allocated); the parent alternates scaletrain and HF workers round by round so
load drift on the machine hits both alike, and reports the median tokens/s and the peak memory.

    python benchmarks/train_vs_hf.py [--rounds 2] [--steps 6] [--families gpt bert t5]"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

BATCH, SEQ_LEN, TARGET_LEN, VOCAB = 8, 128, 32, 8192
SHAPE = dict(d_model=256, n_layers=4, n_heads=4, d_ff=1024)


def scaletrain_config(family: str):
    from scaletrain.models.registry import load_model_config

    common = dict(vocab_size=VOCAB, dropout=0.0, attn_dropout=0.0, pad_vocab_multiple=64, **SHAPE)
    if family == "gpt":
        return load_model_config("gpt2_124m", dict(common, max_seq_len=SEQ_LEN))
    if family == "bert":  # BertForMaskedLM has neither pooler nor NSP head
        return load_model_config("bert_base", dict(common, max_seq_len=SEQ_LEN, pooler=False, nsp_head=False))
    return load_model_config("t5_small", dict(common, n_decoder_layers=SHAPE["n_layers"], d_head=64))


def hf_model(family: str):
    import transformers as hf

    d, layers, heads, ff = SHAPE["d_model"], SHAPE["n_layers"], SHAPE["n_heads"], SHAPE["d_ff"]
    if family == "gpt":
        config = hf.GPT2Config(vocab_size=VOCAB, n_positions=SEQ_LEN, n_embd=d, n_layer=layers, n_head=heads,
                               n_inner=ff, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return hf.GPT2LMHeadModel(config)
    if family == "bert":
        config = hf.BertConfig(vocab_size=VOCAB, hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                               intermediate_size=ff, max_position_embeddings=SEQ_LEN, hidden_dropout_prob=0.0,
                               attention_probs_dropout_prob=0.0)
        return hf.BertForMaskedLM(config)
    config = hf.T5Config(vocab_size=VOCAB, d_model=d, d_kv=64, d_ff=ff, num_layers=layers, num_decoder_layers=layers,
                         num_heads=heads, dropout_rate=0.0, feed_forward_proj="relu")
    return hf.T5ForConditionalGeneration(config)


def make_batch(family: str, generator: torch.Generator) -> dict:
    ids = torch.randint(5, VOCAB, (BATCH, SEQ_LEN), generator=generator)
    if family == "gpt":
        return {"input_ids": ids, "labels": torch.roll(ids, -1, dims=1)}
    if family == "bert":
        labels = torch.where(torch.rand(ids.shape, generator=generator) < 0.15, ids, torch.full_like(ids, -100))
        return {"input_ids": ids, "labels": labels}
    targets = torch.randint(5, VOCAB, (BATCH, TARGET_LEN), generator=generator)
    decoder_input_ids = torch.cat([torch.zeros_like(targets[:, :1]), targets[:, :-1]], dim=1)
    return {"input_ids": ids, "decoder_input_ids": decoder_input_ids, "labels": targets}


def training_step_fn(family: str, impl: str, device: torch.device):
    """(model, step(batch) -> loss) for one implementation."""
    if impl == "scaletrain":
        from scaletrain.models.registry import build_model, get_spec

        cfg = scaletrain_config(family)
        model, spec = build_model(cfg, device), get_spec(cfg.family)

        def step(batch):
            outputs = model(**{k: batch[k] for k in spec.input_keys if k in batch})
            loss_sum, count = spec.loss_fn(outputs, batch)
            return loss_sum / count
    else:
        model = hf_model(family).to(device)

        def step(batch):
            if family == "gpt":  # HF shifts the labels itself: give it the unshifted ids
                return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
            if family == "bert":
                return model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
            return model(input_ids=batch["input_ids"], decoder_input_ids=batch["decoder_input_ids"],
                         labels=batch["labels"]).loss
    return model, step


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def worker(family: str, impl: str, steps: int) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model, step = training_step_fn(family, impl, device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    generator = torch.Generator().manual_seed(0)
    batches = [{k: v.to(device) for k, v in make_batch(family, generator).items()} for _ in range(steps + 1)]
    baseline = _rss_bytes()
    timings = []
    for index, batch in enumerate(batches):  # the first step warms up (allocator, optimizer state)
        started = time.perf_counter()
        step(batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if index:
            timings.append(time.perf_counter() - started)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    tokens = sum(v.numel() for k, v in batches[0].items() if k in ("input_ids", "decoder_input_ids"))
    return {"tokens_per_s": tokens / statistics.median(timings), "peak_bytes": peak,
            "params": sum(p.numel() for p in model.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--families", nargs="+", default=["gpt", "bert", "t5"])
    parser.add_argument("--worker", nargs=2, metavar=("FAMILY", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.steps)))
        return
    results = {(f, impl): [] for f in args.families for impl in ("scaletrain", "hf")}
    for round_index in range(args.rounds):
        for family in args.families:
            order = ("scaletrain", "hf") if round_index % 2 == 0 else ("hf", "scaletrain")
            for impl in order:
                out = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--worker", family, impl],
                                     capture_output=True, text=True, check=True)
                results[(family, impl)].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'family':<6} {'impl':<11} {'params':>9} {'tokens/s':>10} {'peak MiB':>9}   ratio (tokens/s, memory)")
    for family in args.families:
        summary = {}
        for impl in ("scaletrain", "hf"):
            runs = results[(family, impl)]
            summary[impl] = (statistics.median(r["tokens_per_s"] for r in runs), max(r["peak_bytes"] for r in runs))
            print(f"{family:<6} {impl:<11} {runs[0]['params']:>9,} {summary[impl][0]:>10.0f} "
                  f"{summary[impl][1] / 2**20:>9.0f}")
        speed = summary["scaletrain"][0] / summary["hf"][0]
        memory = summary["scaletrain"][1] / max(summary["hf"][1], 1)
        print(f"{family:<6} {'ratio':<11} {'':>9} {speed:>9.2f}x {memory:>8.2f}x")


if __name__ == "__main__":
    main()
