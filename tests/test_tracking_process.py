"""MLflow writes from a process of their own (``sweeper.tracking_process``), against a real SQLite store."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from sweeper.tracking import Tracker
from sweeper.tracking_process import WriterTracker

ROOT = Path(__file__).resolve().parent.parent


def writer(tmp_path: Path) -> WriterTracker:
    return WriterTracker(Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "writer", tmp_path / "artifacts"))


def test_writes_reach_the_store_in_the_order_made(tmp_path: Path) -> None:
    tracker = writer(tmp_path)
    try:
        parent = tracker.start_run("study", tags={"kind": "study"})
        child = tracker.start_run("trial-0", parent_id=parent, tags={"trial_state": "running"},
                                  params={"lora.r": 8})
        tracker.log_params(child, {"config": {"optimizer": {"name": "adamw"}}})
        tracker.log_dict(child, {"lora": {"r": 8}}, "config.yaml")
        for step in (1, 2, 3):
            tracker.log_metrics(child, step, {"train_loss": 3.0 - step})
        tracker.flush(child, stale_after=60.0)  # written a moment ago: nothing to write yet
        tracker.set_tags(child, {"trial_state": "running", "note": "first"})
        tracker.end_run(child, "KILLED", tags={"trial_state": "pruned", "note": "second"})
        assert tracker.run_tags(child)["note"] == "second"  # a call answers after the writes before it
        uri = tracker.artifact_uri(child, "adapter")
    finally:
        tracker.close()
    assert not tracker.process.is_alive()
    client = MlflowClient(tracker.uri)
    run = client.get_run(child)
    assert run.info.status == "KILLED"
    assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags["trial_state"] == "pruned"
    assert run.data.params == {"lora.r": "8", "config.optimizer.name": "adamw"}
    assert [m.value for m in client.get_metric_history(child, "train_loss")] == [2.0, 1.0, 0.0]
    config = Path(client.download_artifacts(child, "config.yaml", str(tmp_path / "dl")))
    assert yaml.safe_load(config.read_text()) == {"lora": {"r": 8}}
    assert uri == f"{run.info.artifact_uri}/adapter"


def test_a_failed_write_is_logged_and_the_writes_after_it_are_made(tmp_path: Path) -> None:
    tracker = writer(tmp_path)
    try:
        run_id = tracker.start_run("trial-0")
        tracker.set_tags("0" * 32, {"lost": "yes"})  # no such run: fails in the child
        tracker.end_run(run_id)
        with pytest.raises(MlflowException):  # a call's failure reaches its caller
            tracker.run_tags("0" * 32)
    finally:
        tracker.close()
    assert MlflowClient(tracker.uri).get_run(run_id).info.status == "FINISHED"


def test_writes_sent_before_the_launch_was_killed_are_made(tmp_path: Path) -> None:
    """SIGKILL leaves no time to close the writer: the writes in the pipe are made all the same."""
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from sweeper.tracking import Tracker\n"
        "from sweeper.tracking_process import WriterTracker\n"
        "out = Path(sys.argv[1])\n"
        "tracker = WriterTracker(Tracker(f'sqlite:///{out}/mlflow.db', 'killed', out / 'artifacts'))\n"
        "run_id = tracker.start_run('trial-0', params={'lora.r': 16})\n"
        "tracker.log_metrics(run_id, 1, {'train_loss': 1.5})\n"
        "tracker.end_run(run_id, 'FINISHED', tags={'trial_state': 'complete'})\n"
        "print(run_id, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == -9, done.stderr
    run_id = done.stdout.split()[0]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    for _ in range(100):  # the orphaned writer finishes on its own time
        run = client.get_run(run_id)
        if run.info.status == "FINISHED":
            break
        time.sleep(0.2)
    assert run.info.status == "FINISHED" and run.data.tags["trial_state"] == "complete"
    assert run.data.params == {"lora.r": "16"} and run.data.metrics == {"train_loss": 1.5}
