"""A sweep's MLflow writes from a process of their own: trials in slots do not wait for them.

A sweep in slots ends several trials a second, and each trial's run takes a dozen MLflow calls (its creation,
parameters, config, metrics at its evaluations, tags, its end): SQLAlchemy's Python work, about 70 ms of the
launch's interpreter lock per trial on an H200 machine, two fifths of all its trials' bookkeeping (BENCHMARKS.md,
benchmark 5). :class:`WriterTracker` hands them to a child process that owns a plain :class:`Tracker`: writes go
over a pipe without waiting, in the order they were made; calls that answer (a new run's id, a run's tags) wait for
the child, which has made every write before them by then.

The child ends when the launch closes it (after every write it was sent) or when the launch's end of the pipe
closes (whatever ended the launch: the writes already sent are made). It ignores the terminal's interrupt and a
scheduler's SIGTERM, which reach the whole process group. A write that fails in the child is logged there, and the
sweep goes on: its trials' results are in the Optuna study.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
from collections.abc import Mapping
from concurrent.futures import Future
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from objectives.pipes import ignore_stop_signals, portable, received, send, start_child
from sweeper.tracking import Tracker

log = logging.getLogger(__name__)
CLOSE_TIMEOUT_S = 300.0
"""How long closing waits for the child to make the writes it was sent."""


class WriterTracker(Tracker):
    """A :class:`Tracker` whose calls run in a child process (see the module's docstring).

    Example:
        >>> tracker = WriterTracker(make_tracker(cfg))  # doctest: +SKIP
        >>> run_id = tracker.start_run("trial-0", parent_id=parent)  # doctest: +SKIP
        >>> tracker.close()  # doctest: +SKIP
    """

    def __init__(self, local: Tracker) -> None:  # noqa: D107 -- the local tracker's store, written from a child
        self.uri, self.experiment, self.experiment_id = local.uri, local.experiment, local.experiment_id
        self.artifact_dir = local.artifact_dir
        self.client = local.client  # for reads only: every write goes to the child
        self._ids = itertools.count()
        self._send_lock = threading.Lock()
        self._waiting: dict[int, Future[Any]] = {}
        self._waiting_lock = threading.Lock()
        self.process, self._conn = start_child(serve, (local.uri, local.experiment, local.artifact_dir),
                                               "mlflow-writer")
        self._receiver = threading.Thread(target=self._receive, name="mlflow-writer-receiver", daemon=True)
        self._receiver.start()

    # --- writes: sent, not waited for -------------------------------------------------------------

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        self._post("log_params", run_id, dict(params))

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        self._post("set_tags", run_id, dict(tags))

    def log_metrics(self, run_id: str, step: int, metrics: Mapping[str, float]) -> None:
        self._post("log_metrics", run_id, step, dict(metrics))

    def flush(self, run_id: str, stale_after: float = 0.0, tags: Mapping[str, Any] | None = None) -> None:
        self._post("flush", run_id, stale_after, dict(tags or {}))

    def log_dict(self, run_id: str, obj: Any, artifact_file: str) -> None:
        self._post("log_dict", run_id, obj, artifact_file)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self._post("log_text", run_id, text, artifact_file)

    def end_run(self, run_id: str, status: str = "FINISHED", tags: Mapping[str, Any] | None = None) -> None:
        self._post("end_run", run_id, status, dict(tags or {}))

    def reopen(self, run_id: str) -> None:
        self._post("reopen", run_id)

    def delete_tag(self, run_id: str, key: str) -> None:
        self._post("delete_tag", run_id, key)

    # --- calls that answer: waited for --------------------------------------------------------------

    def start_run(self, name: str, parent_id: str | None = None, tags: Mapping[str, str] | None = None,
                  params: Mapping[str, Any] | None = None) -> str:
        run_id: str = self._call("start_run", name, parent_id, dict(tags or {}), dict(params or {}))
        return run_id

    def log_artifacts(self, run_id: str, local_dir: str | Path, artifact_path: str | None = None) -> None:
        self._call("log_artifacts", run_id, str(local_dir), artifact_path)  # the folder may go once this returns

    def artifact_uri(self, run_id: str, path: str = "") -> str:
        uri: str = self._call("artifact_uri", run_id, path)
        return uri

    def run_tags(self, run_id: str) -> dict[str, str]:
        tags: dict[str, str] = self._call("run_tags", run_id)
        return tags

    def delete_artifacts(self, run_id: str, artifact_path: str) -> None:
        self._call("delete_artifacts", run_id, artifact_path)

    def running_children(self, parent_id: str) -> list[tuple[str, dict[str, str]]]:
        children: list[tuple[str, dict[str, str]]] = self._call("running_children", parent_id)
        return children

    def flushed(self) -> None:
        """Return once the child has made every write sent before."""
        self._call("flushed")

    def close(self) -> None:
        """Wait until the child has made every write it was sent, then end it."""
        with contextlib.suppress(OSError):  # the child is gone already
            send(self._conn, self._send_lock, ("close",))
        self.process.join(timeout=CLOSE_TIMEOUT_S)
        if self.process.is_alive():
            log.warning("the MLflow writer did not finish its writes in %.0f s: ended", CLOSE_TIMEOUT_S)
            self.process.kill()
            self.process.join(timeout=10)
        self._conn.close()

    # --- the pipe ---------------------------------------------------------------------------------

    def _post(self, name: str, *args: Any) -> None:
        try:
            send(self._conn, self._send_lock, ("post", None, name, args))
        except OSError as e:  # the child died: the trials go on, their results are in the study
            log.warning("MLflow writer gone, %s not logged: %s", name, e)

    def _call(self, name: str, *args: Any) -> Any:
        future: Future[Any] = Future()
        request = next(self._ids)
        with self._waiting_lock:
            self._waiting[request] = future
        try:
            send(self._conn, self._send_lock, ("call", request, name, args))
        except OSError as e:
            with self._waiting_lock:
                self._waiting.pop(request, None)
            raise RuntimeError(f"the MLflow writer process is gone ({name}): {e}") from None
        return future.result()

    def _receive(self) -> None:
        for _, request, result, error in received(self._conn):
            with self._waiting_lock:
                future = self._waiting.pop(request, None)
            if future is None:
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)
        with self._waiting_lock:  # the child ended: nobody answers the calls still waiting
            waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            future.set_exception(RuntimeError(f"the MLflow writer process ended (exit code {self.process.exitcode})"))


def serve(conn: Connection, uri: str, experiment: str, artifact_dir: Path | None) -> None:
    """The child: one plain :class:`Tracker`, the parent's calls in the order sent, until told to close or the
    parent's end of the pipe closes."""
    ignore_stop_signals()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s (MLflow writer): %(message)s")
    lock = threading.Lock()
    tracker = Tracker(uri, experiment, artifact_dir)
    failed: set[str] = set()
    for message in received(conn):
        if message[0] == "close":
            break
        kind, request, name, args = message
        try:
            result = None if name == "flushed" else getattr(tracker, name)(*args)
            error = None
        except Exception as e:
            result, error = None, portable(e)
            if kind == "post" and name not in failed:  # once per kind of write: a store gone away fails them all
                failed.add(name)
                log.warning("MLflow %s failed (the sweep goes on; later failures of it are not shown): %s: %s",
                            name, type(e).__name__, e)
        if kind == "call":
            try:
                send(conn, lock, ("reply", request, result, error))
            except OSError:
                return
    conn.close()
