"""``sweeper ui`` as a user runs it: the store's URI stays off every command line, a port another process holds is
refused in one line, and SIGINT, SIGTERM or SIGHUP (a closed terminal) stop the server with every process it
started. Each server takes ~20 s to answer on 2 CPU cores."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import signal
import socket
import subprocess
import sys
import termios
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from objectives.config import ConfigError
from sweeper import ui
from sweeper.interrupts import Interrupted
from sweeper.ui import STOP_SIGNALS, StopSignals, answers, server_command, start_ui, stop_ui
from tests.conftest import ROOT, run_cli

POSTGRES_URI = "postgresql://u:secretpw@127.0.0.1:5432/db"


def _busy(port: int) -> str:
    return f"error: port {port} on 127.0.0.1 is in use by another process: pass another --port, or none for a free one"


def test_the_store_uri_reaches_the_server_through_its_environment() -> None:
    cmd, env = server_command(POSTGRES_URI, "file:///srv/artifacts", "127.0.0.1", 5000)
    assert not [part for part in cmd if "secretpw" in part or "postgresql" in part], cmd
    assert env["MLFLOW_BACKEND_STORE_URI"] == POSTGRES_URI
    assert env["MLFLOW_DEFAULT_ARTIFACT_ROOT"] == "file:///srv/artifacts"
    assert cmd[-4:] == ["--host", "127.0.0.1", "--port", "5000"]


def test_a_signal_in_a_held_block_is_raised_at_its_end_and_only_the_first_counts() -> None:
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    try:
        before = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
        reached = []
        with StopSignals() as signals, pytest.raises(Interrupted) as stopped:
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN  # an ignored signal stays ignored
            with signals.held():
                os.kill(os.getpid(), signal.SIGTERM)
                reached.append("after the first")
                os.kill(os.getpid(), signal.SIGINT)  # a second one neither raises nor replaces the first
                reached.append("after the second")
        assert reached == ["after the first", "after the second"]
        assert stopped.value.exit_code == 128 + signal.SIGTERM
        assert {signum: signal.getsignal(signum) for signum in STOP_SIGNALS} == before
    finally:
        signal.signal(signal.SIGHUP, previous)


@dataclass
class Running:
    """A ``sweeper ui`` that printed its URL, and the server processes it had started by then."""

    proc: subprocess.Popen[bytes]
    url: str
    lines: list[str]
    server: list[psutil.Process] = field(default_factory=list)
    groups: set[int] = field(default_factory=set)

    @property
    def port(self) -> int:
        port = urllib.parse.urlsplit(self.url).port
        assert port is not None
        return port


def _default_stop_signals() -> None:
    # A shell that runs the tests in the background leaves SIGINT ignored, and `ui` keeps a signal it finds ignored.
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)


def _in_a_terminal() -> None:
    _default_stop_signals()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)  # the new session's controlling terminal: its hangup sends SIGHUP


def _lines(fd: int) -> Iterator[str]:
    pending = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO from a terminal whose other side is gone
            return
        if not chunk:
            return
        pending += chunk
        *lines, pending = pending.split(b"\n")
        yield from (line.decode(errors="replace").rstrip("\r") for line in lines)


@contextmanager
def sweeper_ui(*args: str, terminal: bool = False) -> Iterator[Running]:
    """``python -m sweeper ui ARGS`` with its output on pipes, or on a terminal of its own (the master end then comes
    along as ``running.proc.stdout``); yields once it printed its URL. Whatever is left running at the end is
    killed, the server's process groups included, so that a failed test leaves nothing behind."""
    cmd = [sys.executable, "-m", "sweeper", "ui", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if terminal:
        master, slave = pty.openpty()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=slave, stdout=slave, stderr=slave,
                                start_new_session=True, preexec_fn=_in_a_terminal)
        os.close(slave)
        proc.stdout = os.fdopen(master, "rb", buffering=0)
        read_fd = master
    else:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                preexec_fn=_default_stop_signals)
        assert proc.stdout is not None
        read_fd = proc.stdout.fileno()
    lines: list[str] = []
    running = None
    try:
        # No timeout needed: the command gives up by itself when its server does not answer within 120 s.
        for line in _lines(read_fd):
            lines.append(line)
            if line.startswith("MLflow UI for "):
                running = Running(proc, re.findall(r"https?://\S+", line)[-1], lines)
                running.server = psutil.Process(proc.pid).children(recursive=True)
                running.groups = {os.getpgid(p.pid) for p in running.server} - {os.getpgrp()}
                yield running
                break
        else:
            pytest.fail(f"`sweeper ui` exited with code {proc.wait()} before printing its URL:\n"
                        + "\n".join(lines)[-3000:], pytrace=False)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        for group in running.groups if running is not None else ():
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)


