"""Durability helpers shared by checkpoints and prepared data."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Flushes a folder's entries (a rename into it, a new file) to disk, so they survive a power cut."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)
