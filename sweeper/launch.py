"""Running a sweep (and a single training run) in this process, with the base loaded once."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState
from tqdm.auto import tqdm

from objectives.host_turns import TURNS
from objectives.timing import detect_device
from sweeper import progress
from sweeper.budget import BudgetGuard, BudgetReached, fail_dead_trials, failed_trials
from sweeper.config import SweepConfig
from sweeper.objective import Runner
from sweeper.progress import progress_bar
from sweeper.quiet import quiet_third_party
from sweeper.records import TrialRecord, record
from sweeper.report import STATE_NAMES, trial_line
from sweeper.slots import SlotPlan, engine_in_own_process, pass_settings_sampled, plan_slots, recipe_of
from sweeper.space import Param
from sweeper.study import (
    FINISHED,
    DeadTrialHandler,
    check_store_exists,
    finished_trials,
    fresh_reads,
    open_study,
    reused_reads,
)
from sweeper.tracking import Tracker, finish_parent, make_tracker, parent_run, redact, update_parent

log = logging.getLogger(__name__)
READ_AGE_S = 1.0
"""How old a read of the study a sweep in slots may reuse (see ``study.ReusedReads``): its trials' threads
would otherwise read every running trial again a dozen times per trial."""


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
        weights = " (random weights)" if cfg.model.random_init else ""
        log.info("base %s%s loaded on %s in %.1fs", cfg.model.source, weights, base.device, time.perf_counter() - start)
        start = time.perf_counter()
        data = prepare(cfg.data, base.tokenizer, cfg.model.cache_path)
        log.info("data ready in %.1fs: %d train / %d eval examples", time.perf_counter() - start,
                 len(data.train), len(data.eval))
        return cls(base, data)

    def slot_plan(self, cfg: SweepConfig, params: Sequence[Param]) -> SlotPlan:
        """How many trials this worker trains per pass (``workers.slots``)."""
        from objectives.decisions import device_memory_bytes

        memory = cfg.workers.memory_share(device_memory_bytes(self.base.device))
        if self.base.device.type == "cpu":
            import psutil

            # The host's memory also holds this process and whatever else runs there: 16 slots of SmolLM2-135M
            # planned against all 24 GB of a host were ended by its out-of-memory killer.
            memory = min(memory, psutil.virtual_memory().available)
        return plan_slots(cfg, params, self.base.device.type, self.base.config, memory, self.base.linear_names,
                          detect_device(recipe_of(cfg)))

    def engine(self, cfg: SweepConfig, plan: SlotPlan, slots: int | None = None, own_process: bool = True,
               prestarted: Any = None) -> Any:
        """A slot engine on this base for the plan (None for one trial at a time on peft's adapter): in a process
        of its own where ``workers.engine_process`` says so (and ``own_process`` allows it: a single run has no
        bookkeeping to get away from), and this process then lets go of its base's weights. ``prestarted``
        (:func:`prestart_engine`) becomes that process, or is closed."""
        in_process = own_process and plan.own_process and (slots is not None or plan.slots > 1)
        if prestarted is not None and not in_process:
            prestarted.close()
        if plan.slots == 1 and slots is None:
            return None
        slots = slots or plan.slots
        if in_process:
            from objectives.engine_process import EnginePool, EngineProcess, EngineSpec

            self.base.unload()
            spec = EngineSpec(cfg.model, str(self.base.device), self.data, slots, plan.r_max, plan.checkpointing,
                              plan.base_cache, cfg.train.micro_batch_size, cfg.train.packing, cfg.train.fused_loss,
                              plan.per_pass, prepare=_engine_prepare())
            if plan.engines == 1:
                return EngineProcess(spec, prestarted)
            return EnginePool.start(spec, plan.engines, prestarted)
        from objectives.engine import SlotEngine

        self.base.use_checkpointing(plan.checkpointing)
        self.base.use_base_cache(plan.base_cache)
        return SlotEngine(self.base, self.data, slots, plan.r_max, eval_batch_size=cfg.train.micro_batch_size,
                          packing=cfg.train.packing, fused_loss=cfg.train.fused_loss, per_pass=plan.per_pass)


def _engine_prepare() -> Any:
    return None if progress.VERBOSE else quiet_third_party


def prestart_engine(cfg: SweepConfig, params: Sequence[Param]) -> Any:
    """The engine's process started now where this worker will likely train in slots with the engine in a process
    of its own (:class:`objectives.engine_process.Prestarted`): its imports and its loading of the base then overlap
    this process's loading of the base and the data. None otherwise."""
    from objectives.base import pick_device

    device = pick_device(cfg.train.device)
    if (cfg.workers.slots == 1 or (cfg.workers.slots == "auto" and device.type != "cuda")
            or pass_settings_sampled(params) or not engine_in_own_process(cfg, device.type)):
        return None
    from objectives.engine_process import Prestarted

    return Prestarted(_engine_prepare(), cfg.model, str(device))


def engine_runner(engine: Any) -> Runner | None:
    """A trial's run in the engine's shared passes (the engine records the settings they share in its config)."""
    return None if engine is None else engine.run


class GuardedObjective:
    """The objective behind the budget guard, with the worker's identity on each trial."""

    def __init__(self, objective: Any, guard: BudgetGuard, worker: str, device: Any) -> None:
        self.objective = objective
        self.guard = guard
        self.worker = worker
        self.job = slurm_job()
        self.device = device
        self.memory_mb = memory_in_use_mb(device)

    def __call__(self, trial: optuna.Trial) -> Any:
        self.guard.started()
        record(trial, worker=self.worker, **({"slurm_job": self.job} if self.job else {}))
        if not self.guard.wait_turn(trial.study, trial.number):
            record(trial, surplus=True, state_reason="budget reached before this trial started")
            trial.study.stop()
            raise BudgetReached(f"trial {trial.number}: budget of {self.guard.budget} already finished")
        try:
            return self.objective(trial)
        finally:
            self.memory_mb = memory_in_use_mb(self.device)  # after the trial let go of what it held
            record(trial, worker_memory_mb=self.memory_mb)


@contextmanager
def stores_lock(cfg: SweepConfig) -> Iterator[None]:
    """One process at a time creates or opens the stores in an output folder: two launches into a new folder
    would both create MLflow's tables, and one would die in the other's schema migration."""
    from filelock import FileLock

    cfg.output_path.mkdir(parents=True, exist_ok=True)
    with FileLock(cfg.output_path / ".stores.lock"):
        yield


def open_stores(cfg: SweepConfig, params: Sequence[Param], create: bool = True) -> tuple[Tracker, optuna.Study]:
    """The MLflow tracker and the Optuna study, opened under :func:`stores_lock`; ``create``: the study may be
    created (a joining worker's may not)."""
    with stores_lock(cfg):
        tracker = make_tracker(cfg)
        study = open_study(cfg, params, create=create, tracking_uri=cfg.tracking_uri)
    return tracker, study


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def slurm_job() -> str | None:
    """The SLURM job running this process, as ``squeue`` and ``scancel`` name it; None outside SLURM."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")


def memory_in_use_mb(device: Any) -> float:
    """Memory this worker holds: allocated CUDA memory, or the process's resident set on the CPU."""
    import torch

    if getattr(device, "type", "cpu") == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    import psutil

    return psutil.Process().memory_info().rss / 2**20


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

    if join:
        check_store_exists(cfg.storage_url)  # before the MLflow store is made beside a study that is not there
    tracker, study = open_stores(cfg, params, create=not join)
    handler = DeadTrialHandler(cfg.workers.max_retry, cfg.tracking_uri)
    fail_dead_trials(study, handler)
    done = finished_trials(study)
    if done >= cfg.study.n_trials:
        print(f"study {cfg.study.name!r} already has {done} finished trials (budget {cfg.study.n_trials})")
        return study, False
    prestarted = prestart_engine(cfg, params)
    try:
        resources = Resources.load(cfg)  # bad data or device settings fail here, before the parent run exists
        plan = resources.slot_plan(cfg, params)
        log.info("%d trial(s) per pass: %s", plan.slots, plan.reason)
        parent_id = parent_run(tracker, study, cfg, params)
        engine = resources.engine(cfg, plan, prestarted=prestarted)
    except BaseException:
        if prestarted is not None:
            prestarted.close()
        raise
    objective = GuardedObjective(
        QLoRAObjective(cfg, params, resources.base, resources.data, tracker, parent_id,
                       show_progress and plan.slots == 1, runner=engine_runner(engine)),
        BudgetGuard(cfg.study.n_trials, cfg.workers.poll_s, handler, cfg.study.timeout_s), worker_id(),
        resources.base.device)
    baseline = objective.memory_mb
    max_failures = cfg.workers.max_failures if cfg.workers.max_failures is not None else cfg.study.n_trials
    failed_before = failed_trials(study)  # an earlier launch's failures are its own (a corrected relaunch)
    bar = progress_bar(cfg.study.n_trials, f"sweep {cfg.study.name}", "trial", initial=done,
                       disable=not show_progress)
    recycle = False
    parent_shows: str | None = None
    """The best trial the parent run shows."""
    threads = min(plan.slots * plan.engines, cfg.study.n_trials - done)

    def after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        with TURNS.bookkeeping():
            go_on = report_trial(study, trial)
        if go_on and threads > 1:
            objective.guard.hold_while_covered(study)

    def report_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        """The trial's line, the bars and the parent run; False when the worker stops here."""
        nonlocal recycle, parent_shows
        if not TrialRecord.of(trial).surplus:  # a surplus trial never ran: the summary counts them
            tqdm.write(trial_line(study, trial))  # tqdm.write: above the bars, not through them
        bar.n = finished_trials(study)
        bar.refresh()
        parent_shows = update_parent(tracker, parent_id, study, parent_shows)
        if len(study.directions) == 1 and trial.state == TrialState.COMPLETE:
            bar.set_postfix(best=f"{study.best_value:.4f}", refresh=True)
        drift = objective.memory_mb - baseline
        # A read a moment old would not yet count this trial's failure; others' count at the next trial's end.
        with fresh_reads() if trial.state == TrialState.FAIL else nullcontext():
            failed = failed_trials(study)
        if failed - failed_before >= max_failures:
            objective.guard.stop(study)
            return False
        if join and drift > cfg.workers.max_drift_mb:
            log.warning("memory grew %.0f MB above the resident base: recycling this worker", drift)
            recycle = True
            objective.guard.stop(study)
            return False
        return True

    objective.guard.let_through(threads)
    status = "FAILED"
    try:
        # With slots, one Optuna thread per slot asks a trial and waits for the engine to train it; no more threads
        # than trials are left to run.
        with reused_reads(study, READ_AGE_S if threads > 1 else 0.0):
            study.optimize(objective, timeout=cfg.study.timeout_s, catch=(Exception,), n_jobs=threads,
                           callbacks=[MaxTrialsCallback(cfg.study.n_trials, states=FINISHED), after_trial])
        status = "FINISHED" if finished_trials(study) >= cfg.study.n_trials else "FAILED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if engine is not None:
            engine.close()
        bar.close()
        # A lone worker closes the parent run when it finished the budget; supervised ones leave it to the launcher.
        if not join or (status == "FINISHED" and not cfg.workers.supervised):
            finish_parent(tracker, parent_id, study, cfg, status)
    return study, recycle


@dataclass
class SingleRun:
    """Where ``run_single`` logged its run; filled in as soon as the run exists, so a failed one is found too."""

    name: str = "train"
    tags: dict[str, str] = field(default_factory=dict)
    experiment_id: str | None = None
    run_id: str | None = None

    def identify(self, cfg: SweepConfig) -> None:
        """Name and tags: a run of an exported config is named for the trial it reproduces and tagged with where
        that came from. It is a top-level run of the sweep's experiment: a child of the study's run would count
        as one of its trials."""
        source = cfg.provenance
        if source is None or source.trial_number < 0:
            self.name, self.tags = "train", {"kind": "train"}
            return
        exported = ", ".join(f"{n} {v:.4f}" for n, v in zip(cfg.study.objectives, source.values, strict=False))
        tags = {"kind": "reproduction", "reproduces.study": source.study,
                "reproduces.trial_number": str(source.trial_number),
                "reproduces.run_id": source.mlflow_run_id or "",
                "reproduces.parent_run_id": source.mlflow_parent_run_id or "",
                "reproduces.values": ", ".join(f"{v:.6g}" for v in source.values),
                "mlflow.note.content": (f"Reproduction of trial {source.trial_number} of study `{source.study}`"
                                        + (f" (run `{source.mlflow_run_id}`)" if source.mlflow_run_id else "")
                                        + (f", exported with {exported}." if exported else "."))}
        self.name, self.tags = f"reproduce trial-{source.trial_number}", {k: v for k, v in tags.items() if v}

    def where(self, cfg: SweepConfig, ui_command: str) -> list[str]:
        """How to find the run: its id, its experiment, and its page in the MLflow UI (``ui_command`` serves it)."""
        page = f"#/experiments/{self.experiment_id}/runs/{self.run_id}"
        lines = [f"MLflow run {self.run_id} ({self.name!r}) in experiment {cfg.experiment_name!r} "
                 f"(id {self.experiment_id})"]
        if "reproduces.trial_number" in self.tags:
            source = self.tags.get("reproduces.run_id", "(no MLflow run recorded)")
            lines.append(f"reproduces trial {self.tags['reproduces.trial_number']} of study "
                         f"{self.tags.get('reproduces.study', '')!r}: run {source}")
        if cfg.tracking_uri.startswith("http"):  # the tracking server serves the UI itself
            lines.append(f"open it: {redact(cfg.tracking_uri).rstrip('/')}/{page}")
        else:
            lines.append(f"open it: {ui_command}   then browse to <the URL it prints>/{page}")
        return lines


def run_single(cfg: SweepConfig, show_progress: bool = True, run: SingleRun | None = None) -> float | list[float]:
    """One training run of a fixed config (no study), logged as its own MLflow run (see :class:`SingleRun`).

    ``run``, when given, is filled in with where the run was logged; a reproduction's run is tagged
    ``reproduction`` with whether its values match the exported ones.
    """
    from sweeper.export import reproduction_verdict
    from sweeper.objective import QLoRAObjective

    run = run if run is not None else SingleRun()
    run.identify(cfg)
    with stores_lock(cfg):
        tracker = make_tracker(cfg)
    run.experiment_id = tracker.experiment_id
    resources = Resources.load(cfg)
    # Where a sweep on this device trains in slots, the reproduction does too (one slot): the same arithmetic.
    plan = resources.slot_plan(cfg, [])
    engine = resources.engine(cfg, plan, slots=1, own_process=False) if plan.slots > 1 else None
    trial = optuna.trial.FixedTrial({}, number=0)
    try:
        objective = QLoRAObjective(cfg, [], resources.base, resources.data, tracker, None, show_progress,
                                   runner=engine_runner(engine), run_name=run.name, run_tags=run.tags)
        value = objective(trial)
    finally:
        run.run_id = TrialRecord.of(trial).mlflow_run_id
        if engine is not None:
            engine.close()
    if run.run_id is not None and cfg.provenance is not None and cfg.provenance.values:
        values = value if isinstance(value, list) else [value]
        tracker.set_tags(run.run_id, {"reproduction": reproduction_verdict(cfg.study.objectives, values,
                                                                           cfg.provenance.values)})
    return value


def summary(study: optuna.Study) -> str:
    """A few lines on the study: counts by state and the best trial(s)."""
    trials = study.get_trials(deepcopy=False)
    surplus = [t for t in trials if TrialRecord.of(t).surplus]
    counts = {word: sum(t.state == s and t not in surplus for t in trials) for s, word in STATE_NAMES.items()}
    counts["surplus (asked after the budget was covered; never ran)"] = len(surplus)
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


def all_failed(study: optuna.Study) -> str | None:
    """When no trial of the study finished and some failed: why, most common reason first; else None."""
    trials = study.get_trials(deepcopy=False)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    if not failed or any(t.state in FINISHED for t in trials):
        return None
    reasons = Counter((TrialRecord.of(t).state_reason or "no reason recorded").splitlines()[0][:300] for t in failed)
    lines = [f"every trial failed ({len(failed)}); the reasons:"]
    lines += [f"  {n} x {reason}" for reason, n in reasons.most_common(5)]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)
