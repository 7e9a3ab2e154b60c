"""`scaletrain train [hydra overrides]`: the Hydra app over the typed configs.

Before Hydra starts anything, every configuration the command would run (each point of a -m sweep) is
composed and validated, so a typo or a bad combination costs one line and exit code 2, not a half-started
sweep. Inside a job: validate cross-field rules, save the resolved config, hand over to the launcher if
other processes must be started, else train here."""

from __future__ import annotations

import itertools
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from scaletrain.configs.schema import TrainConfig, data_parallel_degree, missing_resume_message, validate_cross_fields
from scaletrain.configs.store import (CONFIG_MODULE, ROOT_CONFIG, compose_config, parse_overrides, register_configs,
                                     to_train_config)
from scaletrain.errors import ConfigError, RunFolderError, UserError, one_line, run_folder_error

log = logging.getLogger(__name__)
MAX_VALIDATED_SWEEP_POINTS = 256
# Hydra flags that take a value (the value is not an override).
_FLAGS_WITH_VALUE = {"--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd", "--cfg", "-c",
                     "--package", "-p", "--experimental-rerun"}
# With these Hydra prints something and exits; nothing to validate or train.
_INFO_FLAGS = {"--cfg", "-c", "--info", "-i", "--help", "-h", "--hydra-help", "--shell-completion", "-sc"}


# Paths are relative to where the command was typed, but Hydra runs the job inside the run folder and
# launched workers start there: they are made absolute before anything reads them. (resume= is the
# documented exception: a relative one names a folder inside the run folder.)
PATH_KEYS = ("model.init_from", "data.corpus", "data.prepared", "data.mixture_root", "data.tokenizer",
             "data.cache_dir", "data.train_files", "data.validation_files", "parallel.deepspeed_config",
             "parallel.offload_dir")
_NOT_PATHS = ("", "builtin", "train")  # the keywords these keys take besides paths
LIST_PATH_KEYS = ("trainer.eval_tasks",)  # lists of paths: [a.jsonl,b.jsonl]


def absolute_paths(argv: Sequence[str], cwd: str) -> list[str]:
    """`data.corpus=texts/` -> `data.corpus=<cwd>/texts/` (each value of a sweep too); other args as they are."""
    result = []
    for arg in argv:
        key, _, value = arg.partition("=")
        if key.lstrip("+") in PATH_KEYS and value and not value.startswith(("${", "[", "'", '"')):
            value = ",".join(item if item in _NOT_PATHS or os.path.isabs(os.path.expanduser(item))
                             else os.path.join(cwd, item) for item in value.split(","))
            arg = f"{key}={value}"
        elif key.lstrip("+") in LIST_PATH_KEYS and value.startswith("[") and value.endswith("]"):
            items = [item.strip() for item in value[1:-1].split(",") if item.strip()]
            value = ",".join(item if os.path.isabs(os.path.expanduser(item)) else os.path.join(cwd, item)
                             for item in items)
            arg = f"{key}=[{value}]"
        result.append(arg)
    return result


def split_overrides(argv: Sequence[str]) -> tuple[list[str], bool, bool]:
    """(config overrides, multirun?, info-only?) from a Hydra command line."""
    overrides, multirun, info, skip_next = [], False, False, False
    for arg in argv:
        if skip_next:
            skip_next = False
            continue
        if arg in ("-m", "--multirun"):
            multirun = True
        elif arg.split("=")[0] in _INFO_FLAGS:
            info = True
            skip_next = arg in _FLAGS_WITH_VALUE and "=" not in arg
        elif arg in _FLAGS_WITH_VALUE:
            skip_next = True
        elif not arg.startswith("-") and not arg.lstrip("+~").startswith(("hydra.", "hydra/")):
            overrides.append(arg)
    return overrides, multirun, info


