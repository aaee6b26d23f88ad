"""SIGINT and SIGTERM mid-trial: the trial is recorded as interrupted, nothing stays RUNNING, a rerun resumes."""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import psutil
import pytest
from optuna.trial import TrialState

from tests.conftest import ROOT, TINY, start_cli

# One process on any machine: on a GPU, workers.engines=auto would run the engines as worker processes.
LONG_TRIALS = ["train.max_steps=400", "train.eval_every=200", "study.n_trials=2", "search_space=none",
               "workers.engines=1"]


def running_trials(db: Path) -> int:
    """Read-only: opening the study through Optuna would create its tables, racing the launch doing the same."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
            return int(con.execute("SELECT count(*) FROM trials WHERE state = 'RUNNING'").fetchone()[0])
    except sqlite3.Error:  # not created yet
        return 0


@pytest.mark.timeout(600)
# One handler serves both signals: SIGINT one trial at a time, SIGTERM (a scheduler's) with trials in slots, with
# the engine in this process or its own (which the signal reaches too, and which leaves the stop to its parent).
@pytest.mark.parametrize(("sig", "code", "slots", "own_process"), [
    (signal.SIGINT, 130, 1, False), (signal.SIGTERM, 143, 2, False), (signal.SIGTERM, 143, 2, True)])
def test_a_signal_mid_trial_leaves_a_clean_record(tmp_path: Path, sig: signal.Signals, code: int, slots: int,
                                                  own_process: bool) -> None:
    from mlflow.tracking import MlflowClient

    args = [*TINY, *LONG_TRIALS, f"workers.slots={slots}", f"workers.engine_process={own_process}",
            f"output_dir={tmp_path}"]
    proc = start_cli("launch", "--no-progress", *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    try:
        deadline = time.monotonic() + 300
        while running_trials(tmp_path / "optuna.db") < slots:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.5)
        time.sleep(3)  # into the training steps (of every slot)
        # A scheduler (scancel) and the terminal (Ctrl-C) signal every process of the job: the engine's too.
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.send_signal(sig)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == code, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert sum("interrupted by" in line for line in err.splitlines()) == 1, err[-3000:]

    # Every trial is failed as interrupted; in slots a thread may have asked one more trial as the signal came.
    trials = optuna.load_study(study_name="qlora-default", storage=storage).trials
    assert len(trials) >= slots and {t.state for t in trials} == {TrialState.FAIL}
    assert {t.user_attrs["state_reason"] for t in trials} == {"interrupted"}
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("qlora-default").experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) >= slots and {r.info.status for r in runs} == {"KILLED"}  # the study's and the trials'
    assert {r.data.tags.get("state_reason") for r in children} == {"interrupted"}

    # The same command, with short trials, resumes the study and finishes its budget.
    rerun = subprocess.run([sys.executable, "-m", "sweeper", "launch", "--no-progress", *args,
                            "train.max_steps=2", "train.eval_every=1"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    states = [t.state for t in optuna.load_study(study_name="qlora-default", storage=storage).trials]
    assert sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states) == 2
    assert TrialState.RUNNING not in states
