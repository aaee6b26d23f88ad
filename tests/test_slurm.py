"""Sweeps on SLURM: workers as one job array on a real one-node cluster, a real PostgreSQL for the study and MLflow.

The cluster is started here when none answers (``tests/slurm_cluster.py``); when it cannot start, the tests fail
and say why (``QLORA_SWEEP_SKIP_SLURM=1`` skips them instead).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from submitit import JobEnvironment

from objectives.config import ConfigError
from sweeper import cli, interrupts
from sweeper.config import LauncherConfig
from sweeper.records import TrialRecord, record
from sweeper.report import report_table
from sweeper.slurm import recover_trials
from sweeper.study import DeadTrialHandler
from sweeper.ui import free_port
from tests import slurm_cluster
from tests.conftest import TINY, child_runs_of, run_cli

SPACE = ["search_space=none", "lora.r=choice(2,4)", "lora.targets=choice(qk,all-linear)",
         "optimizer.lr=tag(log, interval(1e-4, 1e-2))", "study/sampler=random"]
FAST_HEARTBEAT = ["workers.heartbeat_s=1", "workers.grace_s=10", "workers.poll_s=0.5"]
# One core and a little memory per task, no GPU: both workers fit this machine's node at once.
ON_SLURM = ["launcher=slurm", "launcher.gpus_per_worker=0", "launcher.cpus_per_worker=1", "launcher.mem_gb=2",
            "launcher.time_min=15"]
ARRAY_TIMEOUT_S = 800  # a bound for a hung array, not a speed check: the tasks take 2-4 minutes


@pytest.fixture(scope="session")
def slurm() -> Iterator[None]:
    """A SLURM cluster that runs jobs; SLURM_CONF points this process and its children at it."""
    if os.environ.get("QLORA_SWEEP_SKIP_SLURM") == "1":
        pytest.skip("QLORA_SWEEP_SKIP_SLURM=1")
    try:
        cluster = slurm_cluster.start()
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        pytest.fail(f"SLURM cannot start on this machine: {e}\n(or set QLORA_SWEEP_SKIP_SLURM=1 to skip the SLURM "
                    "tests)", pytrace=False)
    with pytest.MonkeyPatch.context() as patch:
        for key, value in cluster.env.items():
            patch.setenv(key, value)
        try:
            yield
        finally:
            cluster.stop()


def launch(*args: str) -> tuple[int, str]:
    """``launch`` in this process, as a user runs it; (exit code, stderr)."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main(["launch", *TINY, *SPACE, *args, "--no-progress"])
    return code, err.getvalue()


def squeue(*args: str) -> list[str]:
    done = subprocess.run(["squeue", "--noheader", *args], capture_output=True, text=True, timeout=60)
    return done.stdout.split() if done.returncode == 0 else []


def submitted(stdout: str) -> str:
    found = re.search(r"submitted SLURM job array (\d+)", stdout)
    assert found, stdout
    return found.group(1)


def wait_for(array: str, folder: Path, timeout: float = ARRAY_TIMEOUT_S) -> None:
    """Until every task of the array has ended; on a timeout, cancel it and show the tasks' logs."""
    deadline = time.monotonic() + timeout
    while squeue("--jobs", array, "--format=%i"):
        if time.monotonic() > deadline:
            subprocess.run(["scancel", array], timeout=60)
            pytest.fail(f"job array {array} still runs after {timeout} s:{logs(folder)}")
        time.sleep(1)


def logs(folder: Path) -> str:
    return "".join(f"\n--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-25:])
                   for p in sorted(folder.glob("*.out")))


# --- checks that need no cluster ------------------------------------------------------------------------------


