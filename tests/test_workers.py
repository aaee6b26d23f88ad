"""Many trials in one worker, and many workers on one study: PostgreSQL and journal storages, kills."""

from __future__ import annotations

import os
import signal
import stat
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from objectives.config import ConfigError
from sweeper import compose
from sweeper.config import WorkersConfig, to_container
from sweeper.launch import run_sweep
from sweeper.records import TrialRecord, record
from sweeper.study import DeadTrialHandler, fail_trials_of, open_study
from sweeper.tracking import make_tracker, parent_run
from sweeper.workers import gpu_slots
from tests.conftest import TINY, child_runs_of, run_cli, start_cli

SPACE = ["search_space=none", "lora.r=choice(2,4)", "lora.targets=choice(qk,all-linear)",
         "optimizer.lr=tag(log, interval(1e-4, 1e-2))"]
FAST_HEARTBEAT = ["workers.heartbeat_s=1", "workers.grace_s=4", "workers.poll_s=0.5"]


@pytest.mark.parametrize(("count", "gpus", "per_gpu", "expected"), [
    (2, [], 4, [None, None]),  # the CPU: as many workers as asked
    (3, ["0", "1"], 1, ["0", "1"]),  # one per GPU by default
    (3, ["0", "1"], 4, ["0", "1", "0"]),  # round-robin: the GPUs fill evenly
    (9, ["2", "5"], 4, ["2", "5"] * 4),  # at most per_gpu on each
    (4, ["3"], 4, ["3"] * 4),
])
def test_workers_fill_the_gpus_round_robin(count: int, gpus: list[str], per_gpu: int,
                                           expected: list[str | None]) -> None:
    assert gpu_slots(count, gpus, per_gpu) == expected


def test_workers_sharing_a_gpu_plan_for_their_share_of_its_memory() -> None:
    assert WorkersConfig(count=4, per_gpu=4).memory_share(100) == 25
    assert WorkersConfig(count=0, per_gpu=4).memory_share(100) == 100  # trials in this process: the whole device
    assert WorkersConfig(count=2).memory_share(100) == 100


def test_memory_stays_flat_over_many_trials(tmp_path: Path) -> None:
    """Adapters come and go (same and changing shapes); the process does not grow trial over trial."""
    cfg, params = compose.load([*TINY, *SPACE, "train.max_steps=1", "study.n_trials=14", "study/sampler=random",
                                "study/pruner=none", f"output_dir={tmp_path}", "tracking.log_adapter=none"])
    study = run_sweep(cfg, params, show_progress=False)
    memory = [t.user_attrs["worker_memory_mb"] for t in sorted(study.trials, key=lambda t: t.number)]
    # The first trials warm up allocators and caches. After that a leak grows trial over trial, where the
    # allocator's arenas step up and down by about 24 MB: the later trials' median stays within 48 MB.
    settled = memory[4:]
    half = len(settled) // 2
    assert statistics.median(settled[half:]) - statistics.median(settled[:half]) < 48, memory
    assert max(settled) - min(settled) < 96, memory


class ExitedWorker:
    """A worker process that has already ended cleanly."""

    pid = 0

    def poll(self) -> int:
        return 0

    def wait(self, timeout: float | None = None) -> int:
        return 0


