"""Command line against experiment file. An experiment (`# @package _global_`) is merged after the config
groups, so a key it sets under a group would silently win over a preset picked on the command line
(`experiment=x optim=sgd` with x setting optim.lr trains with x's lr on top of sgd). Experiments pick
whole presets through their defaults list (`override /model: bert_cpu_small`), where Hydra lets the
command line's choice win; a group the command line picks and the experiment's body also sets is an error
that names both."""

from __future__ import annotations

from typing import Sequence

from omegaconf import OmegaConf

from scaletrain.configs import CONFIG_DIR
from scaletrain.errors import ConfigError


def _flatten(values: dict, prefix: str) -> list[str]:
    keys = []
    for key, value in values.items():
        keys += _flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"]
    return keys


def check_experiment_conflicts(parsed_overrides: Sequence) -> None:
    """`parsed_overrides`: store.parse_overrides' result (Hydra Override objects)."""
    from scaletrain.configs.store import CONFIG_GROUPS

    choices = {o.key_or_group: o.value() for o in parsed_overrides
               if o.key_or_group in CONFIG_GROUPS and isinstance(o.value(), str)}
    experiment = choices.pop("experiment", None)
    path = CONFIG_DIR / "experiment" / f"{experiment}.yaml"
    if not experiment or not path.is_file():  # none, or one from a user's hydra.searchpath
        return
    body = OmegaConf.to_container(OmegaConf.load(path))
    for group, preset in choices.items():
        if isinstance(body.get(group), dict) and body[group]:
            keys = _flatten(body[group], f"{group}.")
            shown = ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")
            raise ConfigError(f"{group}={preset} on the command line conflicts with experiment={experiment}, "
                              f"which sets {shown} on top of any {group} preset; drop {group}={preset} and "
                              f"give the keys you want as {group}.KEY=VALUE overrides (they win), or copy "
                              f"the experiment")
