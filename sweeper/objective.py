"""The Optuna objective: a trial becomes a recipe config, the recipe runs, pruning and logging ride its hooks."""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna
from tqdm.auto import tqdm

from objectives.base import ResidentBase
from objectives.config import RECIPE_SECTIONS, RecipeConfig
from objectives.data import TokenizedSplits
from objectives.decisions import device_memory_bytes
from objectives.objective import DoesNotFit, RunHooks, RunResult, run_recipe
from objectives.training import LossNotFinite, TrainResult
from sweeper.config import SweepConfig, to_container, to_schema
from sweeper.records import record
from sweeper.space import Param
from sweeper.tracking import RUN_STATUS, Tracker
from sweeper.values import apply_values, sample

AnyTrial = optuna.Trial | optuna.trial.FixedTrial
Runner = Callable[[RecipeConfig, RunHooks], RunResult]
"""Runs one trial's recipe: alone on the base (``run_recipe``), or in a slot engine's shared passes."""


def recipe_record(cfg: RecipeConfig) -> dict[str, Any]:
    """The parts of a config that describe one training run (logged, and what an export reproduces)."""
    return {k: v for k, v in to_container(cfg).items() if k in RECIPE_SECTIONS}


def objective_values(objectives: Sequence[str], result: TrainResult, seconds: float) -> list[float]:
    by_name = {"eval_loss": result.eval_loss, "trainable_params": float(result.trainable_params),
               "peak_memory_mb": result.peak_memory_mb, "trial_seconds": seconds}
    return [by_name[name] for name in objectives]


class TrialHooks(RunHooks):
    """One trial's view of its run: MLflow logging, the progress bar, Optuna's pruner, the trial's record."""

    def __init__(self, objective: QLoRAObjective, trial: AnyTrial, sampled: dict[str, Any], bar: Any) -> None:
        self.objective = objective
        self.trial = trial
        self.sampled = sampled
        self.bar = bar
        self.run_id: str | None = None
        self.started = time.perf_counter()

    @property
    def tracker(self) -> Tracker | None:
        return self.objective.tracker if self.run_id is not None else None

    def on_start(self, cfg: RecipeConfig) -> None:
        resolved = recipe_record(cfg)
        record(self.trial, config=resolved)
        tracker = self.objective.tracker
        if tracker is None:
            return
        self.run_id = tracker.start_run(
            f"trial-{self.trial.number}", parent_id=self.objective.parent_run_id,
            tags={"trial_number": str(self.trial.number), "trial_state": "running",
                  "study": self.objective.cfg.study.name},
            params={**{f"config.{k}": v for k, v in resolved.items()}, **self.sampled})
        tracker.log_dict(self.run_id, resolved, "config.yaml")
        record(self.trial, mlflow_run_id=self.run_id)

    def on_forecast(self, predicted_peak_mb: float) -> None:
        record(self.trial, predicted_peak_mb=predicted_peak_mb)
        if self.tracker is not None and self.run_id is not None:
            self.tracker.log_metrics(self.run_id, 0, {"predicted_peak_memory_mb": predicted_peak_mb})

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{metrics['train_loss']:.3f}", refresh=False)
        if self.tracker is not None and self.run_id is not None:
            self.tracker.log_metrics(self.run_id, step, metrics)

    def on_eval(self, step: int, loss: float) -> None:
        if self.tracker is not None and self.run_id is not None:
            self.tracker.log_metrics(self.run_id, step, {"eval_loss": loss})
            self.tracker.flush(self.run_id)
        cfg = self.objective.cfg
        if not math.isfinite(loss) or len(cfg.study.objectives) > 1:  # Optuna prunes single-objective studies only
            return
        self.trial.report(loss, step)
        # At the last step the work is done: pruning would only throw the finished result away.
        if step < cfg.train.max_steps and self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step}: eval_loss {loss:.4f}")

    def on_retry(self, cfg: RecipeConfig, attempt: int, changes: dict[str, Any]) -> None:
        record(self.trial, config=recipe_record(cfg), oom_retries=attempt + 1)
        self.bar.reset()
        if self.tracker is not None and self.run_id is not None:
            self.tracker.set_tags(self.run_id, {"oom_retries": attempt + 1, **changes})

    def on_finish(self, result: TrainResult, adapter: Any) -> None:
        record(self.trial, trainable_params=result.trainable_params, peak_memory_mb=result.peak_memory_mb,
               train_seconds=result.seconds)
        if self.tracker is None or self.run_id is None:
            return
        seconds = time.perf_counter() - self.started
        self.tracker.log_metrics(self.run_id, result.steps, {
            "final_eval_loss": result.eval_loss, "trainable_params": result.trainable_params,
            "trial_seconds": seconds, "train_seconds": result.seconds})
        values = objective_values(self.objective.cfg.study.objectives, result, seconds)
        if self.objective.keep_adapter(self.trial, values):
            with tempfile.TemporaryDirectory(prefix="qlora-sweep-") as tmp:
                adapter.save_pretrained(tmp)
                self.tracker.log_artifacts(self.run_id, Path(tmp), "adapter")
            record(self.trial, adapter_uri=self.tracker.artifact_uri(self.run_id, "adapter"))


