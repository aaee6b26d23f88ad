"""Ctrl-C and a scheduler's SIGTERM: running trials stop at their next step and are recorded as interrupted.

The first signal asks every running trial to stop after the step it is in (a step is never cut in half,
and a trial in another thread is reached the same way); with no trial running, or at a second signal,
the process stops at once. Either way :class:`Interrupted` unwinds through the ``finally`` blocks that
end the trial's and the study's MLflow runs, and the command exits 128 + the signal's number.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)
REASON = "interrupted"
"""The failed trial's reason, in Optuna and on its MLflow run."""


class Interrupted(KeyboardInterrupt):
    """Raised where a signal stopped the work; a KeyboardInterrupt, so that only ``finally`` blocks see it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class _Requests:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.signum: int | None = None
        self.running = 0


_requests = _Requests()


def check() -> None:
    """Raise :class:`Interrupted` when a stop was asked for (called between steps, in any thread)."""
    if _requests.signum is not None:
        raise Interrupted(_requests.signum)


@contextmanager
def trial_running() -> Iterator[None]:
    """Around a trial's training: a signal meanwhile waits for the trial's next step."""
    check()
    with _requests.lock:
        _requests.running += 1
    try:
        yield
    finally:
        with _requests.lock:
            _requests.running -= 1


def _on_signal(signum: int, frame: FrameType | None) -> None:
    first = _requests.signum is None
    _requests.signum = signum
    if first and _requests.running:
        logging.getLogger(__name__).warning("%s: stopping after the running trials' current step (again: at once)",
                                            signal.Signals(signum).name)
        return
    raise Interrupted(signum)


class _QuietInterrupt(logging.Filter):
    """Optuna logs a failed trial with its traceback; an interrupted one is reported once, by the command."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], Interrupted):
            return False
        return _requests.signum is None or not record.getMessage().startswith("Trial ")


@contextmanager
def handled() -> Iterator[None]:
    """Install the handlers for SIGINT and SIGTERM (main thread only) for the duration of a command."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    # A signal ignored from the start (a command started with `&` by a script) stays ignored.
    previous = {s: signal.signal(s, _on_signal) for s in SIGNALS if signal.getsignal(s) is not signal.SIG_IGN}
    quiet = _QuietInterrupt()
    # On the handlers: a logger's own filter does not see what its children (optuna.study._optimize) log.
    handlers = logging.getLogger("optuna").handlers
    for h in handlers:
        h.addFilter(quiet)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for h in handlers:
            h.removeFilter(quiet)
        _requests.signum = None
