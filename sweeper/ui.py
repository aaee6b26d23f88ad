"""Serve the MLflow UI on the sweep's store, bound to loopback unless told otherwise."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path
from types import FrameType
from typing import Any

import psutil

from objectives.config import ConfigError
from sweeper.interrupts import Interrupted

TRIALS_VIEW_ID = "sweeper-trials-by-eval-loss"
TRIALS_VIEW_NAME = "Trials by eval loss"
# Column ids as MLflow's runs table names them: the category, then the key in backticks.
TRIALS_VIEW_COLUMNS = ["tags.`trial_state`", "metrics.`final_eval_loss`", "metrics.`eval_loss`"]
# The order puts these columns next to the run names (the columns it leaves out follow them), and the page applies
# a width only to a column the order names: 150 px fits a full-precision loss, which the default 100 px cuts off.
TRIALS_VIEW_STATE = {
    "orderByKey": "metrics.`final_eval_loss`",
    "orderByAsc": True,
    "selectedColumns": TRIALS_VIEW_COLUMNS,
    "columnOrder": TRIALS_VIEW_COLUMNS,
    "columnWidths": {"metrics.`final_eval_loss`": 150, "metrics.`eval_loss`": 150},
}


def trials_view(tracking_uri: str, experiment_name: str) -> str | None:
    """Save the experiment's runs table sorted by final eval loss, with the trial state and eval loss columns,
    as a view named "Trials by eval loss"; returns the route that opens it, or None when the experiment does not
    exist yet.

    MLflow 3.17's runs page takes only its search, sort and filters from the URL: the columns come from the
    browser's storage or from a saved view. A saved view is an experiment tag ``mlflow.sharedViewState.<id>``
    holding ``{name, createdAt, updatedAt, state}`` (``state``: the page's sort, filters and column settings as a
    JSON string); the page's Views menu lists it and ``?viewStateShareKey=<id>`` opens it. The page ignores the
    view when the URL also carries a sort or filter, so the route carries only the key. Each call rewrites the tag,
    which keeps the view as defined here. Sorted by a metric, the table lists the trial runs flat rather than folded
    under the study's run (which has no eval loss and comes last), and trials without a final eval loss (pruned,
    failed) after the complete ones.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return None
    now_ms = int(time.time() * 1000)
    envelope = {"name": TRIALS_VIEW_NAME, "createdAt": now_ms, "updatedAt": now_ms,
                "state": json.dumps(TRIALS_VIEW_STATE)}
    client.set_experiment_tag(experiment.experiment_id, f"mlflow.sharedViewState.{TRIALS_VIEW_ID}",
                              json.dumps(envelope))
    return f"#/experiments/{experiment.experiment_id}/runs?viewStateShareKey={TRIALS_VIEW_ID}"


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def busy_port(host: str, port: int) -> str:
    return f"port {port} on {host} is in use by another process: pass another --port, or none for a free one"


def check_port(host: str, port: int) -> None:
    """Raise ConfigError, in one line, when the server could not listen on ``host:port``.

    Binds as uvicorn does (the family from the host's form, SO_REUSEADDR), so that a port left in TIME_WAIT by a
    server that just stopped counts as free, as it is to uvicorn.
    """
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ConfigError(busy_port(host, port)) from None
            raise ConfigError(f"--host {host} --port {port}: cannot listen there: {e.strerror or e}") from None


def server_command(tracking_uri: str, artifact_root: str, host: str, port: int) -> tuple[list[str], dict[str, str]]:
    """``mlflow ui``'s command line and environment.

    The store's URI may hold a password: any local user can read a process's command line (``ps``), only its
    owner its environment. MLflow 3.17's ``mlflow ui`` reads MLFLOW_BACKEND_STORE_URI and
    MLFLOW_DEFAULT_ARTIFACT_ROOT as its options' defaults, and hands them on to its uvicorn and job processes in
    their environment too.
    """
    cmd = [sys.executable, "-m", "mlflow", "ui", "--host", host, "--port", str(port)]
    env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": tracking_uri, "MLFLOW_DEFAULT_ARTIFACT_ROOT": artifact_root}
    return cmd, env


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StopSignals:
    """While active, SIGINT, SIGTERM and SIGHUP (a closed terminal or SSH session) raise :class:`Interrupted` in
    the main thread, so that the command stops its server and exits 128 + the signal's number.

    Inside ``held()`` a signal is only noted: ``check()`` raises it where the code can stop what it started, and the
    block's end at the latest; a server is then neither started without a handle to stop it nor stopped halfway.
    Only the first signal counts: a second one would cut short the stop the first began. A signal ignored on entry
    (``nohup``, a shell's background job) stays ignored, as the user asked.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._holding = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        for signum in STOP_SIGNALS:
            if signal.getsignal(signum) is not signal.SIG_IGN:
                self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            return
        self.received = signum
        if not self._holding:
            raise Interrupted(signum)

    def check(self) -> None:
        if self.received is not None:
            raise Interrupted(self.received)

    @contextmanager
    def held(self) -> Iterator[None]:
        before, holding = self.received, self._holding
        self._holding = True
        try:
            yield
        finally:
            self._holding = holding
        if before is None and not holding:
            self.check()


def start_ui(tracking_uri: str, artifact_root: str, host: str = "127.0.0.1", port: int | None = None,
             log_path: Path | None = None, signals: StopSignals | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``mlflow ui`` in its own process group; returns the process and its URL once it answers there.

    A port another process holds is a ConfigError, whether found before the start or lost to a server that took it
    meanwhile. The server's output goes to ``log_path``, overwritten at each start; without one, to an unnamed
    temporary file that disappears with the server. On any failure, or a signal from ``signals``, the server is
    stopped before the error goes on.
    """
    if port is None:
        port = free_port(host)
    else:
        check_port(host, port)
    cmd, env = server_command(tracking_uri, artifact_root, host, port)
    hold = signals.held if signals is not None else nullcontext
    # A file rather than a pipe: an unread pipe would block the server once full.
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "wb") if log_path is not None else tempfile.TemporaryFile()  # noqa: SIM115
    proc = None
    with log:  # the server holds its own descriptor to the file
        try:
            with hold():
                proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
            url = f"http://{host}:{port}"
            _wait_until_served(proc, host, port, url, log.fileno(), log_path, signals)
            return proc, url
        except BaseException:
            if proc is not None:
                with hold():
                    stop_ui(proc)
            raise


