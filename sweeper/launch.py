"""Running a sweep (and a single training run) in this process, with the base loaded once."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from tqdm.auto import tqdm

from sweeper.config import SweepConfig, to_container
from sweeper.space import Param
from sweeper.study import FINISHED, finished_trials, open_study
from sweeper.tracking import Tracker

log = logging.getLogger(__name__)


@dataclass
class Resources:
    """What trials share inside one process: the resident base and the tokenized data."""

    base: Any
    data: Any

    @classmethod
    def load(cls, cfg: SweepConfig) -> Resources:
        from objectives.data import prepare
        from objectives.model import ResidentBase, pick_device

        start = time.perf_counter()
        base = ResidentBase(cfg.model, pick_device(cfg.train.device))
        data = prepare(cfg.data, base.tokenizer, cfg.model.cache_dir)
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


def run_sweep(cfg: SweepConfig, params: Sequence[Param], show_progress: bool = True) -> optuna.Study:
    """Create or resume the study and run trials until ``study.n_trials`` have finished."""
    from objectives.objective import QLoRAObjective

    tracker = make_tracker(cfg)
    study = open_study(cfg, params)
    done = finished_trials(study)
    remaining = cfg.study.n_trials - done
    if remaining <= 0:
        print(f"study {cfg.study.name!r} already has {done} finished trials (budget {cfg.study.n_trials})")
        return study
    parent_id = parent_run(tracker, study, cfg, params)
    resources = Resources.load(cfg)
    objective = QLoRAObjective(cfg, params, resources.base, resources.data, tracker, parent_id, show_progress)
    bar = tqdm(total=cfg.study.n_trials, initial=done, desc=f"sweep {cfg.study.name}", unit="trial",
               disable=not show_progress)

    def after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        bar.update(1)
        update_parent(tracker, parent_id, study)
        if len(study.directions) == 1 and trial.state == optuna.trial.TrialState.COMPLETE:
            bar.set_postfix(best=f"{study.best_value:.4f}", refresh=True)

    status = "FAILED"
    try:
        study.optimize(objective, n_trials=remaining, timeout=cfg.study.timeout_s, catch=(Exception,),
                       callbacks=[after_trial], gc_after_trial=True)
        status = "FINISHED" if finished_trials(study) >= cfg.study.n_trials else "RUNNING"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        bar.close()
        _finish_parent(tracker, parent_id, study, cfg, status)
    return study


def _finish_parent(tracker: Tracker, run_id: str, study: optuna.Study, cfg: SweepConfig, status: str) -> None:
    try:
        from sweeper.plots import log_study_plots

        log_study_plots(tracker, run_id, study)
    except Exception as e:  # noqa: BLE001 - plots are a convenience; a failure must not hide the results
        log.warning("study plots skipped: %s", e)
    counts = {s.name.lower(): len(study.get_trials(deepcopy=False, states=(s,)))
              for s in optuna.trial.TrialState}
    tracker.set_tags(run_id, {f"trials_{k}": v for k, v in counts.items() if v})
    if status != "RUNNING":
        tracker.end_run(run_id, status)
    else:
        tracker.flush(run_id)


def run_single(cfg: SweepConfig, show_progress: bool = True) -> float | list[float]:
    """One training run of a fixed config (no study), logged as its own MLflow run."""
    from objectives.objective import QLoRAObjective

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
