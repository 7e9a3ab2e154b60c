"""Registers the typed schema with Hydra and composes configs outside the Hydra app (table, plan, tests).
Every composed config is turned into the dataclasses with OmegaConf.to_object, which runs each
__post_init__ validation; Hydra/OmegaConf errors are rewritten as one-line ConfigErrors."""

from __future__ import annotations

from typing import Sequence

from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from scaletrain.configs.schema import TrainConfig
from scaletrain.errors import ConfigError, one_line

CONFIG_MODULE = "scaletrain.configs"
ROOT_CONFIG = "train"


def register_configs() -> None:
    node = OmegaConf.structured(TrainConfig)
    # data.mixture is a user dict (source -> weight): its keys are the user's, so it is the one node that
    # is not in struct mode (everywhere else an unknown key stays an error).
    OmegaConf.set_struct(node.data.mixture, False)
    ConfigStore.instance().store(name="base_train_config", node=node)


def to_train_config(cfg) -> TrainConfig:
    """OmegaConf DictConfig -> validated TrainConfig dataclass."""
    try:
        return OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except (OmegaConfBaseException, ValueError, TypeError) as error:
        raise ConfigError(one_line(error)) from None


def compose_config(overrides: Sequence[str] = ()) -> TrainConfig:
    register_configs()
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            cfg = compose(config_name=ROOT_CONFIG, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError(friendly_hydra_error(error)) from None
    return to_train_config(cfg)


def friendly_hydra_error(error: Exception) -> str:
    """Hydra's 'Could not find model/foo' becomes a line that lists what is available."""
    from scaletrain.configs import available

    message = one_line(error)
    for group in ("model", "data", "optim", "parallel", "launcher", "cluster", "experiment"):
        if f"'{group}/" in message or f"{group}/" in message and "Could not find" in message:
            names = ", ".join(available(group))
            return f"{message.split('Available options')[0].strip()} -- available {group} presets: {names}"
    return message