def sweep_points(overrides: Sequence[str]) -> list[list[str]]:
    """Expands `optim.lr=1e-3,3e-4 model=a,b` into every combination, as Hydra's basic sweeper does."""
    choices = []
    for override in parse_overrides(overrides):
        key = override.get_key_element()
        values = (list(override.sweep_string_iterator()) if override.is_sweep_override()
                  else [override.get_value_element_as_str()])
        choices.append([f"{key}={value}" for value in values])
    return [list(point) for point in itertools.islice(itertools.product(*choices), MAX_VALIDATED_SWEEP_POINTS)]


def planned_world_size(cfg: TrainConfig) -> int:
    """The number of ranks this config will train on, known before any process starts."""
    if cfg.dry_run.world_size > 0:
        return cfg.dry_run.world_size
    from scaletrain.launch import planned_world_size as launched_world_size  # Slurm/submitit tasks included

    return launched_world_size(cfg)


def validate(cfg: TrainConfig) -> None:
    """Every rule that needs no data and no process group."""
    world_size = planned_world_size(cfg)
    validate_cross_fields(cfg, world_size)
    if cfg.parallel.pp > 1 and cfg.dry_run.world_size == 0:  # the schedule's micro-batch rules, up front
        from scaletrain.parallel.pipeline import n_microbatches, validate_schedule

        dp = data_parallel_degree(cfg.parallel, world_size)
        validate_schedule(cfg.parallel, n_microbatches(cfg.trainer, dp))
    resume = Path(cfg.resume).expanduser()  # a relative path is relative to the run folder: checked there
    if cfg.resume not in ("auto", "none") and resume.is_absolute() and not resume.exists():
        raise ConfigError(missing_resume_message(cfg.resume))
    data, model = cfg.data, cfg.model
    if data.tokenizer == "train" and not data.prepared and model.vocab_size < data.tokenizer_vocab:
        raise ConfigError(f"model.vocab_size={model.vocab_size} is smaller than data.tokenizer_vocab="
                          f"{data.tokenizer_vocab}; raise model.vocab_size or lower data.tokenizer_vocab")
    families = {"clm": ("gpt",), "mlm": ("bert",), "span_bert": ("bert",), "t5_span": ("encdec",),
                "bart_denoise": ("encdec",), "plm": ("xlnet",)}
    if model.family not in families[data.objective]:
        fitting = [objective for objective, trained in families.items() if model.family in trained]
        raise ConfigError(f"data.objective={data.objective} does not train a {model.family} model; "
                          + (f"use {' or '.join(fitting)}" if fitting else
                             f"no objective trains the {model.family} family yet"))
    if cfg.checkpoint.export_hf:  # found at the end of a long run otherwise
        from scaletrain.models.hf import to_hf_config

        to_hf_config(model)
    if cfg.precision != "fp32" and cfg.cluster.peak_tflops(cfg.precision) <= 0 and cfg.cluster.device == "cuda":
        raise ConfigError(f"precision={cfg.precision} is not supported by cluster={cfg.cluster.name}; use "
                          f"precision={cfg.cluster.default_precision}")


def validate_command_line(argv: Sequence[str]) -> None:
    overrides, multirun, _ = split_overrides(argv)
    points = sweep_points(overrides) if multirun else [list(overrides)]
    run_dirs = planned_run_dirs(argv, multirun, len(points))
    for index, point in enumerate(points):
        try:
            cfg = compose_config(point)
            validate(cfg)
            if run_dirs:
                check_run_folder(run_dirs[index], cfg)
        except UserError as error:
            where = f" (sweep point {' '.join(point)})" if multirun and len(points) > 1 else ""
            raise error.__class__(f"{one_line(error)}{where}") from None


def planned_run_dirs(argv: Sequence[str], multirun: bool, n_points: int) -> list[Path]:
    """The folder each point will run in, when the command line names it (hydra.run.dir / hydra.sweep.dir);
    [] when Hydra makes a fresh timestamped one (nothing there to check)."""
    given = {}
    for arg in argv:
        key, _, value = arg.partition("=")
        if key in ("hydra.run.dir", "hydra.sweep.dir", "hydra.sweep.subdir") and "${" not in value:
            given[key] = value
    if not multirun:
        return [Path(given["hydra.run.dir"])] if "hydra.run.dir" in given else []
    if "hydra.sweep.dir" not in given or "hydra.sweep.subdir" in given:
        return []
    return [Path(given["hydra.sweep.dir"]) / str(index) for index in range(n_points)]


