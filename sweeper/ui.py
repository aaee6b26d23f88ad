"""Serve the MLflow UI on the sweep's store, bound to loopback unless told otherwise."""

from __future__ import annotations

import json
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
