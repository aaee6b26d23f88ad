"""Progress for a person at a terminal and for a log file: tqdm's bars on a terminal, else a plain line now and then.

tqdm redraws its bar with carriage returns and cursor moves; written to a file, every redraw stays, and a
log of a sweep becomes one very long line of escape sequences. Off a terminal, :class:`PlainProgress` writes
an ordinary line instead, at most every ``every_s`` seconds.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any, TextIO

from tqdm.auto import tqdm

VERBOSE = False
"""Set by the command line's ``-v``: the libraries' own log lines and warnings are shown too."""
PLAIN_EVERY_S = 30.0
"""Seconds at least between two plain progress lines of one bar."""


def is_terminal(stream: TextIO) -> bool:
    """A terminal tqdm can draw on: a tty that reports a width (a pseudo-terminal of 0 columns shows no bar)."""
    if not getattr(stream, "isatty", lambda: False)():
        return False
    try:
        return os.get_terminal_size(stream.fileno()).columns > 0
    except (OSError, ValueError, AttributeError):
        return True


def progress_bar(total: int, desc: str, unit: str, *, initial: int = 0, leave: bool = True, disable: bool = False,
                 stream: TextIO | None = None) -> Any:
    """A tqdm bar where ``stream`` (default stderr, where tqdm writes) is a terminal, else a :class:`PlainProgress`.

    Either takes the calls the sweeper makes: ``update``, ``n =``, ``refresh``, ``set_postfix``,
    ``set_postfix_str``, ``reset`` and ``close``.
    """
    stream = stream if stream is not None else sys.stderr
    if disable or is_terminal(stream):
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave, disable=disable, file=stream)
    return PlainProgress(total, desc, unit, initial=initial, leave=leave, stream=stream)


def fmt_seconds(seconds: float) -> str:
    """12s, 4m05s, 1h02m."""
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes == 0:
        return f"{secs}s"
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class PlainProgress:
    """A progress bar as plain lines: ``sweep s: 3/10 trials, 4m05s elapsed, ~9m30s left, best=1.234``.

    A line is written when the bar changes (``update``, ``refresh``, a postfix with ``refresh``) and
    ``every_s`` seconds have passed since the last one, and on ``close`` when the bar is kept (``leave``) and
    moved since its last line. Trials of a few seconds thus print nothing here; their one line per finished
    trial says enough.
    """

    def __init__(self, total: int, desc: str, unit: str, *, initial: int = 0, leave: bool = True,
                 stream: TextIO | None = None, every_s: float = PLAIN_EVERY_S) -> None:
        self.total = total
        self.desc = desc
        self.unit = unit
        self.n = initial
        self.leave = leave
        self.stream = stream if stream is not None else sys.stderr
        self.every_s = every_s
        self.postfix = ""
        self._initial = initial
        self._started = self._last = time.monotonic()
        self._shown = initial
        self._lock = threading.Lock()  # after-trial callbacks of a sweep in slots run in several threads

    def update(self, n: int = 1) -> None:
        self.n += n
        self.refresh(force=False)

    def reset(self, total: int | None = None) -> None:
        """Back to zero, as tqdm's ``reset`` (a run that starts over after running out of memory)."""
        with self._lock:
            self.total = total if total is not None else self.total
            self.n = self._initial = self._shown = 0
            self._started = time.monotonic()

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.set_postfix_str(", ".join(f"{k}={v}" for k, v in items.items()), refresh=refresh)

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = str(s)
        if refresh:
            self.refresh(force=False)

    def refresh(self, force: bool = False) -> None:
        with self._lock:
            if force or time.monotonic() - self._last >= self.every_s:
                self._write()

    def close(self) -> None:
        with self._lock:
            if self.leave and self.n != self._shown:
                self._write()

    def line(self) -> str:
        elapsed = time.monotonic() - self._started
        parts = [f"{self.desc}: {self.n}/{self.total} {self.unit}s", f"{fmt_seconds(elapsed)} elapsed"]
        done = self.n - self._initial
        if done > 0 and self.n < self.total:
            parts.append(f"~{fmt_seconds(elapsed / done * (self.total - self.n))} left")
        return ", ".join(parts + ([self.postfix] if self.postfix else []))

    def _write(self) -> None:
        print(self.line(), file=self.stream, flush=True)
        self._last = time.monotonic()
        self._shown = self.n

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
