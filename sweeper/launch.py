"""Running a sweep (and a single training run) in this process, with the base loaded once."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState
from tqdm.auto import tqdm

from sweeper.config import SweepConfig, to_container
from sweeper.space import Param
from sweeper.study import FINISHED, DeadTrialHandler, dead_on_this_host, fail_trials_of, finished_trials, open_study
from sweeper.tracking import Tracker

log = logging.getLogger(__name__)


@dataclass
class Resources:
    """What trials share inside one process: the resident base and the tokenized data."""

    base: Any
    data: Any

    @classmethod
    def load(cls, cfg: SweepConfig) -> Resources:
        from objectives.base import ResidentBase, pick_device
        from objectives.data import prepare

        start = time.perf_counter()
        base = ResidentBase(cfg.model, pick_device(cfg.train.device))
        if cfg.train.packing:
            base.check_packing()
        data = prepare(cfg.data, base.tokenizer, cfg.model.cache_path)
        log.info("base and data ready in %.1fs: %d train / %d eval examples",
                 time.perf_counter() - start, len(data.train), len(data.eval))
        return cls(base, data)


def make_tracker(cfg: SweepConfig) -> Tracker:
    return Tracker(cfg.tracking_uri, cfg.experiment_name, cfg.output_path / "artifacts")


def parent_run(tracker: Tracker, study: optuna.Study, cfg: SweepConfig, params: Sequence[Param]) -> str:
    """The study's MLflow run: created on the first launch, reopened on a resume."""
    run_id = study.user_attrs.get("mlflow_parent_run_id")
    if run_id:
        tracker.reopen(run_id)
        return str(run_id)
    run_id = tracker.start_run(
        cfg.study.name, tags={"kind": "study", "study": cfg.study.name},
        params={"sampler": cfg.study.sampler.name, "pruner": cfg.study.pruner.name,
                "n_trials": cfg.study.n_trials, "objectives": ",".join(cfg.study.objectives),
                "storage": cfg.storage_url, "sampler_seed": cfg.study.sampler.seed})
    tracker.log_dict(run_id, dict(cfg.search_space), "search_space.yaml")
    tracker.log_text(run_id, "\n".join(f"{p.name}: {p.describe()}"
                                       + (f"  when {p.describe_condition()}" if p.when else "")
                                       for p in params), "search_space_resolved.txt")
    tracker.log_dict(run_id, to_container(cfg), "sweep_config.yaml")
    study.set_user_attr("mlflow_parent_run_id", run_id)
    return run_id


def update_parent(tracker: Tracker, run_id: str, study: optuna.Study) -> None:
    """Keep the best value and trial on the parent run current."""
    if len(study.directions) > 1:
        tracker.set_tags(run_id, {"pareto_trials": ",".join(str(t.number) for t in study.best_trials)})
        return
    try:
        best = study.best_trial
    except ValueError:
        return
    tracker.log_metrics(run_id, best.number, {"best_value": float(best.value or 0.0)})
    tracker.set_tags(run_id, {"best_trial": str(best.number), "best_value": f"{best.value:.6f}"})
    tracker.flush(run_id)


class BudgetReached(Exception):
    """Trials ahead of this one already cover the study's budget."""


class BudgetGuard:
    """Keeps the study's total budget exact when several workers share it.

    Before a trial runs it counts the trials ahead of it (lower numbers) that finished or are running.
    If they cover the budget, the trial waits: should one of them fail, it runs in its place; once the
    budget is finished it is dropped (marked failed as surplus, never run).
    """

    def __init__(self, budget: int, poll_s: float, handler: DeadTrialHandler, timeout_s: float | None) -> None:
        self.budget = budget
        self.poll_s = poll_s
        self.handler = handler
        self.deadline = None if timeout_s is None else time.monotonic() + timeout_s

    def wait_turn(self, study: optuna.Study, number: int) -> bool:
        while True:
            trials = study.get_trials(deepcopy=False)
            if sum(t.state in FINISHED for t in trials) >= self.budget:
                return False
            ahead = sum(t.number < number and t.state in (*FINISHED, TrialState.RUNNING) for t in trials)
            if ahead < self.budget:
                return True
            if self.deadline is not None and time.monotonic() > self.deadline:
                return False
            fail_dead_trials(study, self.handler)
            time.sleep(self.poll_s)


def fail_dead_trials(study: optuna.Study, handler: DeadTrialHandler) -> None:
    """Fail, then retry, trials whose worker died: no heartbeat (RDB storages), or a gone process on this host."""
    optuna.storages.fail_stale_trials(study)
    fail_trials_of(study, dead_on_this_host, handler)


class GuardedObjective:
    """The objective behind the budget guard, with the worker's identity on each trial."""

    def __init__(self, objective: Any, guard: BudgetGuard, worker: str, device: Any) -> None:
        self.objective = objective
        self.guard = guard
        self.worker = worker
        self.device = device
        self.memory_mb = memory_in_use_mb(device)

    def __call__(self, trial: optuna.Trial) -> Any:
        trial.set_user_attr("worker", self.worker)
        if not self.guard.wait_turn(trial.study, trial.number):
            trial.set_user_attr("surplus", True)
            trial.set_user_attr("state_reason", "budget reached before this trial started")
            trial.study.stop()
            raise BudgetReached(f"trial {trial.number}: budget of {self.guard.budget} already finished")
        try:
            return self.objective(trial)
        finally:
            self.memory_mb = memory_in_use_mb(self.device)  # after the trial let go of what it held
            trial.set_user_attr("worker_memory_mb", self.memory_mb)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def memory_in_use_mb(device: Any) -> float:
    """Memory this worker holds: allocated CUDA memory, or the process's resident set on the CPU."""
    import torch

    if getattr(device, "type", "cpu") == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def failed_trials(study: optuna.Study) -> int:
    return sum(t.state == TrialState.FAIL and not t.user_attrs.get("surplus")
               for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))


