"""Workers as one SLURM job array through submitit: the checks before submitting, the submission, each task's job.

``launch launcher=slurm workers.count=N`` creates the study and its parent MLflow run, writes each worker's config
to a file of mode 0600 and submits N array tasks that run ``python -m sweeper worker --config FILE``, then returns.
The workers share the study through its storage alone, as on one machine; nothing supervises them, so the one that
finishes the budget closes the parent run. Where Hydra's submitit launcher waits for every trial of a batch, each
task here asks for its next trial as soon as its last one ends.

The configs hold the storage's and MLflow's passwords: an sbatch command line would show them to every user of
the cluster (``squeue``, ``ps``), and submitit's pickles are plain files, so those carry only the config's path.

A task that is cancelled, preempted or reaches its time limit stops its worker; the job's own process then fails
the worker's running trial and enqueues its parameters again, as the heartbeat does for a worker that died without
that chance (a lost node). At the time limit submitit requeues the task, which joins the study again.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from objectives.config import ConfigError
from objectives.shape import gib
from sweeper.config import SweepConfig

if TYPE_CHECKING:
    import optuna

    from sweeper.space import Param
    from sweeper.study import DeadTrialHandler

MAX_TIMEOUTS = 3
"""Requeues of a task that reaches its time limit (submitit's default); preemptions are always requeued."""
SHARED_STORES = ("every array task opens the same study and MLflow store from its own node: a SQLite file serves "
                 "one machine, and concurrent writers over a network filesystem corrupt it")


@dataclass(frozen=True)
class Submission:
    """A submitted job array."""

    job_id: str
    """The array's job id (task ``i`` is ``<job_id>_<i>``)."""
    workers: int
    folder: Path
    """submitit's folder: one log per task, ``<job_id>_<task>_0_log.out``."""


# --- before anything is submitted -------------------------------------------------------------------------------


def check_submission(cfg: SweepConfig) -> None:
    """What a SLURM launch needs and can check from here: shared stores, SLURM's commands, the partition.

    Raises:
        ConfigError: naming the setting, with what to use instead.
    """
    if cfg.workers.count < 1:
        raise ConfigError("workers.count: launcher=slurm submits one array task per worker; set workers.count=N")
    if cfg.workers.per_gpu != 1:
        raise ConfigError("workers.per_gpu: each array task has a GPU of its own; to train several trials on it, "
                          "use workers.slots")
    storage = cfg.study.storage
    if not storage or storage.startswith("sqlite"):
        what = "unset, which keeps the study in SQLite under output_dir" if not storage else "SQLite"
        raise ConfigError(f"study.storage: {what}, but {SHARED_STORES}; use study.storage=postgresql://user@host/db "
                          "or journal:/path/every/node/sees/optuna.journal")
    if cfg.tracking_uri.startswith("sqlite"):
        what = "unset, which logs to SQLite under output_dir" if not cfg.tracking.uri else "SQLite"
        raise ConfigError(f"tracking.uri: {what}, but {SHARED_STORES}; use tracking.uri=postgresql://user@host/db "
                          "or http://mlflow-host:5000")
    if shutil.which("sbatch") is None:
        raise ConfigError("launcher.name: slurm needs SLURM's sbatch, which is not on PATH; launch from a node "
                          "of the cluster, or use launcher=local")
    partition = cfg.launcher.partition
    if partition is not None:
        known = partitions()
        unknown = [p for p in partition.split(",") if p.strip() not in known]  # sbatch takes a list
        if unknown:
            raise ConfigError(f"launcher.partition: no partition {', '.join(map(repr, unknown))} on this cluster; "
                              f"it has: {', '.join(known) or 'none'}")


def partitions() -> list[str]:
    """The cluster's partitions, as ``sinfo`` lists them."""
    try:
        # --all: hidden partitions and those of other groups are submittable too
        done = subprocess.run(["sinfo", "--all", "--noheader", "--format=%R"], capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ConfigError(f"launcher.partition: cannot ask SLURM for its partitions: {e}") from None
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise ConfigError(f"launcher.partition: sinfo cannot reach the SLURM controller: {reason}")
    return sorted({line.strip() for line in done.stdout.splitlines() if line.strip()})


# --- the submission -------------------------------------------------------------------------------------------


def folder_of(cfg: SweepConfig) -> Path:
    return Path(os.path.expanduser(cfg.launcher.folder)).resolve() if cfg.launcher.folder \
        else cfg.output_path / "slurm"


def submit_workers(cfg: SweepConfig, params: Sequence[Param]) -> Submission | None:
    """Create the study and its parent run, and submit ``workers.count`` workers as one job array (the caller has
    run :func:`check_submission`).

    Returns:
        The job array, or None when the study's budget is already finished (nothing is submitted).

    Raises:
        ConfigError: sbatch refused the array (its reason); nothing is queued then.
    """
    from sweeper.launch import open_stores
    from sweeper.study import finished_trials
    from sweeper.tracking import parent_run

    tracker, study = open_stores(cfg, params)
    if finished_trials(study) >= cfg.study.n_trials:
        return None
    parent_id = parent_run(tracker, study, cfg, params)
    folder = folder_of(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    configs = Path(tempfile.mkdtemp(prefix="workers-", dir=folder))  # 0700: only the user lists the configs
    try:
        job_id = _submit(cfg, configs, folder)
    except BaseException:
        shutil.rmtree(configs, ignore_errors=True)
        tracker.end_run(parent_id, "FAILED")
        raise
    tracker.set_tags(parent_id, {"slurm_job": job_id, "slurm_folder": str(folder)})
    return Submission(job_id, cfg.workers.count, folder)


def _submit(cfg: SweepConfig, configs: Path, folder: Path) -> str:
    import submitit

    from sweeper import progress
    from sweeper.workers import write_worker_config

    # Tasks start in other folders on other nodes: the store under output_dir is named by its full path.
    worker_cfg = dataclasses.replace(cfg, output_dir=str(cfg.output_path))
    paths = [write_worker_config(worker_cfg, i, configs, supervised=False) for i in range(cfg.workers.count)]
    launcher = cfg.launcher
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=MAX_TIMEOUTS)
    executor.update_parameters(
        name=f"sweep-{cfg.study.name}", timeout_min=launcher.time_min, nodes=1, tasks_per_node=1,
        cpus_per_task=launcher.cpus_per_worker, mem_gb=launcher.mem_gb,
        # --gpus-per-node=0 is refused by clusters that count GPUs as generic resources: ask for none instead.
        gpus_per_node=launcher.gpus_per_worker or None,
        slurm_partition=launcher.partition, slurm_account=launcher.account, slurm_qos=launcher.qos,
        slurm_array_parallelism=launcher.array_parallelism or cfg.workers.count,
        slurm_additional_parameters=dict(launcher.additional_parameters), slurm_stderr_to_stdout=True)
    try:
        jobs = executor.map_array(WorkerJob(progress.VERBOSE), [str(p) for p in paths])
    except Exception as e:  # submitit's error holds sbatch's whole output, its own lines start "sbatch:"
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        reason = next((line for line in reversed(lines) if line.startswith("sbatch:")), lines[-1] if lines else "")
        raise ConfigError(f"launcher: sbatch refused the job array: {reason or type(e).__name__}") from None
    return str(jobs[0].job_id).split("_")[0]


# --- inside each array task ------------------------------------------------------------------------------------


class WorkerJob:
    """What each array task runs: ``python -m sweeper worker --config FILE`` until the budget is finished.

    A worker that asks to be recycled is started again; one that a signal stopped leaves its trials to
    :func:`recover_trials`. submitit pickles this object with the config's path, never the config itself.
    """

    def __init__(self, verbose: bool = False) -> None:
        self.verbose = verbose

    def __call__(self, config_file: str) -> None:
        from sweeper import compose, progress
        from sweeper.launch import RECYCLE_EXIT
        from sweeper.study import DeadTrialHandler, load_study

        path = Path(config_file)
        if not path.is_file():  # the last worker removes the configs once the budget is finished
            print(f"{path} is gone: the study's budget was finished before this task started")
            return
        cfg, _ = compose.load([], path)
        # Opened (and MLflow imported) before the worker starts: a task the scheduler stops has only seconds
        # (its KillWait) to fail and retry the worker's trial.
        study = load_study(cfg)
        handler = DeadTrialHandler(cfg.workers.max_retry, cfg.tracking_uri)
        import mlflow.tracking  # noqa: F401
        progress.VERBOSE = self.verbose
        rc = RECYCLE_EXIT
        while rc == RECYCLE_EXIT and path.is_file():  # gone: another worker finished the budget meanwhile
            rc = self._run(path, study, handler, cfg.study.n_trials)
        if rc not in (0, RECYCLE_EXIT):
            raise RuntimeError(f"the worker exited with {rc}; see the lines above")
        # The budget is finished (or stopped for all): no copy of the passwords is needed any more.
        shutil.rmtree(path.parent, ignore_errors=True)

    @staticmethod
    def _run(path: Path, study: optuna.Study, handler: DeadTrialHandler, budget: int) -> int:
        from submitit import JobEnvironment

        from sweeper.launch import RECYCLE_EXIT
        from sweeper.workers import worker_command

        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.setdefault("OMP_NUM_THREADS", os.environ.get("SLURM_CPUS_PER_TASK", "1"))
        # SLURM signals the whole task before its time limit, where this process requeues it; the worker, which
        # would die of that signal mid-step, is stopped with SIGTERM instead (it ends its trial at a step).
        requeue_signal = getattr(signal, "SIG" + JobEnvironment.USR_SIG)
        proc = subprocess.Popen(worker_command(path), env=env, stdin=subprocess.DEVNULL,
                                preexec_fn=lambda: signal.signal(requeue_signal, signal.SIG_IGN))
        try:
            return proc.wait()
        finally:  # also when submitit's handler requeues the task (SystemExit) at a time limit
            _stop(proc)
            if proc.returncode not in (0, RECYCLE_EXIT):
                lost = recover_trials(study, f"{socket.gethostname()}:{proc.pid}", handler, budget)
                if lost:
                    print(f"trials {lost} of the stopped worker failed and enqueued again", flush=True)

    def checkpoint(self, config_file: str) -> Any:
        """Called by submitit at a time limit or a preemption: the task is requeued as it was submitted."""
        from submitit.helpers import DelayedSubmission

        # submitit's `scontrol requeue` runs next, and SLURM's SIGTERM for that requeue may reach it before it exits:
        # the task is requeued all the same, but reads as failed. Ignored here, SIGTERM is ignored by scontrol too
        # (this process only logged it).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return DelayedSubmission(self, config_file)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """The worker ends: SLURM's own SIGTERM usually reaches it first (a second one would cut its step short)."""
    for stop, wait_s in ((None, 10), (proc.terminate, 30), (proc.kill, None)):
        if proc.poll() is not None:
            return
        if stop is not None:
            stop()
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue


def recover_trials(study: optuna.Study, worker: str, handler: DeadTrialHandler, budget: int) -> list[int]:
    """Fail and retry what a stopped worker (``host:pid``) left: trials still running, and trials it recorded as
    interrupted (a scheduler's SIGTERM lets the worker end its trial at a step, recorded failed, not retried)."""
    from optuna.trial import TrialState

    from sweeper.interrupts import REASON
    from sweeper.records import TrialRecord
    from sweeper.study import fail_trials_of, finished_trials

    lost = fail_trials_of(study, worker.__eq__, handler)
    if finished_trials(study) >= budget:
        return lost
    trials = study.get_trials(deepcopy=False)
    retried = {TrialRecord.of(t).retry_of for t in trials}
    for trial in trials:
        record = TrialRecord.of(trial)
        if (trial.state == TrialState.FAIL and record.worker == worker and record.state_reason == REASON
                and trial.number not in retried):
            handler(study, trial)
            lost.append(trial.number)
    return lost


# --- what `plan` shows ------------------------------------------------------------------------------------------


def request_lines(cfg: SweepConfig, memory_bytes: int | None, slots: int, engines: int = 1) -> list[str]:
    """What each array task asks SLURM for, and what its worker makes of it (``engines`` of ``slots`` each)."""
    launcher = cfg.launcher
    count = cfg.workers.count
    if count < 1:
        return ["SLURM: workers.count=0; set workers.count=N for N array tasks"]
    where = f"partition {launcher.partition}" if launcher.partition else "the default partition"
    at_once = min(count, launcher.array_parallelism or count)
    extra = " ".join(f"--{k.replace('_', '-')}={v}" for k, v in launcher.additional_parameters.items())
    device = "1 GPU" if launcher.gpus_per_worker else "no GPU"
    if not launcher.gpus_per_worker:
        share = "its CPUs"
    elif memory_bytes is None:
        share = "its GPU's memory (give --device-memory-gb N for the nodes' GPUs)"
    else:
        share = f"{gib(memory_bytes)} of its GPU's memory"
    return [f"SLURM: {count} workers as one job array on {where}, {at_once} at once; each task asks for {device}, "
            f"{launcher.cpus_per_worker} CPUs, {launcher.mem_gb:g} GB and {launcher.time_min} min" +
            (f" ({extra})" if extra else ""),
            f"each worker: {share} for its trials, {slots} trial{'s' if slots > 1 else ''} per pass"
            + (f" in each of {engines} engines" if engines > 1 else "")]