@pytest.mark.parametrize(("settings", "message"), [
    ({"name": "kubernetes"}, r"^launcher\.name: 'kubernetes' is not allowed; choose one of local, slurm"),
    ({"time_min": 0}, r"^launcher\.time_min: must be > 0"),
    ({"gpus_per_worker": 2}, r"^launcher\.gpus_per_worker: a worker trains on one device"),
    ({"cpus_per_worker": 0}, r"^launcher\.cpus_per_worker: must be > 0"),
    ({"mem_gb": -1.0}, r"^launcher\.mem_gb: must be > 0"),
    ({"array_parallelism": 0}, r"^launcher\.array_parallelism: must be > 0"),
    ({"additional_parameters": {"exclude": ["a", "b"]}}, r"^launcher\.additional_parameters\.exclude: an sbatch"),
])
def test_launcher_settings_are_checked_where_they_are_set(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        LauncherConfig(**settings)


@pytest.mark.parametrize(("stores", "message"), [
    ([], r"study\.storage: unset, which keeps the study in SQLite under output_dir, but every array task opens "
         r"the same study"),
    (["study.storage=sqlite:///{tmp}/optuna.db"], r"study\.storage: SQLite, but .* use study\.storage=postgresql://"),
    (["study.storage=journal:{tmp}/optuna.journal"], r"tracking\.uri: unset, which logs to SQLite under output_dir"),
    (["study.storage=postgresql://sweeper:hunter2@127.0.0.1:{port}/optuna", "tracking.uri=http://127.0.0.1:{port}"],
     r"study\.storage: cannot open"),
])
def test_stores_the_nodes_cannot_share_or_reach_are_refused_before_submitting(
        stores: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [s.format(tmp=tmp_path, port=free_port("127.0.0.1")) for s in stores]
    code, err = launch(*ON_SLURM, "workers.count=2", *args, f"output_dir={tmp_path}")
    assert code == 2, err
    assert re.search(message, err), err
    assert "hunter2" not in err + capsys.readouterr().out
    assert not (tmp_path / "slurm").exists()


def test_a_launch_without_sbatch_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    code, err = launch(*ON_SLURM, "workers.count=2", f"study.storage=journal:{tmp_path}/optuna.journal",
                       f"tracking.uri=file://{tmp_path}/mlruns", f"output_dir={tmp_path}")
    assert code == 2
    assert "launcher.name: slurm needs SLURM's sbatch, which is not on PATH" in err


def test_plan_shows_what_each_array_task_asks_for(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["plan", *TINY, "launcher=slurm", "workers.count=4", "launcher.partition=gpu",
                     "launcher.array_parallelism=2", "launcher.additional_parameters.constraint=h100",
                     "--device-memory-gb", "80"]) == 0
    out = capsys.readouterr().out
    assert ("SLURM: 4 workers as one job array on partition gpu, 2 at once; each task asks for 1 GPU, 8 CPUs, "
            "32 GB and 240 min (--constraint=h100)") in out
    assert re.search(r"each worker: 80\.00 GiB of its GPU's memory for its trials, \d+ trials? per pass", out), out


def test_a_stopped_workers_trials_are_retried_once_and_only_while_the_budget_is_open() -> None:
    """Running trials of the worker, and those it recorded as interrupted (SIGTERM), are failed and enqueued again;
    its real failures and other workers' trials are left alone."""
    study = optuna.create_study()
    handler = DeadTrialHandler(max_retry=2, tracking_uri=None)

    def trial_of(worker: str, state: TrialState | None = None, reason: str | None = None) -> int:
        trial = study.ask()
        trial.suggest_int("lora.r", 2, 64)
        record(trial, worker=worker, slurm_job="7_0")
        if reason is not None:
            record(trial, state_reason=reason)
        if state is not None:
            study.tell(trial, state=state)
        return trial.number

    running = trial_of("node1:10")
    interrupted = trial_of("node1:10", TrialState.FAIL, interrupts.REASON)
    trial_of("node1:10", TrialState.FAIL, "ValueError: bad data")
    trial_of("node2:10")
    assert sorted(recover_trials(study, "node1:10", handler, budget=4)) == [running, interrupted]
    assert sorted(TrialRecord.of(t).retry_of for t in study.get_trials(states=(TrialState.WAITING,))) == [
        running, interrupted]
    assert recover_trials(study, "node1:10", handler, budget=4) == []  # once

    late = trial_of("node3:10", TrialState.FAIL, interrupts.REASON)
    for _ in range(4):
        study.tell(study.ask(), 1.0)
    assert recover_trials(study, "node3:10", handler, budget=4) == []  # the budget is finished: nothing to retry
    assert late not in {TrialRecord.of(t).retry_of for t in study.trials}


def test_report_shows_the_job_that_ran_each_trial() -> None:
    study = optuna.create_study()
    for job in ("7_0", "7_1"):
        trial = study.ask()
        record(trial, slurm_job=job)
        study.tell(trial, 1.0)
    lines = report_table(study, color=False).splitlines()
    assert lines[1].split()[-2:] == ["slurm", "job"]
    assert [line.split()[-1] for line in lines[3:5]] == ["7_0", "7_1"]


# --- on the cluster -------------------------------------------------------------------------------------------


@pytest.mark.slurm
def test_an_unknown_partition_is_refused_with_the_partitions_that_exist(slurm: None, tmp_path: Path) -> None:
    before = squeue("--format=%i")
    code, err = launch(*ON_SLURM, "workers.count=2", "launcher.partition=no-such-partition",
                       f"study.storage=journal:{tmp_path}/optuna.journal", f"tracking.uri=file://{tmp_path}/mlruns",
                       f"output_dir={tmp_path}")
    assert code == 2
    assert re.search(r"launcher\.partition: no partition 'no-such-partition' on this cluster; it has: \S+", err), err
    assert squeue("--format=%i") == before
    assert not (tmp_path / "slurm").exists() and not (tmp_path / "optuna.journal").exists()


@pytest.mark.slurm
@pytest.mark.postgres
def test_what_sbatch_refuses_is_reported_and_nothing_is_left_queued(slurm: None, postgres: str,
                                                                    tmp_path: Path) -> None:
    before = squeue("--format=%i")
    tracking = f"{postgres}/mlflow"
    code, err = launch(*ON_SLURM, "workers.count=2", "study.name=refused", "launcher.additional_parameters.no_such=1",
                       f"study.storage={postgres}/optuna", f"tracking.uri={tracking}", f"output_dir={tmp_path}")
    assert code == 2
    assert "launcher: sbatch refused the job array: sbatch: unrecognized option '--no-such=1'" in err, err
    assert squeue("--format=%i") == before
    assert not list((tmp_path / "slurm").glob("workers-*"))  # the configs with the password are gone
    client = MlflowClient(tracking)
    (parent,) = client.search_runs([client.get_experiment_by_name("refused").experiment_id])
    assert parent.info.status == "FAILED"


@pytest.mark.slurm
@pytest.mark.postgres
def test_two_array_tasks_finish_exactly_the_budget(slurm: None, postgres: str, tmp_path: Path) -> None:
    storage, tracking = f"{postgres}/optuna", f"{postgres}/mlflow"
    password = postgres.split(":")[2].split("@")[0]
    result = run_cli("launch", *TINY, *SPACE, *ON_SLURM, *FAST_HEARTBEAT, "study.n_trials=4", "workers.count=2",
                     f"study.storage={storage}", f"tracking.uri={tracking}", f"output_dir={tmp_path}", "--no-progress",
                     timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    array = submitted(result.stdout)
    assert f"squeue -j {array}" in result.stdout and password not in result.stdout + result.stderr
    folder = tmp_path / "slurm"
    wait_for(array, folder)

    study = optuna.load_study(study_name="qlora-default", storage=storage)
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 4, logs(folder)
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
    jobs = {TrialRecord.of(t).slurm_job for t in finished}
    assert jobs <= {f"{array}_0", f"{array}_1"}, jobs
    ran = [t for t in study.trials if not TrialRecord.of(t).surplus]
    run_ids = [TrialRecord.of(t).mlflow_run_id for t in ran]
    kids = child_runs_of(tracking, "qlora-default")
    assert sorted(r.info.run_id for r in kids) == sorted(run_ids)  # one child run per trial
    assert {r.data.tags["slurm_job"] for r in kids} == {TrialRecord.of(t).slurm_job for t in ran}
    client = MlflowClient(tracking)
    parent = client.get_run(kids[0].data.tags["mlflow.parentRunId"])
    assert (parent.info.status, parent.data.tags["slurm_job"]) == ("FINISHED", array)

    # Nothing the nodes read carries the password: the configs are gone, the scripts and pickles name a path.
    assert not list(folder.glob("workers-*"))
    for path in folder.rglob("*"):
        assert not path.is_file() or password.encode() not in path.read_bytes(), path
    report = run_cli("report", "study.name=qlora-default", f"study.storage={storage}", timeout=120)
    assert report.returncode == 0, report.stderr[-2000:]
    assert "slurm job" in report.stdout and f"{array}_" in report.stdout


def running_trial(study: optuna.Study, folder: Path, job: str | None = None) -> optuna.trial.FrozenTrial:
    """A trial that is training now (its MLflow run exists), in any array task or in task ``job``."""
    deadline = time.monotonic() + ARRAY_TIMEOUT_S
    while True:
        for trial in study.get_trials(states=(TrialState.RUNNING,)):
            record = TrialRecord.of(trial)
            if record.slurm_job and record.mlflow_run_id and job in (None, record.slurm_job):
                return trial
        assert time.monotonic() < deadline, f"no trial is training:{logs(folder)}"
        time.sleep(0.5)


@pytest.mark.slurm
@pytest.mark.postgres
def test_cancelled_and_requeued_tasks_trials_are_retried_and_the_budget_stays_exact(
        slurm: None, postgres: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``scancel`` of one task mid-trial; then the signal SLURM sends before a time limit to the other, which
    submitit requeues and which joins the study again. Each lost trial is failed, retried once, and counted once.

    The tasks' ``scontrol`` exits a few seconds late after a requeue, as on a busy node: SLURM's SIGTERM for the
    requeue reaches it first, and the requeue must still read as one."""
    slow = tmp_path / "bin"
    slow.mkdir()
    (slow / "scontrol").write_text(f'#!/bin/sh\n{shutil.which("scontrol")} "$@"; rc=$?\n'
                                   '[ "$1" = requeue ] && sleep 3\nexit $rc\n')
    (slow / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{slow}{os.pathsep}{os.environ['PATH']}")
    storage, tracking = f"{postgres}/optuna2", f"{postgres}/mlflow2"
    # Trials of some seconds, none pruned: each signal lands in the middle of one.
    result = run_cli("launch", *TINY, *SPACE, *ON_SLURM, *FAST_HEARTBEAT, "study.n_trials=4", "workers.count=2",
                     "train.max_steps=60", "train.eval_every=30", "study/pruner=none", "tracking.log_adapter=none",
                     f"study.storage={storage}", f"tracking.uri={tracking}", f"output_dir={tmp_path}", "--no-progress",
                     timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    array = submitted(result.stdout)
    folder = tmp_path / "slurm"
    (configs,) = folder.glob("workers-*")
    assert stat.S_IMODE(configs.stat().st_mode) == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in configs.iterdir()} == {0o600}

    study = optuna.load_study(study_name="qlora-default", storage=storage)
    cancelled = running_trial(study, folder)
    gone = TrialRecord.of(cancelled).slurm_job
    assert gone is not None
    subprocess.run(["scancel", gone], check=True, timeout=60)
    survivor = f"{array}_1" if gone == f"{array}_0" else f"{array}_0"
    requeued = running_trial(study, folder, survivor)
    subprocess.run(["scancel", f"--signal={JobEnvironment.USR_SIG}", survivor], check=True, timeout=60)
    wait_for(array, folder)

    trials = study.get_trials()
    by_number = {t.number: t for t in trials}
    client = MlflowClient(tracking)
    lost_numbers = {cancelled.number, requeued.number}
    for lost in (cancelled, requeued):
        assert by_number[lost.number].state == TrialState.FAIL, logs(folder)
        (retry,) = [t for t in trials if TrialRecord.of(t).retry_of == lost.number]
        assert retry.params == lost.params
        # The survivor may start (or finish its own trial) only after the cancel, and then its first trial is the
        # cancelled trial's retry: that retry is lost in turn and has its own retry.
        assert retry.state in (TrialState.COMPLETE, TrialState.PRUNED) or retry.number in lost_numbers, logs(folder)
        assert client.get_run(TrialRecord.of(lost).mlflow_run_id).info.status == "KILLED"
    survivor_log = (folder / f"{survivor}_0_log.out").read_text()
    assert f"Requeued job {survivor}" in survivor_log, logs(folder)
    assert survivor_log.count(f"Starting with JobEnvironment(job_id={survivor},") == 2, logs(folder)
    assert "triggered an exception" not in survivor_log, logs(folder)
    assert {TrialRecord.of(t).slurm_job for t in trials if t.number > requeued.number} == {survivor}
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == 4
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    ran = [t for t in trials if not TrialRecord.of(t).surplus]
    kids = child_runs_of(tracking, "qlora-default")
    assert sorted(r.info.run_id for r in kids) == sorted(TrialRecord.of(t).mlflow_run_id for t in ran)
    assert client.get_run(kids[0].data.tags["mlflow.parentRunId"]).info.status == "FINISHED"
