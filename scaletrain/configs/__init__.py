from pathlib import Path

CONFIG_DIR = Path(__file__).parent


def available(group: str) -> list[str]:
    """Names of the YAML presets in one config group (model, parallel, cluster, ...)."""
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