def check_run_folder(run_dir: Path, cfg: TrainConfig) -> None:
    """Before Hydra creates or writes anything: the folder can be made, and resume=none is not about to
    start a second run among another run's checkpoints."""
    from scaletrain.checkpoint.manager import refuse_fresh_start

    for folder in (run_dir, *run_dir.parents):
        if folder.exists():
            if not folder.is_dir():
                raise RunFolderError(f"the run folder {run_dir} would be under {folder}, which is a file; choose "
                                     f"another hydra.run.dir")
            if not os.access(folder, os.W_OK | os.X_OK):
                raise RunFolderError(f"the run folder {run_dir} cannot be written ({folder} is not writable); "
                                     f"choose another hydra.run.dir")
            break
    if cfg.resume == "none":
        refuse_fresh_start(run_dir)


def run_job(cfg: TrainConfig, overrides: Sequence[str]) -> int:
    """One job in its own run folder (Hydra chdir'ed into it)."""
    from scaletrain.checkpoint.manager import refuse_fresh_start
    from scaletrain.launch import maybe_launch
    from scaletrain.launch.env import is_worker

    validate(cfg)
    if cfg.resume == "none" and not is_worker(os.environ):  # a launched worker's parent checked already
        refuse_fresh_start(cfg.run_dir)
    # config.yaml is written by the trainer once the run has started (after a successful resume), so a
    # failed start keeps the config of the run that wrote the checkpoints.
    code = maybe_launch(cfg, overrides)
    if code is not None:
        return code
    if cfg.dry_run.world_size > 0:
        from scaletrain.parallel.dryrun import run_dry_run

        return run_dry_run(cfg)
    from scaletrain.train.trainer import Trainer

    return Trainer(cfg).train()


def cli(argv: Sequence[str]) -> int:
    import hydra
    from hydra.core.hydra_config import HydraConfig

    argv = absolute_paths(argv, os.getcwd())
    _, multirun, info_only = split_overrides(argv)
    if not info_only:
        validate_command_line(argv)
    register_configs()
    errors: list[UserError] = []
    codes: list[int] = []
    stops: list[int] = []

    def task(dict_cfg) -> int:
        from scaletrain.train import signals

        if stops:  # a stop signal or Ctrl-C ended an earlier point of this sweep: start no other
            return stops[0]
        signals.install()  # again: submitit's job process starts here, with its own handlers set before ours
        try:
            try:
                overrides = list(HydraConfig.get().overrides.task)
                code = run_job(to_train_config(dict_cfg, overrides), overrides)
            except OSError as os_error:  # a full disk or an unwritable run folder is the user's to fix
                raise run_folder_error(os_error) or os_error
        except UserError as error:  # one line, not Hydra's traceback; the CLI turns it into exit 2
            errors.append(error)
            if multirun:
                print(f"error: {one_line(error)}", file=sys.stderr)
            code = 2
        except (signals.StopRequested, KeyboardInterrupt) as stop:  # one line, no traceback
            code = signals.report(stop)
            stops.append(code)
        codes.append(code)
        return code

    app = hydra.main(config_path=f"pkg://{CONFIG_MODULE}", config_name=ROOT_CONFIG, version_base="1.3")(task)
    saved_argv = sys.argv
    sys.argv = [saved_argv[0] if saved_argv else "scaletrain", *argv]  # hydra.main parses sys.argv
    try:
        app()
    finally:
        sys.argv = saved_argv
    if errors and not multirun:
        raise errors[0]
    return max(codes, default=0)


def _main() -> Optional[int]:  # `python -m scaletrain.train.main ...` for subprocess tests
    from scaletrain.cli import main

    return main(["train", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(_main())
