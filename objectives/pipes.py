"""Messages between a launch and a child process of its own (the slot engine, the MLflow writer): pickled
tuples over a multiprocessing pipe, and children that leave the stop signals to their parent."""

from __future__ import annotations

import multiprocessing
import pickle
import signal
import threading
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from typing import Any

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
"""The terminal's interrupt and a scheduler's stop, which reach the whole process group."""


def send(conn: Connection, lock: threading.Lock, message: tuple[Any, ...]) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    with lock:
        conn.send_bytes(data)


def received(conn: Connection) -> Iterator[tuple[Any, ...]]:
    """The messages from the other side, until it closes its end."""
    while True:
        try:
            yield pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return


def portable(error: BaseException) -> BaseException:
    """``error`` if it crosses to the other process intact, else a RuntimeError that names it."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def start_child(target: Callable[..., None], args: tuple[Any, ...], name: str) -> tuple[Any, Connection]:
    """A spawned child (a CUDA context does not survive a fork) running ``target(child_end, *args)``, born with the
    stop signals blocked (the mask survives exec), so an interrupt during its start-up does not end it with a
    traceback: its target decides what they do. Returns the process and the parent's end of the pipe."""
    context = multiprocessing.get_context("spawn")
    conn, child_end = context.Pipe()
    process = context.Process(target=target, args=(child_end, *args), name=name, daemon=True)
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        process.start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    child_end.close()
    return process, conn


def ignore_stop_signals() -> None:
    """In a child: the parent decides when it stops (it closes the pipe)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
