"""`scaletrain table`: the classic model table, with parameter counts computed from our own modules built on
the meta device (no memory is allocated, so GPT-3 175B builds in a fraction of a second)."""

from __future__ import annotations

import json

from scaletrain.models.registry import build_model, count_parameters, load_model_config

# the lecture's order: the original Transformer, encoders, decoders by date, GPT-3, encoder-decoders
TABLE_MODELS = (
    "transformer_base", "transformer_big", "bert_base", "bert_large", "roberta_base", "roberta_large",
    "xlnet_base", "xlnet_large", "gpt1", "gpt2_124m", "gpt2_355m", "gpt2_774m", "gpt2_1_5b", "megatron_8_3b",
    "turing_nlg_17b",
    "gpt3_small", "gpt3_medium", "gpt3_large", "gpt3_xl", "gpt3_2_7b", "gpt3_6_7b", "gpt3_13b", "gpt3_175b",
    "t5_small", "t5_base", "t5_large", "t5_3b", "t5_11b", "bart_base", "bart_large",
)


def table_row(name: str) -> dict:
    cfg = load_model_config(name)
    # the backbone the papers count: pooler included, MLM/NSP/classification heads not (tied heads add nothing)
    params = count_parameters(build_model(cfg, device="meta"), include_heads=False)
    decoder_layers = cfg.decoder_layers if cfg.family == "encdec" else 0
    return {"name": name, "family": cfg.family, "layers": cfg.n_layers, "decoder_layers": decoder_layers,
            "width": cfg.d_model, "heads": cfg.n_heads,
            "params": params, "documented_params": cfg.documented_params,
            "data": cfg.documented_data, "training": cfg.documented_training}


def human(count: float | None) -> str:
    if count is None:
        return "-"
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.3g}{unit}"
    return str(int(count))


def diff_percent(row: dict) -> str:
    documented = row["documented_params"]
    return f"{100.0 * (row['params'] - documented) / documented:+.1f}%" if documented else "-"


def format_text(rows: list[dict]) -> str:
    header = ("model", "layers", "width", "heads", "documented", "computed", "diff", "data", "training")
    lines = [[r["name"], f"{r['layers']}+{r['decoder_layers']}" if r["decoder_layers"] else str(r["layers"]),
              str(r["width"]), str(r["heads"]), human(r["documented_params"]), f"{r['params']:,}", diff_percent(r),
              r["data"], r["training"]] for r in rows]
    widths = [max(len(header[i]), *(len(line[i]) for line in lines)) for i in range(7)]
    def render(cells):
        return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths))
    return "\n".join([render(header[:7]) + "  data | training"] +
                     [render(line[:7]) + f"  {line[7]} | {line[8]}" for line in lines])


def cli(argv: list[str]) -> int:
    from scaletrain.cli import ArgumentParser

    parser = ArgumentParser(prog="scaletrain table", description="the classic model table")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.add_argument("models", nargs="*", help="model names (default: every model of the table)")
    parser.add_argument("--cluster", default=None, help="add the planner's best layout on this cluster preset")
    parser.add_argument("--tokens", type=float, default=300e9, help="token budget for the planned training time")
    parser.add_argument("--nodes", type=int, default=None, help="plan on this many nodes (default: the fewest)")
    args = parser.parse_args(argv)
    rows = [table_row(name) for name in (args.models or TABLE_MODELS)]
    plan_text = ""
    if args.cluster:  # the planner's columns (scaletrain/plan/table.py)
        from scaletrain.plan.table import add_plan_columns

        plan_text = "\n\n" + add_plan_columns(rows, args.cluster, args.tokens, args.nodes)
    print(json.dumps(rows, indent=1) if args.format == "json" else format_text(rows) + plan_text)
    return 0