@pytest.mark.filterwarnings("ignore:Query string argument")  # SQLite ignores the password; it only has to travel
def test_launched_workers_get_their_settings_in_a_private_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The launch's settings, a storage password among them, reach each worker in a file of mode 0600 under the
    output dir: no command line carries them (``ps`` shows those to all users), no SWEEPER_* variable exists."""
    from sweeper import cli, workers

    storage = f"sqlite:///{tmp_path / 'optuna.db'}?password=hunter2"
    launch = [*TINY, *SPACE, "workers.count=2", f"study.storage='{storage}'", f"output_dir={tmp_path}"]
    expected = to_container(compose.load(launch)[0])
    popen = subprocess.Popen
    started: list[tuple[list[str], dict[str, str]]] = []

    def start_worker(cmd: list[str], *args: Any, env: dict[str, str] | None = None, **kwargs: Any) -> Any:
        if cmd[1:4] != ["-m", "sweeper", "worker"]:
            return popen(cmd, *args, env=env, **kwargs)
        index = len(started)
        started.append((cmd, dict(os.environ if env is None else env)))
        config = Path(cmd[cmd.index("--config") + 1])
        assert config.parent == tmp_path / "workers"
        assert stat.S_IMODE(config.stat().st_mode) == 0o600
        cfg, params = compose.load([], config)
        assert (cfg.workers.index, cfg.workers.supervised, cfg.storage_url) == (index, True, storage)
        assert to_container(cfg) == {**expected, "workers": {**expected["workers"], "index": index, "supervised": True}}
        # As the worker would join: the same search space and fixed settings as the launch, or a ConfigError.
        open_study(cfg, params, create=False)
        return ExitedWorker()

    monkeypatch.setattr(workers.subprocess, "Popen", start_worker)
    assert cli.main(["launch", *launch, "--no-progress"]) == 0
    assert len(started) == 2
    for cmd, env in started:
        assert not [k for k in env if k.startswith("SWEEPER_")]
        assert "hunter2" not in " ".join(cmd) and "hunter2" not in " ".join(env.values())
    assert not list((tmp_path / "workers").glob("*.yaml"))  # no copy of the password outlives the launch


def test_a_dead_workers_trial_is_failed_once_and_retried_with_a_fresh_record(tmp_path: Path) -> None:
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    other_view = optuna.load_study(study_name=study.study_name, storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    handler = DeadTrialHandler(max_retry=1, tracking_uri=None)

    def run_trial(worker: str) -> optuna.Trial:
        trial = study.ask()
        trial.suggest_int("lora.r", 2, 64)
        record(trial, worker=worker, mlflow_run_id=f"run-{trial.number}", oom_retries=1)
        return trial

    dead = run_trial("host:1")
    assert fail_trials_of(study, "host:1".__eq__, handler) == [dead.number]
    (retry,) = study.get_trials(states=(TrialState.WAITING,))
    assert retry.params == dead.params
    assert TrialRecord.of(retry) == TrialRecord(retry_of=dead.number, retry_reason=DeadTrialHandler.REASON)
    assert retry.system_attrs["retry_history"] == [dead.number]  # Optuna's own retry bookkeeping

    # The retry dies too: with max_retry=1 it stays failed.
    again = study.ask()
    assert again.number == retry.number
    record(again, worker="host:2")
    assert fail_trials_of(study, "host:2".__eq__, handler) == [again.number]
    assert not study.get_trials(states=(TrialState.WAITING,))

    # A heartbeat check fails a trial between the listing and the tell: it is not failed, nor retried, twice.
    raced = run_trial("host:3")

    def failed_elsewhere(worker: str) -> bool:
        other_view.tell(raced.number, state=TrialState.FAIL)
        return True

    assert fail_trials_of(study, failed_elsewhere, handler) == []
    assert not study.get_trials(states=(TrialState.WAITING,))


def test_a_trial_whose_worker_died_before_naming_itself_is_failed_once_unclaimed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A process killed between Optuna's ask and its first write leaves a running trial with no worker: once it
    has been seen unclaimed for UNCLAIMED_AFTER_S it is failed and retried, as a dead worker's trial is."""
    from sweeper import study as study_module

    study = optuna.create_study()
    study.ask().suggest_int("lora.r", 2, 64)
    handler = DeadTrialHandler(max_retry=1, tracking_uri=None)
    assert fail_trials_of(study, lambda worker: True, handler) == []  # just asked: its worker is still starting
    monkeypatch.setattr(study_module, "UNCLAIMED_AFTER_S", -1.0)
    assert fail_trials_of(study, lambda worker: False, handler) == [0]
    (retry,) = study.get_trials(states=(TrialState.WAITING,))
    assert TrialRecord.of(retry) == TrialRecord(retry_of=0, retry_reason=DeadTrialHandler.UNCLAIMED_REASON)
    assert retry.params == study.trials[0].params


def test_the_last_grid_point_of_a_dead_worker_is_failed_outside_optimize() -> None:
    """Failing it finishes the grid; Optuna's grid sampler then asks the study to stop, refused outside optimize."""
    study = optuna.create_study(sampler=optuna.samplers.GridSampler({"lora.r": [2, 4]}))
    for worker in ("host:1", "host:2"):
        trial = study.ask()
        trial.suggest_categorical("lora.r", [2, 4])
        record(trial, worker=worker)
    study.tell(0, 1.0)
    assert fail_trials_of(study, "host:2".__eq__, DeadTrialHandler(max_retry=0, tracking_uri=None)) == [1]
    assert study.trials[1].state == TrialState.FAIL