def run_sweep(cfg: SweepConfig, params: Sequence[Param], show_progress: bool = True) -> optuna.Study:
    """Create or resume the study and run trials in this process until its budget is finished."""
    return _run_trials(cfg, params, show_progress, join=False)[0]


def run_worker(cfg: SweepConfig, params: Sequence[Param], show_progress: bool = True) -> int:
    """Join an existing study and run trials until its budget is finished.

    Returns:
        0 when the budget is finished (or failures hit their cap), RECYCLE_EXIT when this process's
        memory grew more than ``workers.max_drift_mb`` above its level after loading the base.
    """
    return RECYCLE_EXIT if _run_trials(cfg, params, show_progress, join=True)[1] else 0


RECYCLE_EXIT = 75  # EX_TEMPFAIL: the supervisor starts a fresh worker


def _run_trials(cfg: SweepConfig, params: Sequence[Param], show_progress: bool,
                join: bool) -> tuple[optuna.Study, bool]:
    from sweeper.objective import QLoRAObjective

    tracker = make_tracker(cfg)
    study = open_study(cfg, params, create=not join, tracking_uri=cfg.tracking_uri)
    handler = DeadTrialHandler(cfg.workers.max_retry, cfg.tracking_uri)
    fail_dead_trials(study, handler)
    done = finished_trials(study)
    if done >= cfg.study.n_trials:
        print(f"study {cfg.study.name!r} already has {done} finished trials (budget {cfg.study.n_trials})")
        return study, False
    resources = Resources.load(cfg)  # bad data or device settings fail here, before the parent run exists
    parent_id = parent_run(tracker, study, cfg, params)
    objective = GuardedObjective(
        QLoRAObjective(cfg, params, resources.base, resources.data, tracker, parent_id, show_progress),
        BudgetGuard(cfg.study.n_trials, cfg.workers.poll_s, handler, cfg.study.timeout_s), worker_id(),
        resources.base.device)
    baseline = objective.memory_mb
    max_failures = cfg.workers.max_failures if cfg.workers.max_failures is not None else cfg.study.n_trials
    bar = tqdm(total=cfg.study.n_trials, initial=done, desc=f"sweep {cfg.study.name}", unit="trial",
               disable=not show_progress)
    recycle = False

    def after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        nonlocal recycle
        bar.n = finished_trials(study)
        bar.refresh()
        update_parent(tracker, parent_id, study)
        if len(study.directions) == 1 and trial.state == TrialState.COMPLETE:
            bar.set_postfix(best=f"{study.best_value:.4f}", refresh=True)
        drift = objective.memory_mb - baseline
        if bar.n >= cfg.study.n_trials or failed_trials(study) >= max_failures:
            study.stop()
        elif join and drift > cfg.workers.max_drift_mb:
            log.warning("memory grew %.0f MB above the resident base: recycling this worker", drift)
            recycle = True
            study.stop()

    status = "FAILED"
    try:
        study.optimize(objective, timeout=cfg.study.timeout_s, catch=(Exception,), callbacks=[after_trial])
        status = "FINISHED" if finished_trials(study) >= cfg.study.n_trials else "FAILED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        bar.close()
        # A lone worker closes the parent run when it finished the budget; supervised ones leave it to the launcher.
        if not join or (status == "FINISHED" and not os.environ.get("SWEEPER_SUPERVISED")):
            finish_parent(tracker, parent_id, study, cfg, status)
    return study, recycle


def finish_parent(tracker: Tracker, run_id: str, study: optuna.Study, cfg: SweepConfig, status: str) -> None:
    try:
        from sweeper.plots import log_study_plots

        log_study_plots(tracker, run_id, study)
    except Exception as e:  # noqa: BLE001 - plots are a convenience; a failure must not hide the results
        log.warning("study plots skipped: %s", e)
    states = Counter(t.state for t in study.get_trials(deepcopy=False))
    tracker.set_tags(run_id, {**{f"trials_{s.name.lower()}": n for s, n in states.items() if n},
                              "budget_left": max(0, cfg.study.n_trials - sum(states[s] for s in FINISHED))})
    tracker.end_run(run_id, status)  # a resume reopens it


def run_single(cfg: SweepConfig, show_progress: bool = True) -> float | list[float]:
    """One training run of a fixed config (no study), logged as its own MLflow run."""
    from sweeper.objective import QLoRAObjective

    tracker = make_tracker(cfg)
    resources = Resources.load(cfg)
    objective = QLoRAObjective(cfg, [], resources.base, resources.data, tracker, None, show_progress)
    return objective(optuna.trial.FixedTrial({}, number=0))


def summary(study: optuna.Study) -> str:
    """A few lines on the study: counts by state and the best trial(s)."""
    trials = study.get_trials(deepcopy=False)
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in optuna.trial.TrialState}
    lines = [f"study {study.study_name}: " + ", ".join(f"{n} {k}" for k, n in counts.items() if n)]
    finished = [t for t in trials if t.state in FINISHED]
    if not any(t.state == optuna.trial.TrialState.COMPLETE for t in finished):
        return "\n".join(lines + ["no completed trial yet"])
    best = study.best_trials if len(study.directions) > 1 else [study.best_trial]
    label = "pareto front" if len(best) > 1 or len(study.directions) > 1 else "best trial"
    for t in best:
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in t.params.items())
        lines.append(f"{label}: #{t.number} value={_fmt(t.values if len(t.values) > 1 else t.value)} {params}")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)