class QLoRAObjective:
    """Callable for ``study.optimize``: samples a trial's config and runs the recipe on the resident base.

    Failure policy: ``TrialPruned`` (pruner, non-finite loss, a forecast that does not fit) marks the trial
    pruned; any other exception marks it failed and propagates to Optuna, which records it and goes on with
    the next trial. Whatever happens, the trial's MLflow run is ended with its state.

    Example:
        >>> objective = QLoRAObjective(cfg, params, base, data, tracker, parent_run_id)  # doctest: +SKIP
        >>> objective(optuna.trial.FixedTrial({"lora.r": 8}))  # doctest: +SKIP
    """

    def __init__(self, cfg: SweepConfig, params: Sequence[Param], base: ResidentBase, data: TokenizedSplits,
                 tracker: Tracker | None, parent_run_id: str | None = None, show_progress: bool = True,
                 runner: Runner | None = None) -> None:
        self.cfg = cfg
        self.config = to_container(cfg)
        self.params = list(params)
        self.base = base
        self.data = data
        self.tracker = tracker
        self.parent_run_id = parent_run_id
        self.show_progress = show_progress
        self.memory_bytes = cfg.workers.memory_share(device_memory_bytes(base.device))
        self.runner: Runner = runner or (lambda cfg, hooks: run_recipe(cfg, base, data, self.memory_bytes, hooks))

    def trial_config(self, trial: AnyTrial) -> tuple[SweepConfig, dict[str, Any]]:
        """The sampled values applied to the sweep's config, and the values."""
        values = sample(trial, self.params)
        return to_schema(apply_values(self.config, values)), values

    def __call__(self, trial: AnyTrial) -> float | list[float]:
        cfg, sampled = self.trial_config(trial)
        hooks = TrialHooks(self, trial, sampled, tqdm(total=cfg.train.max_steps, desc=f"trial {trial.number}",
                                                      leave=False, disable=not self.show_progress, unit="step"))
        state, reason = "failed", ""
        try:
            try:
                run = self.runner(cfg, hooks)
            except (LossNotFinite, DoesNotFit) as e:
                raise optuna.TrialPruned(f"non-finite loss: {e}" if isinstance(e, LossNotFinite) else str(e)) from e
            values = objective_values(cfg.study.objectives, run.train, run.seconds)
            state = "complete"
            return values[0] if len(values) == 1 else values
        except optuna.TrialPruned as e:
            state, reason = "pruned", str(e)
            raise
        except Exception as e:
            reason = f"{type(e).__name__}: {e}"[:1000]
            raise
        finally:
            hooks.bar.close()
            record(trial, state_reason=reason)
            if hooks.tracker is not None and hooks.run_id is not None:
                tags = {"trial_state": state, **({"state_reason": reason} if reason else {})}
                hooks.tracker.set_tags(hooks.run_id, tags)
                hooks.tracker.end_run(hooks.run_id, RUN_STATUS[state])

    def keep_adapter(self, trial: AnyTrial, values: list[float]) -> bool:
        """Whether a finished trial's adapter is saved: always, never, or when it is the best so far."""
        policy = self.cfg.tracking.log_adapter
        if policy != "best":
            return policy == "all"
        study = getattr(trial, "study", None)
        if study is None or len(values) > 1:
            return True
        try:
            best = study.best_value
        except ValueError:  # no finished trial yet
            return True
        better: bool = values[0] < best if study.direction == optuna.study.StudyDirection.MINIMIZE else values[0] > best
        return better