# --- a real PostgreSQL server on loopback -----------------------------------------------------------------


@pytest.mark.postgres
def test_three_workers_finish_exactly_the_budget(postgres: str, tmp_path: Path) -> None:
    storage, tracking = f"{postgres}/optuna", f"{postgres}/mlflow"
    result = run_cli("launch", *TINY, *SPACE, "study.n_trials=7", "workers.count=3", f"study.storage={storage}",
                     f"tracking.uri={tracking}", f"output_dir={tmp_path}", "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(study_name="qlora-default", storage=storage)
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 7
    assert len({t.user_attrs["worker"] for t in finished}) >= 2  # the work was shared
    ran = [t for t in study.trials if not t.user_attrs.get("surplus")]
    run_ids = [t.user_attrs["mlflow_run_id"] for t in ran]
    assert len(set(run_ids)) == len(run_ids)  # one child run per trial, none shared
    children = child_runs_of(tracking, "qlora-default")
    assert sorted(r.info.run_id for r in children) == sorted(run_ids)
    assert all(r.info.status != "RUNNING" for r in children)
    assert postgres.split("@")[0].split(":")[-1] not in str([r.data.params for r in children])  # no password


@pytest.mark.postgres
def test_a_killed_worker_is_recovered_by_heartbeat(postgres: str, tmp_path: Path) -> None:
    storage, tracking = f"{postgres}/optuna2", f"{postgres}/mlflow2"
    # Trials long enough (200 steps) for the victim to be killed in the middle of one.
    args = [*TINY, *SPACE, *FAST_HEARTBEAT, "train.max_steps=200", "train.eval_every=50", "study.n_trials=1",
            "study/pruner=none", f"study.storage={storage}", f"tracking.uri={tracking}", f"output_dir={tmp_path}"]
    cfg, params = compose.load(args)
    parent_run(make_tracker(cfg), open_study(cfg, params, tracking_uri=tracking), cfg, params)

    victim = start_cli("worker", *args, "--no-progress", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    study = optuna.load_study(study_name="qlora-default", storage=storage)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        running = [t for t in study.get_trials(states=(TrialState.RUNNING,)) if "mlflow_run_id" in t.user_attrs]
        if running:
            break
        time.sleep(0.5)
    assert running, "the worker never started a trial"
    killed = running[0]
    time.sleep(2)  # mid-trial: heartbeats have been written
    victim.send_signal(signal.SIGKILL)
    victim.wait()

    rescuer = run_cli("worker", *args, "--no-progress")
    assert rescuer.returncode == 0, rescuer.stderr[-3000:]
    study = optuna.load_study(study_name="qlora-default", storage=storage)
    by_number = {t.number: t for t in study.trials}
    assert by_number[killed.number].state == TrialState.FAIL
    retried = [t for t in study.trials if t.user_attrs.get("retry_of") == killed.number]
    assert retried and retried[0].params == killed.params
    assert "no heartbeat" in retried[0].user_attrs["retry_reason"]
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials) == 1
    run = MlflowClient(tracking).get_run(killed.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED"


@pytest.mark.parametrize(("slots", "own_process"), [(1, False), (2, True)])
def test_journal_workers_survive_a_sigkill(tmp_path: Path, slots: int, own_process: bool) -> None:
    """Two CPU workers on a journal file; one is killed mid-trial; the launcher recovers and finishes. A killed
    worker's engine process ends with it. (Slots inside the worker's process die with it, as its one trial does;
    several slots' trials retried are covered by the engine of its own.)"""
    import psutil

    log = tmp_path / "launch.log"
    with open(log, "wb") as out:
        launcher = start_cli("launch", *TINY, *SPACE, "train.max_steps=30", "study.n_trials=4", "study/pruner=none",
                             "workers.count=2", "workers.poll_s=0.5", f"workers.slots={slots}",
                             f"workers.engine_process={own_process}",
                             f"output_dir={tmp_path}", "--no-progress", stdout=out, stderr=subprocess.STDOUT)
        journal = tmp_path / "optuna.journal"
        deadline = time.monotonic() + 240
        victim = None
        while time.monotonic() < deadline and victim is None:
            time.sleep(0.5)
            if not journal.exists():
                continue
            try:
                study = optuna.load_study(study_name="qlora-default", storage=_journal(journal))
            except KeyError:  # the file is created a moment before the study's first record
                continue
            running = [t for t in study.get_trials(states=(TrialState.RUNNING,)) if "mlflow_run_id" in t.user_attrs]
            if running:
                victim = running[0]
        assert victim is not None, log.read_text()[-3000:]
        worker = psutil.Process(int(victim.user_attrs["worker"].split(":")[1]))
        children = worker.children()  # the engine's process, and multiprocessing's resource tracker
        assert bool(children) == own_process, children
        worker.send_signal(signal.SIGKILL)
        _, alive = psutil.wait_procs(children, timeout=60)
        assert not alive
        assert launcher.wait(timeout=600) == 0, log.read_text()[-3000:]
    study = optuna.load_study(study_name="qlora-default", storage=_journal(journal))
    by_number = {t.number: t for t in study.trials}
    assert by_number[victim.number].state == TrialState.FAIL
    assert any(t.user_attrs.get("retry_of") == victim.number for t in study.trials)
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials) == 4
    children = child_runs_of(f"sqlite:///{tmp_path / 'mlflow.db'}", "qlora-default")
    assert all(r.info.status != "RUNNING" for r in children)
    if slots == 1:  # later verbs find the journal without the launch's worker count
        report = run_cli("report", f"output_dir={tmp_path}")
        assert report.returncode == 0 and "failed" in report.stdout, report.stderr[-2000:]


def _journal(path: Path) -> optuna.storages.JournalStorage:
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


@pytest.mark.postgres
@pytest.mark.parametrize(("args", "message"), [
    (["study.storage=postgresql://sweeper:hunter2@127.0.0.1:9/optuna"], "study.storage: cannot open"),
    (["study.name=no-such-study"], "study.name: no study 'no-such-study'"),
    (["lora.r=choice(8,16)"], "search_space: differs from the one study"),
])
def test_joining_with_bad_input_fails_before_loading(postgres: str, tmp_path: Path, args: list[str],
                                                    message: str) -> None:
    storage = f"{postgres}/optuna"  # holds the study of the three-worker test, or gets one here
    base = [*TINY, *SPACE, f"study.storage={storage}", f"tracking.uri={postgres}/mlflow", f"output_dir={tmp_path}"]
    cfg, params = compose.load(base)
    open_study(cfg, params)
    result = run_cli("worker", *base, *args)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
    assert "hunter2" not in result.stderr


@pytest.mark.postgres
def test_wrong_password_is_a_clear_error(postgres: str, tmp_path: Path) -> None:
    wrong = postgres.replace(postgres.split("@")[0].split(":")[-1], "wrong")
    result = run_cli("launch", *TINY, f"study.storage={wrong}/optuna", f"output_dir={tmp_path}")
    assert result.returncode == 2
    assert "study.storage: cannot open" in result.stderr and "password authentication failed" in result.stderr
    assert ":wrong@" not in result.stderr


@pytest.mark.timeout(600)
def test_trials_left_running_by_a_dead_process_are_retried(tmp_path: Path) -> None:
    """A launch killed outright leaves a RUNNING trial behind (no heartbeat on SQLite); a resume recovers it."""
    import socket

    args = [*TINY, *SPACE, "study.n_trials=2", f"output_dir={tmp_path}"]
    cfg, params = compose.load(args)
    study = open_study(cfg, params)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    orphan = study.ask()
    orphan.set_user_attr("worker", f"{socket.gethostname()}:{gone.pid}")
    study = run_sweep(cfg, params, show_progress=False)
    states = {t.number: t.state for t in study.trials}
    assert states[orphan.number] == TrialState.FAIL
    assert sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states.values()) == 2
    assert any(t.user_attrs.get("retry_of") == orphan.number for t in study.trials)


