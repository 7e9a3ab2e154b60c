"""Registers the typed schema with Hydra and composes configs outside the Hydra app (table, plan, tests).
Every composed config is checked against the dataclass schema (a key that is no field is an error, `+key`
additions included: OmegaConf.to_object would otherwise set it as a stray attribute) and then turned into
the dataclasses with OmegaConf.to_object, which runs each __post_init__ validation. Hydra/OmegaConf errors
are rewritten as one-line ConfigErrors that keep Hydra's reason."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import typing
from typing import Iterator, Sequence

from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from scaletrain.configs.schema import TrainConfig
from scaletrain.errors import ConfigError, one_line

CONFIG_MODULE = "scaletrain.configs"
ROOT_CONFIG = "train"
CONFIG_GROUPS = ("model", "data", "optim", "parallel", "launcher", "cluster", "experiment")
_OVERRIDE_EXAMPLE = "write key=value, e.g. trainer.max_steps=100"


def register_configs() -> None:
    node = OmegaConf.structured(TrainConfig)
    # data.mixture is a user dict (source -> weight): its keys are the user's, so it is the one node that
    # is not in struct mode (everywhere else an unknown key stays an error).
    OmegaConf.set_struct(node.data.mixture, False)
    ConfigStore.instance().store(name="base_train_config", node=node)


# ----------------------------------------------------------------------------- keys of the schema

def _field_types(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


@functools.lru_cache(maxsize=None)
def schema_keys(cls=TrainConfig, prefix: str = "") -> tuple:
    """Every dotted key of the schema, nested dataclasses expanded: ('model.name', ..., 'seed', ...)."""
    keys = []
    for name, kind in _field_types(cls).items():
        keys.append(prefix + name)
        if dataclasses.is_dataclass(kind):
            keys += schema_keys(kind, f"{prefix}{name}.")
    return tuple(keys)


def _unknown_keys(values: dict, cls, prefix: str = "") -> Iterator[str]:
    """Keys of a composed config (plain nested dicts) that name no field of `cls`. A free-form field
    (Dict[str, Any], e.g. model.extra) accepts any key below it."""
    types = _field_types(cls)
    for key, value in values.items():
        if not prefix and key == "hydra":
            continue
        if key not in types:
            yield prefix + str(key)
        elif dataclasses.is_dataclass(types[key]) and isinstance(value, dict):
            yield from _unknown_keys(value, types[key], f"{prefix}{key}.")


def _is_free_form(key: str) -> bool:
    """True when `key` lies below a field that is not a dataclass (a dict or list value)."""
    parts, cls = key.split("."), TrainConfig
    for depth, part in enumerate(parts[:-1]):
        kind = _field_types(cls).get(part)
        if kind is None:
            return False
        if not dataclasses.is_dataclass(kind):
            return True
        cls = kind
    return False


def unknown_key_message(key: str) -> str:
    """One line naming the unknown key and the nearest valid one: the same name in another group, then
    the closest field of the same group (difflib), then the closest name anywhere."""
    known = schema_keys()
    parent, _, leaf = key.rpartition(".")
    siblings = {k.rpartition(".")[2]: k for k in known if k.rpartition(".")[0] == parent}
    elsewhere = {}
    for k in known:
        elsewhere.setdefault(k.rpartition(".")[2], k)
    match = (([elsewhere[leaf]] if leaf in elsewhere else [])
             or [siblings[m] for m in difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.6)]
             or [elsewhere[m] for m in difflib.get_close_matches(leaf, elsewhere, n=1, cutoff=0.75)])
    hint = f"did you mean {match[0]}?" if match else (
        f"{parent or 'the top level'} has no such field (`scaletrain train --cfg job` prints every key)")
    return f"unknown config key {key!r}; {hint}"


def check_known_keys(cfg) -> None:
    """Raises ConfigError for the first key of the composed DictConfig that is not in the schema."""
    values = OmegaConf.to_container(cfg, resolve=False)
    for key in _unknown_keys(values, TrainConfig):
        raise ConfigError(unknown_key_message(key))


def to_train_config(cfg, overrides: Sequence[str] = ()) -> TrainConfig:
    """OmegaConf DictConfig (composed from `overrides`) -> validated TrainConfig dataclass. With
    model.init_from the model config and tokenizer come from the source first (checkpoint/init_from.py)."""
    check_known_keys(cfg)
    try:
        if cfg.model.init_from:
            from scaletrain.checkpoint.init_from import take_source_config

            take_source_config(cfg, overrides)
        return OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except (OmegaConfBaseException, ValueError, TypeError) as error:
        raise ConfigError(_omegaconf_reason(error)) from None


# ----------------------------------------------------------------------------- overrides and composition

def parse_overrides(overrides: Sequence[str]) -> list:
    """Hydra's parsed overrides; a malformed one (`=3`, `foo`, `model=3`) is one ConfigError line."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    parsed = []
    for text in overrides:
        try:
            override = parser.parse_overrides([text])[0]
        except HydraException as error:
            lines = [line.strip() for line in str(error).splitlines()[1:]]
            reason = next((line for line in lines if line.strip("^ ") and "Exception" not in line
                           and not line.startswith("See ")), "unexpected character")
            raise ConfigError(f"malformed override {text!r} ({reason}); {_OVERRIDE_EXAMPLE}") from None
        if not override.key_or_group:
            raise ConfigError(f"malformed override {text!r} (no key before '='); {_OVERRIDE_EXAMPLE}")
        group = override.key_or_group
        if group in CONFIG_GROUPS and not override.is_sweep_override() and override.value() is not None \
                and not isinstance(override.value(), str):
            from scaletrain.configs import available

            raise ConfigError(f"{text}: {group} takes a preset name; available {group} presets: "
                              f"{', '.join(available(group))}")
        parsed.append(override)
    return parsed


