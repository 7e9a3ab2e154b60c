"""Stop signals, honoured from process start (`install()` is the first thing `scaletrain train` does).

SIGTERM, SIGUSR1 (Slurm's `--signal`, our sbatch script) and SIGUSR2 (submitit's preemption signal):
- while the trainer has nothing to save (start-up, data preparation, the first step with its compile) the
  handler raises `StopRequested` at once; the CLI prints one line and exits with REQUEUE_EXIT_CODE;
- inside the loop (`deferred()`) it only records the signal: the trainer finishes the step, saves, exits
  with REQUEUE_EXIT_CODE and then calls `hand_over()`, which runs the handler that was installed before
  ours, if it is a Python one: submitit's requeues the job there.
SIGINT (Ctrl-C) raises `Interrupted` wherever the process is: checkpoints are written under a temporary
name and renamed, so the last complete one is intact. A second Ctrl-C exits at once."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Any, Callable, Optional

from scaletrain.errors import INTERRUPTED_EXIT_CODE, REQUEUE_EXIT_CODE, one_line

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class StopRequested(BaseException):
    """A stop signal while there was nothing to save. A BaseException, like KeyboardInterrupt, so that no
    `except Exception` on the way (data workers, compile) swallows it."""

    exit_code = REQUEUE_EXIT_CODE

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal_name(signum)} before the first training step finished (nothing to "
                         f"save); exiting with {REQUEUE_EXIT_CODE} so the job can be requeued; resume=auto "
                         f"continues from the last complete checkpoint")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C. A KeyboardInterrupt, so code that expects one (pytest, pools) still sees one."""

    exit_code = INTERRUPTED_EXIT_CODE

    def __init__(self, message: str = "stopped by Ctrl-C; the last complete checkpoint is intact; run the same "
                                      "command again (resume=auto, the default) to continue"):
        super().__init__(message)


class _State:
    def __init__(self) -> None:
        self.pending: Optional[int] = None  # the stop signal received and not yet acted on
        self.deferring = False
        self.previous: dict[int, Any] = {}  # handlers ours replaced (submitit's requeue for SIGUSR2)


_state = _State()


def _on_stop(signum: int, frame) -> None:
    _state.pending = signum
    if _state.deferring:
        return
    hand_over(signum, frame)  # nothing to save: submitit may requeue right away
    raise StopRequested(signum)


def _on_interrupt(signum: int, frame) -> None:
    signal.signal(signal.SIGINT, _exit_now)
    raise Interrupted()


def _exit_now(signum: int, frame) -> None:
    print("\ninterrupted twice: exiting now", file=sys.stderr, flush=True)
    os._exit(INTERRUPTED_EXIT_CODE)


def install() -> bool:
    """Installs the handlers (main thread only; idempotent). Returns whether anything was installed."""
    if threading.current_thread() is not threading.main_thread():
        return False
    changed = False
    for signum in STOP_SIGNALS:
        current = signal.getsignal(signum)
        if current is not _on_stop:
            _state.previous[signum] = current
            signal.signal(signum, _on_stop)
            changed = True
    # Only over Python's default: a process started with SIGINT ignored (nohup, `&`) keeps ignoring it.
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        _state.previous[signal.SIGINT] = signal.default_int_handler
        signal.signal(signal.SIGINT, _on_interrupt)
        changed = True
    return changed


def uninstall() -> None:
    if threading.current_thread() is not threading.main_thread():
        return
    for signum, handler in _state.previous.items():
        signal.signal(signum, handler)
    _state.previous.clear()
    _state.pending = None


@contextlib.contextmanager
def installed():
    """For a trainer run in-process (tests, notebooks): the handlers while it trains, then the old ones."""
    ours = install()
    try:
        yield
    finally:
        _state.pending = None  # acted on or moot once the run is over: never carried into the next run
        if ours:
            uninstall()


@contextlib.contextmanager
def deferred():
    """Inside: a stop signal is only recorded (`pending()`); the loop acts on it at the end of a step."""
    _state.deferring = True
    try:
        yield
    finally:
        _state.deferring = False


def pending() -> Optional[int]:
    return _state.pending


def clear() -> None:
    _state.pending = None


def report(stop: BaseException) -> int:
    """One line on stderr for a StopRequested or a Ctrl-C; returns the exit code."""
    if isinstance(stop, StopRequested):
        print(f"stopped: {one_line(stop)}", file=sys.stderr, flush=True)
        return stop.exit_code
    print(f"interrupted: {one_line(stop) or Interrupted()}", file=sys.stderr, flush=True)
    return INTERRUPTED_EXIT_CODE


def hand_over(signum: int, frame=None) -> None:
    """Runs the handler ours replaced, when it is a Python callable (submitit's requeue-and-exit)."""
    previous: Optional[Callable] = _state.previous.get(signum)
    if callable(previous):
        previous(signum, frame)
