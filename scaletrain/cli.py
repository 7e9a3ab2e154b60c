"""The `scaletrain` command. Each subcommand lives in its own module and is imported only when used, so
`scaletrain table` never pays for the trainer's imports. User errors print one line and exit 2."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys

from scaletrain.errors import USER_ERROR_EXIT_CODE, UsageError, UserError, one_line

# subcommand -> (module:function taking argv, one-line help)
SUBCOMMANDS = {
    "train": ("scaletrain.train.main:cli", "train a model (Hydra overrides: model=... parallel=... trainer.max_steps=...)"),
    "table": ("scaletrain.models.table:cli", "print the classic model table with computed parameter counts"),
    "data": ("scaletrain.data.prepare:cli", "data prepare: tokenize a corpus into memory-mapped token shards"),
    "plan": ("scaletrain.plan.cli:cli", "pick the parallel layout for a cluster: memory, step time, MFU, days"),
    "scaling": ("scaletrain.scaling.cli:cli", "scaling fit <sweep dir> | scaling optimal --compute C: fit laws, plot, allocate"),
    "export": ("scaletrain.checkpoint.export:cli", "export <run dir | step dir> --out DIR: write a Hugging Face folder"),
    "import-deepspeed": ("scaletrain.checkpoint.deepspeed_import:cli", "import-deepspeed <ds checkpoint dir> --out DIR [model=...]: a DeepSpeed ZeRO checkpoint as a run folder"),
    "generate": ("scaletrain.inference.cli:generate_cli", "generate <run | step | HF dir> --prompt TEXT: continue or answer prompts"),
    "fill-mask": ("scaletrain.inference.cli:fill_mask_cli", 'fill-mask <run | step | HF dir> "text with [MASK]": top fillers'),
    "eval": ("scaletrain.evaluation.cli:cli", "eval <run | step | HF dir> --data CORPUS|PREPARED: perplexity"),
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the subcommands: a bad argument is one `error:` line and exit 2 through `main` (argparse
    itself prints the whole usage block first). Subparsers inherit the class."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message}; see {self.prog} --help")


def _usage() -> str:
    lines = ["usage: scaletrain <command> [args]", "", "commands:"]
    lines += [f"  {name:<10}{help_text}" for name, (_, help_text) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in SUBCOMMANDS:
        print(f"error: unknown command {command!r}; choose one of: {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    module_name, function_name = SUBCOMMANDS[command][0].split(":")
    from scaletrain.train import signals

    # train: stop signals and Ctrl-C are honoured from process start, before the slow imports; the handlers
    # are put back when main returns, so an in-process call (tests, notebooks) leaves none behind
    with signals.installed() if command == "train" else contextlib.nullcontext():
        try:
            function = getattr(importlib.import_module(module_name), function_name)
            return int(function(rest) or 0)
        except UserError as error:
            print(f"error: {one_line(error)}", file=sys.stderr)
            return USER_ERROR_EXIT_CODE
        except (signals.StopRequested, KeyboardInterrupt) as stop:
            return signals.report(stop)


if __name__ == "__main__":
    sys.exit(main())
