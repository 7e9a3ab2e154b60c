"""Kernel tests run the Triton kernels on CPU through the Triton interpreter.

tests/conftest.py imports triton itself in interpreter mode at the start of the session. Here the kernel
modules are (re)imported with TRITON_INTERPRET=1 for each kernel test module, so their @triton.jit
functions are interpreted even if an earlier test imported them otherwise, and TRITON_INTERPRET is set
only while a kernel test runs (parts of triton read it lazily at the first launch)."""

from __future__ import annotations

import contextlib
import importlib
import os
import sys

import pytest

KERNEL_MODULES = ("scaletrain.kernels.triton_norm", "scaletrain.kernels.triton_gelu",
                  "scaletrain.kernels.triton_cross_entropy")


@contextlib.contextmanager
def _interpret_env(value: str | None):
    previous = os.environ.get("TRITON_INTERPRET")
    if value is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous


def _triton_is_interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction
    from triton.language import standard

    return isinstance(standard.sum, InterpretedFunction)


def _reimport_kernels() -> None:
    for name in KERNEL_MODULES:
        if name in sys.modules:
            importlib.reload(sys.modules[name])
        else:
            importlib.import_module(name)


@pytest.fixture(scope="module", autouse=True)
def interpreted_triton():
    with _interpret_env("1"):
        if not _triton_is_interpreted():
            raise RuntimeError("triton was imported in compiled mode before tests/conftest.py imported it "
                               "interpreted; run the kernel tests through pytest from the repository root")
        _reimport_kernels()
    yield


@pytest.fixture(autouse=True)
def triton_interpret_env(interpreted_triton):
    # Parts of triton import lazily at the first launch and check the mode then.
    with _interpret_env("1"):
        yield
