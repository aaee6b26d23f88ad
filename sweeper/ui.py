"""Serve the MLflow UI on the sweep's store, bound to loopback unless told otherwise."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from objectives.config import ConfigError


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def start_ui(tracking_uri: str, artifact_root: str, host: str = "127.0.0.1", port: int | None = None,
             log_path: Path | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``mlflow ui`` in its own process group; returns the process and its URL once it answers.

    The server's output goes to ``log_path``, overwritten at each start; without one, to an unnamed
    temporary file that disappears with the server.
    """
    port = port or free_port(host)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri,
           "--default-artifact-root", artifact_root, "--host", host, "--port", str(port)]
    # A file rather than a pipe: an unread pipe would block the server once full.
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "wb") if log_path is not None else tempfile.TemporaryFile()  # noqa: SIM115
    with log:  # the server holds its own descriptor to the file
        proc = subprocess.Popen(cmd, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://{host}:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                where = f", log: {log_path}" if log_path is not None else ""
                raise ConfigError(f"mlflow ui exited with code {proc.returncode}{where}: {_tail(log.fileno())}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2):
                    return proc, url
            except OSError:
                time.sleep(0.5)
        stop_ui(proc)
    raise RuntimeError(f"mlflow ui did not answer on {url} within 120 s")


def _tail(fd: int, size: int = 2000) -> str:
    # pread leaves the offset alone: the server's processes share it and may still be writing.
    end = os.fstat(fd).st_size
    return os.pread(fd, size, max(0, end - size)).decode(errors="replace")


def stop_ui(proc: subprocess.Popen[bytes]) -> None:
    """Stop the server and the worker processes it started (they share its process group)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
