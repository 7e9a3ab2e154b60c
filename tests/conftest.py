"""Session-wide: import triton once, in interpreter mode, before any test can import it compiled.

Triton decides interpreter-or-compiler when a function is decorated, and its own library (tl.sum,
tl.math.erf, ...) is decorated when triton is first imported. torch.distributed.pipelining imports triton,
so without this a pipeline test running before the kernel tests would leave the compiled library in
place, and the kernel tests would need a second, interpreted copy of triton's Python modules over the one
compiled extension (which intermittently computed wrong values). Nothing in this CPU session compiles
Triton in-process (tests/kernels/test_gpu_compile.py compiles in a subprocess), and TRITON_INTERPRET is
set only for the import, so subprocesses (the CLI runs) never see it."""

import importlib.util
import os

if importlib.util.find_spec("triton") is not None:
    _previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401
    finally:
        if _previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = _previous
