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

from omegaconf import OmegaConf

from scaletrain.configs.schema import TrainConfig, data_parallel_degree, missing_resume_message, validate_cross_fields
from scaletrain.configs.store import (CONFIG_MODULE, ROOT_CONFIG, compose_config, parse_overrides, register_configs,
                                     to_train_config)
from scaletrain.errors import ConfigError, UserError, one_line

log = logging.getLogger(__name__)
RESOLVED_CONFIG = "config.yaml"
MAX_VALIDATED_SWEEP_POINTS = 256
# Hydra flags that take a value (the value is not an override).
_FLAGS_WITH_VALUE = {"--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd", "--cfg", "-c",
                     "--package", "-p", "--experimental-rerun"}
# With these Hydra prints something and exits; nothing to validate or train.
_INFO_FLAGS = {"--cfg", "-c", "--info", "-i", "--help", "-h", "--hydra-help", "--shell-completion", "-sc"}


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
                "bart_denoise": ("encdec",)}
    if model.family not in families[data.objective]:
        raise ConfigError(f"data.objective={data.objective} does not train a {model.family} model; use "
                          f"{' or '.join(o for o, f in families.items() if model.family in f)}")
    if cfg.precision != "fp32" and cfg.cluster.peak_tflops(cfg.precision) <= 0 and cfg.cluster.device == "cuda":
        raise ConfigError(f"precision={cfg.precision} is not supported by cluster={cfg.cluster.name}; use "
                          f"precision={cfg.cluster.default_precision}")


def validate_command_line(argv: Sequence[str]) -> None:
    overrides, multirun, _ = split_overrides(argv)
    points = sweep_points(overrides) if multirun else [list(overrides)]
    for point in points:
        try:
            validate(compose_config(point))
        except ConfigError as error:
            where = f" (sweep point {' '.join(point)})" if multirun and len(points) > 1 else ""
            raise ConfigError(f"{one_line(error)}{where}") from None


def run_job(cfg: TrainConfig, overrides: Sequence[str]) -> int:
    """One job in its own run folder (Hydra chdir'ed into it)."""
    from scaletrain.launch import maybe_launch

    validate(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.structured(cfg), Path(cfg.run_dir) / RESOLVED_CONFIG)
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

    argv = list(argv)
    _, multirun, info_only = split_overrides(argv)
    if not info_only:
        validate_command_line(argv)
    register_configs()
    errors: list[UserError] = []
    codes: list[int] = []

    def task(dict_cfg) -> int:
        try:
            code = run_job(to_train_config(dict_cfg), list(HydraConfig.get().overrides.task))
        except UserError as error:  # one line, not Hydra's traceback; the CLI turns it into exit 2
            errors.append(error)
            if multirun:
                print(f"error: {one_line(error)}", file=sys.stderr)
            code = 2
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
