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
             ) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``mlflow ui`` in its own process group; returns the process and its URL once it answers."""
    port = port or free_port(host)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri,
           "--default-artifact-root", artifact_root, "--host", host, "--port", str(port)]
    # The server's log goes to a file: an unread pipe would block it once full.
    log = tempfile.NamedTemporaryFile(prefix="mlflow-ui-", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    url = f"http://{host}:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = Path(log.name).read_text(errors="replace")[-2000:]
            raise ConfigError(f"mlflow ui exited with code {proc.returncode} ({log.name}): {err}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.5)
    stop_ui(proc)
    raise RuntimeError(f"mlflow ui did not answer on {url} within 120 s")


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
