"""The process's one forkserver, shared by the gloo test ranks (parallel/multiprocess.py) and the data
prepare workers (data/streaming.py). Children fork from a small single-threaded server, never from this
process, whose threads may hold locks a forked child would wait on forever."""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
import sys
import threading

_PRELOAD = ["torch", "torch.distributed", "torch.distributed.tensor", "torch.distributed.fsdp",
            "torch.distributed.checkpoint", "torch.distributed.pipelining"]
_context = None  # started on first use; it outlives the individual launches


def forkserver_context():
    """Preloads torch only when this process already imported it: the ranks start in well under a second,
    and a `scaletrain data prepare` does not pay for torch in its workers."""
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        if "torch" in sys.modules:
            _context.set_forkserver_preload(_PRELOAD)
    return _context


_HELD = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


@contextlib.contextmanager
def signals_held():
    """Inside: Ctrl-C and the stop signals are only recorded; on leaving, the handlers are back and each
    recorded signal is raised again, so it acts at a point where every started child is accounted for.
    (A stop raised while a child is half started leaves it orphaned: it dies unpickling its queues and
    prints a traceback after the parent's one-line exit.)"""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread runs Python signal handlers, and only it may change them
        return
    received: list[int] = []
    previous = {number: signal.signal(number, lambda number, frame: received.append(number)) for number in _HELD}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for number in dict.fromkeys(received):
            signal.raise_signal(number)
