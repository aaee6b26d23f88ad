"""Turns at the interpreter between a slot engine and the threads that keep its trials' books.

Every tensor operation lets go of Python's interpreter lock while it runs and takes it back after. While
another thread runs Python, taking it back waits for that thread's switch interval (5 ms): one thread logging a
trial slows an engine that launches thousands of small kernels per step from microseconds per launch to
milliseconds (``bench/interpreter_lock.py``), and the GPU waits with it. So on CUDA the engine holds a turn
while it launches a step's kernels and gives it up while it waits for the device; bookkeeping (sampling,
logging, pruning decisions) runs in those gaps. On the CPU the kernels run on the host, so nobody takes turns.

Bookkeeping that was already waiting when the engine gave up its turn goes before the engine's next turn:
each waiting thread gets one section per step, and the engine waits for no one else. A section that waits for
a lock another thread holds (the study's storage, the tracker) waits outside its section (:class:`PatientLock`):
the engine waits for sections that run, not for those that queue.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

ENGINE_PATIENCE_S = 1.0
"""The longest the engine waits for bookkeeping sections to end before it launches its step anyway."""


class HostTurns:
    """The engine's turn against bookkeeping sections: a writer-first lock whose readers may nest.

    Example:
        >>> turns = HostTurns()
        >>> turns.active = True
        >>> with turns.bookkeeping():
        ...     pass  # log a metric, ask the sampler
        >>> with turns.engine():
        ...     pass  # launch the step's kernels
    """

    def __init__(self) -> None:
        self.active = False
        lock = threading.Lock()
        self._cond = threading.Condition(lock)
        """Where sections wait for the engine's turn to end."""
        self._engine_waits = threading.Condition(lock)
        """Where the engine waits for sections to end: a section's end wakes the engine only, not every thread
        waiting for a turn (64 of them in a 64-slot sweep)."""
        self._holding = False
        self._wanting = False
        self._inside = 0
        self._waiting = 0
        self._window = 0
        """Sections that were waiting when the engine's turn ended and may still go before its next one."""
        self._depth = threading.local()
        self._entered = threading.local()
        """Whether this thread's outermost section counts against the engine (it was entered while active)."""

    @contextmanager
    def bookkeeping(self) -> Iterator[None]:
        """A section of Python work beside the engine: it waits while the engine launches kernels."""
        depth = getattr(self._depth, "n", 0)
        self._depth.n = depth + 1
        entered = False
        try:
            if depth == 0 and self.active:
                self._enter()
                entered = self._entered.on = True
            yield
        finally:
            self._depth.n = depth
            if entered:
                self._entered.on = False
                self._leave()

    @contextmanager
    def aside(self) -> Iterator[None]:
        """Inside a section, wait for something another thread holds outside it; back in at once after, whatever
        the engine does: what was waited for (a lock) is held then, and other threads may queue for it."""
        if not getattr(self._entered, "on", False):
            yield
            return
        self._entered.on = False
        self._leave()
        try:
            yield
        finally:
            with self._cond:
                self._inside += 1
            self._entered.on = True

    def _leave(self) -> None:
        with self._cond:
            self._inside -= 1
            self._engine_waits.notify()

    def _enter(self) -> None:
        with self._cond:
            if self._holding or self._wanting:
                self._waiting += 1
                try:
                    while self.active and (self._holding or (self._wanting and self._window == 0)):
                        self._cond.wait()
                finally:  # a signal raised while waiting must not leave a window nobody takes
                    self._waiting -= 1
                    self._window = max(0, self._window - 1)
                    self._engine_waits.notify()
            self._inside += 1

    @contextmanager
    def engine(self) -> Iterator[None]:
        """The engine's turn: bookkeeping sections that are running end first, new ones wait."""
        self.take()
        try:
            yield
        finally:
            self.give_up()

    @contextmanager
    def waiting(self) -> Iterator[None]:
        """Inside the engine's turn, while it waits for the device: bookkeeping may run meanwhile."""
        held = self.give_up()
        try:
            yield
        finally:
            if held:
                self.take()

    def take(self) -> None:
        if not self.active:
            return
        with self._cond:
            self._wanting = True
            try:
                self._engine_waits.wait_for(lambda: not (self._inside or self._window), timeout=ENGINE_PATIENCE_S)
            except BaseException:  # interrupted: sections waiting for this turn go
                self._wanting = False
                self._cond.notify_all()
                raise
            self._holding, self._window, self._wanting = True, 0, False

    def give_up(self) -> bool:
        """End the engine's turn; False where it held none."""
        with self._cond:
            if not self._holding:
                return False
            self._holding = False
            self._window = self._waiting
            self._cond.notify_all()
            return True

    def stop(self) -> None:
        """No more turns: everyone waiting goes."""
        with self._cond:
            self.active = False
            self._holding = self._wanting = False
            self._window = 0
            self._cond.notify_all()
            self._engine_waits.notify_all()


class PatientLock:
    """A lock (reentrant with ``reentrant=True``) whose waiters wait outside their bookkeeping section.

    Sixty-four trials' threads share the study's storage and the tracker; one of them writing made the others
    queue inside their sections, and the engine then waited for the whole queue before its next step.
    """

    def __init__(self, reentrant: bool = False, turns: HostTurns | None = None) -> None:
        self._lock: Any = threading.RLock() if reentrant else threading.Lock()
        self._turns = turns or TURNS

    def acquire(self) -> None:
        if not self._lock.acquire(blocking=False):
            with self._turns.aside():
                self._lock.acquire()

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> PatientLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


TURNS = HostTurns()
"""The process's turns: a worker runs one slot engine at a time, and its trials' threads keep books beside it."""