def test_joining_with_other_fixed_settings_is_refused(tmp_path: Path) -> None:
    base = [*TINY, *SPACE, f"output_dir={tmp_path}"]
    cfg, params = compose.load(base)
    open_study(cfg, params)
    other, _ = compose.load([*base, "train.max_steps=5", "data.max_length=32"])
    with pytest.raises(ConfigError, match="these differ: data.max_length, train.max_steps"):
        open_study(other, params, create=False)


def test_a_study_with_nothing_finished_is_relaunched_with_corrected_settings(tmp_path: Path) -> None:
    base = [*TINY, *SPACE, f"output_dir={tmp_path}"]
    cfg, params = compose.load(base)
    study = open_study(cfg, params)
    study.tell(study.ask(), state=TrialState.FAIL)  # the first launch failed its trial
    corrected, corrected_params = compose.load([*base, "data.max_length=32", "lora.r=choice(2,8)"])
    study = open_study(corrected, corrected_params)
    assert study.user_attrs["fixed_setup"]["data.max_length"] == 32


def test_per_device_settings_may_differ_between_workers_and_from_older_studies(tmp_path: Path) -> None:
    base = [*TINY, *SPACE, f"output_dir={tmp_path}"]
    cfg, params = compose.load(base)
    study = open_study(cfg, params)
    older = {**study.user_attrs["fixed_setup"], "model.gradient_checkpointing": True, "train.device": "cuda"}
    study.set_user_attr("fixed_setup", older)  # as a study started before checkpointing became per-trial stores it
    other, _ = compose.load([*base, "model.gradient_checkpointing=false", "train.device=cpu"])
    assert open_study(other, params, create=False).study_name == study.study_name