def _wait_until_served(proc: subprocess.Popen[bytes], host: str, port: int, url: str, log_fd: int,
                       log_path: Path | None, signals: StopSignals | None, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = _tail(log_fd)
            # Another process took the port after the check: MLflow logs uvicorn's bind error and exits 0.
            if os.strerror(errno.EADDRINUSE) in tail:
                raise ConfigError(busy_port(host, port))
            where = f", log: {log_path}" if log_path is not None else ""
            raise ConfigError(f"mlflow ui exited with code {proc.returncode}{where}: {tail}")
        # Whatever answers on the port may be another server; only a socket of ours makes it ours.
        if answers(url) and serves(proc, port):
            return
        if signals is not None:
            signals.check()
        time.sleep(0.5)
    raise RuntimeError(f"mlflow ui did not answer on {url} within {timeout_s:g} s")


def answers(url: str, timeout_s: float = 2.0) -> bool:
    """Whether an MLflow server answers its health check at ``url``."""
    try:
        with urllib.request.urlopen(url + "/health", timeout=timeout_s):
            return True
    except OSError:
        return False


def _tail(fd: int, size: int = 2000) -> str:
    # pread leaves the offset alone: the server's processes share it and may still be writing.
    end = os.fstat(fd).st_size
    return os.pread(fd, size, max(0, end - size)).decode(errors="replace")


def server_processes(proc: subprocess.Popen[bytes]) -> list[psutil.Process]:
    """The server's running processes: its process group, and, while its leader is not yet reaped (its pid cannot
    name another process), the leader's descendants that left the group (MLflow starts some jobs in sessions of
    their own)."""
    found: dict[int, psutil.Process] = {}
    if proc.returncode is None:
        with suppress(psutil.Error):
            leader = psutil.Process(proc.pid)
            found.update({p.pid: p for p in leader.children(recursive=True)})
            found[proc.pid] = leader
    for p in psutil.process_iter():
        with suppress(OSError):
            if os.getpgid(p.pid) == proc.pid:
                found.setdefault(p.pid, p)
    return [p for p in found.values() if alive(p)]


def alive(p: psutil.Process) -> bool:
    """Whether a process still runs (a zombie does not)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _listens(p: psutil.Process, port: int | None = None) -> bool:
    try:
        return any(c.status == psutil.CONN_LISTEN and c.laddr and port in (None, c.laddr.port)
                   for c in p.net_connections("tcp"))
    except psutil.Error:
        return False


def serves(proc: subprocess.Popen[bytes], port: int | None = None) -> bool:
    """Whether one of the server's processes listens on ``port`` (None: on any port)."""
    return any(_listens(p, port) for p in server_processes(proc))


def _signal(procs: Iterable[psutil.Process], signum: int) -> None:
    for p in procs:
        with suppress(psutil.Error):
            p.send_signal(signum)  # psutil checks first that the pid still names the same process


def stop_ui(proc: subprocess.Popen[bytes], grace_s: float = 10) -> None:
    """Stop the server and every process it started; returns once none of them runs.

    SIGTERM to the server, which MLflow hands on to uvicorn, and to its processes outside uvicorn's (MLflow's job
    consumers, which outlive the server, polling their queue, and slow everything else down meanwhile). uvicorn
    stops its workers itself: a SIGTERM that reaches them first has it start new ones in their place and wait for
    those. Once nothing listens, SIGTERM to whatever is left of the process group (the server's own exit takes long
    on a busy CPU) and to its descendants outside it; SIGKILL to whatever still runs ``grace_s`` later.
    """
    # Listed now, while the parent links still lead to the descendants outside the group.
    known = server_processes(proc)
    listening = [p for p in known if _listens(p)]
    uvicorn = set(listening)
    for p in listening:
        with suppress(psutil.Error):
            uvicorn.update(p.children(recursive=True))
    proc.terminate()
    _signal((p for p in known if p not in uvicorn and p.pid != proc.pid), signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while proc.poll() is None and serves(proc) and time.monotonic() < deadline:
        time.sleep(0.2)
    for signum in (signal.SIGTERM, signal.SIGKILL):
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signum)
        outside = []
        for p in known:
            with suppress(OSError):
                if os.getpgid(p.pid) != proc.pid:
                    outside.append(p)
        _signal(outside, signum)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            proc.poll()  # reaps the leader, this process's child
            known = [p for p in {*known, *server_processes(proc)} if alive(p)]
            if not known and proc.returncode is not None:
                return
            time.sleep(0.2)
    proc.wait()


def print_last(line: str) -> None:
    """Print the command's last line on stderr, where the terminal may be gone (SIGHUP).

    Then the write fails, and the same bytes, still buffered, would fail again at exit and turn the exit status
    into 120: what is left goes to /dev/null instead.
    """
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.dup2(devnull, sys.stderr.fileno())