def _members(groups: set[int]) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        with suppress(OSError):
            if os.getpgid(p.pid) in groups and ui.alive(p):
                found.append(p)
    return found


def assert_all_gone(running: Running) -> None:
    """No process the server had started runs, none is left in its process group, and its port is free."""
    assert running.groups and len(running.server) > 5, running.server  # uvicorn's workers, MLflow's job consumers
    assert not [p for p in running.server if ui.alive(p)]
    assert not _members(running.groups)
    assert not answers(running.url, timeout_s=5)
    ui.check_port("127.0.0.1", running.port)  # raises when anything still listens there


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_signal_stops_every_server_process_and_frees_the_port(signum: int, tmp_path: Path) -> None:
    with sweeper_ui(f"output_dir={tmp_path}") as running:
        assert answers(running.url, timeout_s=5)
        running.proc.send_signal(signum)
        assert running.proc.wait(timeout=120) == 128 + signum
        assert running.proc.stdout is not None
        rest = running.proc.stdout.read().decode().splitlines()
    name = signal.Signals(signum).name
    assert [line for line in rest if not line.startswith("trials, ")] == [
        f"{name}: stopped the MLflow UI server and all its processes"]
    assert_all_gone(running)


def test_a_closed_terminal_stops_every_server_process_and_frees_the_port(tmp_path: Path) -> None:
    """The terminal's hangup sends SIGHUP; the command's last line then has nowhere to go, which must not change
    its exit status."""
    with sweeper_ui(f"output_dir={tmp_path}", terminal=True) as running:
        assert answers(running.url, timeout_s=5)
        assert running.proc.stdout is not None
        running.proc.stdout.close()  # the master end: the terminal closes
        assert running.proc.wait(timeout=120) == 128 + signal.SIGHUP
    assert_all_gone(running)


def test_a_port_held_by_a_plain_socket_is_refused_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        done = run_cli("ui", f"output_dir={tmp_path}", "--port", str(port), timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.splitlines() == [_busy(port)]
    assert "MLflow UI for" not in done.stdout


@pytest.fixture(scope="module")
def other_ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Another MLflow UI, on a store of its own that holds an experiment named "the-other-store"; yields its URL."""
    root = tmp_path_factory.mktemp("other-ui")
    store = f"sqlite:///{root / 'mlflow.db'}"
    MlflowClient(store).create_experiment("the-other-store")
    proc, url = start_ui(store, (root / "artifacts").as_uri())
    try:
        yield url
    finally:
        stop_ui(proc)


def _serves_the_other_store(url: str) -> bool:
    query = urllib.parse.urlencode({"experiment_name": "the-other-store"})
    with urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/get-by-name?{query}", timeout=30) as reply:
        return reply.status == 200


def test_a_port_held_by_another_mlflow_ui_is_refused_in_one_line(other_ui: str, tmp_path: Path) -> None:
    port = urllib.parse.urlsplit(other_ui).port
    assert port is not None
    done = run_cli("ui", f"output_dir={tmp_path}", "--port", str(port), timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.splitlines() == [_busy(port)]
    assert "MLflow UI for" not in done.stdout
    assert _serves_the_other_store(other_ui)


def test_another_mlflow_ui_that_took_the_port_after_the_check_is_not_taken_for_ours(
        other_ui: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server answering on the port after our start is the other one: the start fails with the busy port."""
    port = urllib.parse.urlsplit(other_ui).port
    assert port is not None
    monkeypatch.setattr(ui, "check_port", lambda host, port: None)  # as if the other server came just after it
    stopped: list[int] = []

    def stop_and_note(proc: subprocess.Popen[bytes]) -> None:
        stop_ui(proc)
        stopped.append(proc.pid)

    monkeypatch.setattr(ui, "stop_ui", stop_and_note)
    with pytest.raises(ConfigError) as failed:
        start_ui(f"sqlite:///{tmp_path / 'mlflow.db'}", (tmp_path / "artifacts").as_uri(), port=port)
    assert f"error: {failed.value}" == _busy(port)
    assert _serves_the_other_store(other_ui)
    assert len(stopped) == 1 and not _members(set(stopped))  # the failed server's processes are stopped too


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


@pytest.mark.postgres
def test_the_password_of_a_postgres_store_is_on_no_server_command_line(postgres: str, tmp_path: Path) -> None:
    uri = f"{postgres}/mlflow"
    password = urllib.parse.urlsplit(uri).password
    assert password
    with sweeper_ui(f"tracking.uri={uri}", f"output_dir={tmp_path}") as running:
        assert running.server
        for p in running.server:
            assert password not in " ".join(_cmdline(p)), _cmdline(p)
        assert password not in "\n".join(running.lines)
        running.proc.send_signal(signal.SIGTERM)
        assert running.proc.wait(timeout=120) == 128 + signal.SIGTERM
    assert_all_gone(running)