def compose_config(overrides: Sequence[str] = ()) -> TrainConfig:
    parsed = parse_overrides(overrides)
    register_configs()
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            cfg = compose(config_name=ROOT_CONFIG, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException, ValueError) as error:
        raise ConfigError(friendly_hydra_error(error)) from None
    from scaletrain.configs.experiments import check_experiment_conflicts

    check_experiment_conflicts(parsed)
    return to_train_config(cfg, overrides)


def _omegaconf_reason(error: Exception, name_key: bool = True) -> str:
    """OmegaConf's first line (its reason), after the key it concerns; an unknown key gets a suggestion."""
    full_key = getattr(error, "full_key", None)
    if isinstance(error, (ConfigAttributeError, ConfigKeyError)) and full_key and not _is_free_form(full_key):
        return unknown_key_message(full_key)
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"{full_key}: {reason}" if name_key and full_key and full_key not in reason else reason


def friendly_hydra_error(error: Exception) -> str:
    """Hydra's 'Could not find model/foo' lists what is available; a failed override keeps OmegaConf's
    reason ('Value 'abc' of type 'str' could not be converted to Integer'); an unknown key names the nearest."""
    from scaletrain.configs import available

    cause = error.__cause__ or error.__context__
    if isinstance(cause, OmegaConfBaseException):
        override = re.search(r"override '?([^'\s]+)'?", str(error))
        source = re.match(r"In '([^']+)'", str(error))  # a preset or experiment file
        if override is None:
            reason = _omegaconf_reason(cause)
            return f"configs/{source.group(1)}.yaml: {reason}" if source else reason
        reason = _omegaconf_reason(cause, name_key=override.group(1).lstrip("~+").split("=")[0] != cause.full_key)
        return reason if reason.startswith("unknown config key") else f"bad override {override.group(1)}: {reason}"
    message = one_line(error)
    for group in CONFIG_GROUPS:
        if f"'{group}/" in message or f"{group}/" in message and "Could not find" in message:
            names = ", ".join(available(group))
            found = re.sub(r"^In '[^']+': ", "", message.split('Available options')[0].strip())  # Hydra's frame
            return f"{found} -- available {group} presets: {names}"
    if isinstance(error, OmegaConfBaseException):
        return _omegaconf_reason(error)
    return message
