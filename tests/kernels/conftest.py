"""Kernel tests run the Triton kernels on CPU through the Triton interpreter.

Triton decides interpreter-or-compiler when a function is decorated, and its own library (tl.sum, tl.rand,
...) is decorated when triton is imported, so TRITON_INTERPRET=1 must be set before `import triton`. This
conftest arranges that per kernel test module without leaking into the rest of the session:
  - TRITON_INTERPRET is set only while triton / the kernel modules are imported and while a kernel test
    runs (subprocesses and other test modules never see it);
  - when an earlier test module already imported triton in compiled mode (torch.distributed.pipelining
    does), the compiled triton modules are set aside, an interpreted copy serves this module's tests, and
    the compiled ones are put back afterwards. (Two copies of triton's Python modules then share one
    compiled extension, and nanobind lists the second copy's bindings as "leaked" when Python exits.)"""

from __future__ import annotations

import atexit
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


def _triton_python_modules() -> list[str]:
    # The compiled extension (triton._C) stays: it is mode-independent and cannot be loaded twice.
    return [name for name in sys.modules
            if (name == "triton" or name.startswith("triton.")) and not name.startswith("triton._C")]


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


def _silence_shutdown_leak_report() -> None:
    """With two copies of triton's Python modules over one extension, nanobind prints hundreds of lines of
    "leaked functions" at interpreter exit, after pytest's summary (harmless; exit code 0). atexit runs
    after the summary and before that report, so stderr is closed only for the interpreter's teardown,
    as triton itself does for its compile workers."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)


# The interpreted copy of triton, imported once and swapped in for each kernel test module when needed.
_INTERPRETED_TRITON: dict = {}


@pytest.fixture(scope="module", autouse=True)
def interpreted_triton():
    compiled_triton = {}
    with _interpret_env("1"):
        if "triton" in sys.modules and not _triton_is_interpreted():
            compiled_triton = {name: sys.modules.pop(name) for name in _triton_python_modules()}
            sys.modules.update(_INTERPRETED_TRITON)
            atexit.register(_silence_shutdown_leak_report)
        importlib.import_module("triton")
        _reimport_kernels()
        _INTERPRETED_TRITON.update({name: sys.modules[name] for name in _triton_python_modules()})
    yield
    if compiled_triton:
        for name in _triton_python_modules():
            del sys.modules[name]
        sys.modules.update(compiled_triton)
        with _interpret_env(None):
            _reimport_kernels()


@pytest.fixture(autouse=True)
def triton_interpret_env(interpreted_triton):
    # Parts of triton import lazily at the first launch and check the mode then.
    with _interpret_env("1"):
        yield