def test_two_launches_at_once_in_a_new_folder_both_run(tmp_path: Path) -> None:
    """Both create the stores at the same moment: one waits for the other instead of dying in its migration."""
    out = tmp_path / "new"
    args = ["launch", *TINY, "search_space=none", "study.n_trials=2", f"output_dir={out}", "--no-progress"]
    launches = [start_cli(*args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in launches]
    assert [p.returncode for p in launches] == [0, 0], outputs
    study = optuna.load_study(study_name="qlora-default", storage=f"sqlite:///{out / 'optuna.db'}")
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials) == 2


def test_a_sweep_in_slots_reuses_a_read_of_the_study_and_the_budget_guard_reads_fresh(tmp_path: Path) -> None:
    import optuna

    from sweeper.study import ReusedReads, fresh_reads, reused_reads, storage_for

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    storage = storage_for(url)
    assert isinstance(storage, ReusedReads)
    study = optuna.create_study(study_name="s", storage=storage)
    other = optuna.load_study(study_name="s", storage=url)  # another process on the same database
    study.ask()
    with reused_reads(study, 60.0):
        assert len(study.get_trials()) == 1
        other.ask()
        assert len(study.get_trials()) == 1  # the read a moment ago serves
        with fresh_reads():
            assert len(study.get_trials()) == 2
        other.ask()
        other.tell(0, 1.5)
        other.enqueue_trial({"x": 1.0})
        mine = study.get_trials()[1]
        other._storage.set_trial_user_attr(mine._trial_id, "seen", True)
        with fresh_reads():  # every state is current; a running trial's other fields may be a moment old
            trials = study.get_trials()
        assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.RUNNING, TrialState.RUNNING,
                                             TrialState.WAITING]
        assert trials[0].value == 1.5 and "seen" not in trials[1].user_attrs
        other.ask()  # takes the waiting trial
        other.tell(2, state=TrialState.FAIL)
        with fresh_reads():
            assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE, TrialState.RUNNING,
                                                             TrialState.FAIL, TrialState.RUNNING]
    trials = study.get_trials()  # outside a sweep in slots every read is fresh
    assert len(trials) == 4 and trials[1].user_attrs == {"seen": True}


def test_a_fresh_read_finds_another_workers_trial_below_one_of_its_own_and_later_reads_keep_every_trial(
        tmp_path: Path) -> None:
    from sweeper.study import ReusedReads, fresh_reads

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    mine, theirs = ReusedReads(optuna.storages.RDBStorage(url)), ReusedReads(optuna.storages.RDBStorage(url))
    study = mine.create_new_study([optuna.study.StudyDirection.MINIMIZE], "s")
    mine.max_age_s = 60.0
    mine.get_all_trials(study)
    theirs.create_new_trial(study)  # trial 0, created by another worker after the last full read
    running = mine.create_new_trial(study)  # trial 1: held by this process without a read
    done = mine.create_new_trial(study)  # trial 2
    mine.set_trial_state_values(done, TrialState.COMPLETE, [1.0])
    with fresh_reads():
        assert [t.state for t in mine.get_all_trials(study)] == [TrialState.RUNNING, TrialState.RUNNING,
                                                                 TrialState.COMPLETE]
    mine.set_trial_state_values(running, TrialState.COMPLETE, [0.5])
    mine.max_age_s = 0.0  # Optuna's own reads from here: they must still see trials 0 and 1 as they are
    assert [t.state for t in mine.get_all_trials(study)] == [TrialState.RUNNING, TrialState.COMPLETE,
                                                             TrialState.COMPLETE]
