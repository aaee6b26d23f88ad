"""The Optuna objective: a trial becomes a recipe config, the recipe runs, pruning and logging ride its hooks."""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna

from objectives.base import ResidentBase
from objectives.config import RECIPE_SECTIONS, RecipeConfig
from objectives.data import TokenizedSplits
from objectives.decisions import device_memory_bytes
from objectives.host_turns import TURNS, PatientLock
from objectives.objective import DoesNotFit, RunHooks, RunResult, run_recipe
from objectives.training import LossNotFinite, TrainResult, evaluates_at
from sweeper import interrupts
from sweeper.config import SweepConfig, plain, to_container, to_schema, with_values
from sweeper.export import adapter_keeper
from sweeper.progress import progress_bar
from sweeper.records import TrialRecord, record
from sweeper.space import Param
from sweeper.study import fresh_reads
from sweeper.tracking import RUN_STATUS, STALE_AFTER_S, Tracker
from sweeper.values import apply_values, sample

AnyTrial = optuna.Trial | optuna.trial.FixedTrial
Runner = Callable[[RecipeConfig, RunHooks], RunResult]
"""Runs one trial's recipe: alone on the base (``run_recipe``), or in a slot engine's shared passes."""

log = logging.getLogger(__name__)
NOTE = "mlflow.note.content"
"""The run's description in the MLflow UI (markdown)."""
ADAPTER_TAG = "adapter_uri"
"""On a trial's run while its saved adapter is in the artifact store."""
REMOVED_TAG = "adapter_removed"
"""On a trial's run whose adapter a better trial's replaced: by which."""


def recipe_record(cfg: RecipeConfig) -> dict[str, Any]:
    """The parts of a config that describe one training run (logged, and what an export reproduces)."""
    return {k: plain(getattr(cfg, k)) for k in RECIPE_SECTIONS}


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
        self.step = 0
        """The last step trained (or evaluated): where a pruned or failed run stopped."""
        self.reported: set[int] = set()
        """Steps reported to Optuna, by this run's attempts together: after running out of memory a run starts
        over, and Optuna keeps the first report of a step (the first attempt passed its checks at those steps)."""

    @property
    def tracker(self) -> Tracker | None:
        return self.objective.tracker if self.run_id is not None else None

    def on_start(self, cfg: RecipeConfig) -> None:
        resolved = recipe_record(cfg)
        record(self.trial, config=resolved)
        tracker = self.objective.tracker
        if tracker is None:
            return
        if self.objective.run_name is None:
            name = f"trial-{self.trial.number}"
            tags = {"trial_number": str(self.trial.number), "study": self.objective.cfg.study.name}
            job = TrialRecord.of(self.trial).slurm_job
            if job:  # the parent run's children then show which array task ran each trial
                tags["slurm_job"] = job
        else:
            name, tags = self.objective.run_name, dict(self.objective.run_tags)
        self.run_id = tracker.start_run(name, parent_id=self.objective.parent_run_id,
                                        tags={**tags, "trial_state": "running"})
        record(self.trial, mlflow_run_id=self.run_id)  # first: a worker killed from here on leaves no stray run
        tracker.log_params(self.run_id, {**{f"config.{k}": v for k, v in resolved.items()}, **self.sampled})
        tracker.log_dict(self.run_id, resolved, "config.yaml")

    def on_forecast(self, predicted_peak_mb: float) -> None:
        record(self.trial, predicted_peak_mb=predicted_peak_mb)
        if self.tracker is not None and self.run_id is not None:
            self.tracker.log_metrics(self.run_id, 0, {"predicted_peak_memory_mb": predicted_peak_mb})

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self.step = step
        interrupts.check()  # after the step: a stop asked for meanwhile ends the trial here
        self.bar.update(1)
        # An evaluation follows some steps and takes as long as several of them (11 s on a CPU): say so.
        evaluating = self.evaluates_after(step)
        self.bar.set_postfix_str(f"loss={metrics['train_loss']:.3f}" + (", evaluating" if evaluating else ""),
                                 refresh=evaluating)
        if self.tracker is not None and self.run_id is not None:
            self.tracker.log_metrics(self.run_id, step, metrics)

    def on_eval(self, step: int, loss: float) -> None:
        self.step = step
        interrupts.check()
        self.bar.set_postfix_str(f"eval_loss={loss:.4f}", refresh=True)
        if self.tracker is not None and self.run_id is not None:
            self.tracker.log_metrics(self.run_id, step, {"eval_loss": loss})
            self.tracker.flush(self.run_id, stale_after=STALE_AFTER_S)
        cfg = self.objective.cfg
        if not math.isfinite(loss) or len(cfg.study.objectives) > 1:  # Optuna prunes single-objective studies only
            return
        if step in self.reported:  # a run started over: this step was reported, and checked, by its first attempt
            return
        self.reported.add(step)
        self.trial.report(loss, step)
        # At the last step the work is done: pruning would only throw the finished result away.
        if step < cfg.train.max_steps and self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step}: eval_loss {loss:.4f}")

    def evaluates_after(self, step: int) -> bool:
        """Whether the run evaluates after this step, by the trial's schedule (which the space may sample)."""
        train = self.objective.cfg.train
        return evaluates_at(step, int(self.sampled.get("train.eval_every", train.eval_every)),
                            int(self.sampled.get("train.max_steps", train.max_steps)))

    def on_retry(self, cfg: RecipeConfig, attempt: int, changes: dict[str, Any]) -> None:
        record(self.trial, config=recipe_record(cfg), oom_retries=attempt + 1)
        self.step = 0
        self.bar.reset()
        if self.tracker is not None and self.run_id is not None:
            self.tracker.set_tags(self.run_id, {"oom_retries": attempt + 1, **changes})

    def on_finish(self, result: TrainResult, adapter: Any) -> None:
        record(self.trial, trainable_params=result.trainable_params, peak_memory_mb=result.peak_memory_mb,
               train_seconds=result.seconds, graph_replays=result.graph_replays)
        if self.tracker is None or self.run_id is None:
            return
        seconds = time.perf_counter() - self.started
        self.tracker.log_metrics(self.run_id, result.steps, {
            "final_eval_loss": result.eval_loss, "trainable_params": result.trainable_params,
            "trial_seconds": seconds, "train_seconds": result.seconds, "graph_replays": result.graph_replays})
        values = objective_values(self.objective.cfg.study.objectives, result, seconds)
        kept = self.objective.keep_adapter(self.trial, values)
        if kept:
            with tempfile.TemporaryDirectory(prefix="qlora-sweep-") as tmp:
                # Adapters wrap linear layers and the vocabulary stays as loaded: no embeddings to save. peft's
                # "auto" would look the base (now named by its source) up on the Hub to find that out.
                adapter.save_pretrained(tmp, save_embedding_layers=False)
                self.tracker.log_artifacts(self.run_id, Path(tmp), "adapter")
            uri = self.tracker.artifact_uri(self.run_id, "adapter")
            record(self.trial, adapter_uri=uri)
            self.tracker.set_tags(self.run_id, {ADAPTER_TAG: uri})
        if self.objective.cfg.tracking.log_adapter == "best":
            # Also when this trial kept nothing: trials that saved at the same time each believed they
            # were the best; the next trial to finish leaves only the better one.
            self.objective.drop_superseded_adapters(self.trial, values, kept)

    def end_note(self, state: str, reason: str) -> str:
        """The run's description when it did not complete: pruned (stopped early on purpose) is no failure."""
        where = f"at step {self.step} of {self.objective.cfg.train.max_steps}" if self.step else "before training"
        if state == "pruned":
            return f"**Pruned** {where} (stopped early on purpose, not a failure): {reason}"
        if state == interrupts.REASON:
            return f"**Interrupted** {where} (SIGINT or SIGTERM); launching the study again runs the rest of its budget"
        return f"**Failed** {where}: {reason}"


class QLoRAObjective:
    """Callable for ``study.optimize``: samples a trial's config and runs the recipe on the resident base.

    Failure policy: ``TrialPruned`` (pruner, non-finite loss, a forecast that does not fit) marks the trial
    pruned; any other exception marks it failed and propagates to Optuna, which records it and goes on with
    the next trial. Whatever happens, the trial's MLflow run is ended with its state (and, pruned or failed,
    a description saying which and why).

    Example:
        >>> objective = QLoRAObjective(cfg, params, base, data, tracker, parent_run_id)  # doctest: +SKIP
        >>> objective(optuna.trial.FixedTrial({"lora.r": 8}))  # doctest: +SKIP
    """

    def __init__(self, cfg: SweepConfig, params: Sequence[Param], base: ResidentBase, data: TokenizedSplits,
                 tracker: Tracker | None, parent_run_id: str | None = None, show_progress: bool = True,
                 runner: Runner | None = None, run_name: str | None = None,
                 run_tags: Mapping[str, str] | None = None) -> None:
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
        self.run_name = run_name
        """A run outside a study (``train``): its MLflow run's name; ``run_tags`` replace the trial's tags."""
        self.run_tags = dict(run_tags or {})
        self._dropped: set[str] = set()
        self._dropping = PatientLock()

    def trial_config(self, trial: AnyTrial) -> tuple[SweepConfig, dict[str, Any]]:
        """The sampled values applied to the sweep's config, and the values."""
        values = sample(trial, self.params)
        return with_values(self.cfg, values) or to_schema(apply_values(self.config, values)), values

    def __call__(self, trial: AnyTrial) -> float | list[float]:
        with TURNS.bookkeeping():
            cfg, sampled = self.trial_config(trial)
        name = self.run_name or f"trial {trial.number}"
        hooks = TrialHooks(self, trial, sampled, progress_bar(cfg.train.max_steps, name, "step", leave=False,
                                                              disable=not self.show_progress))
        state, reason = "failed", ""
        try:
            try:
                with interrupts.trial_running():
                    run = self.runner(cfg, hooks)
            except (LossNotFinite, DoesNotFit) as e:
                raise optuna.TrialPruned(f"non-finite loss: {e}" if isinstance(e, LossNotFinite) else str(e)) from e
            values = objective_values(cfg.study.objectives, run.train, run.seconds)
            state = "complete"
            return values[0] if len(values) == 1 else values
        except optuna.TrialPruned as e:
            state, reason = "pruned", str(e)
            raise
        except interrupts.Interrupted:
            state = reason = interrupts.REASON
            raise
        except Exception as e:
            reason = f"{type(e).__name__}: {e}"[:1000]
            raise
        finally:
            with TURNS.bookkeeping():
                self.end(trial, hooks, state, reason)

    @staticmethod
    def end(trial: AnyTrial, hooks: TrialHooks, state: str, reason: str) -> None:
        """The trial's record and MLflow run say how it ended."""
        hooks.bar.close()
        record(trial, state_reason=reason)
        if hooks.tracker is not None and hooks.run_id is not None:
            tags = {"trial_state": state, **({"state_reason": reason} if reason else {})}
            if state != "complete":
                # The UI shows a pruned run as "Killed", beside failed ones: its description says which.
                tags[NOTE] = hooks.end_note(state, reason)
            hooks.tracker.end_run(hooks.run_id, RUN_STATUS[state], tags=tags)

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

    def drop_superseded_adapters(self, trial: AnyTrial, values: list[float], kept: bool) -> None:
        """``log_adapter=best``: delete every saved adapter but the best's from the artifact store.

        A finished trial's record cannot change; its run loses the ``adapter_uri`` tag and gets
        ``adapter_removed``, and an export works out from the study which adapter is left (see
        ``export.adapter_keeper``). Trials still running are left alone: their value is not known yet.
        """
        study = getattr(trial, "study", None)
        if study is None or self.tracker is None or len(values) > 1:
            return
        with fresh_reads():  # a trial that finished a moment ago may hold the better adapter
            trials = study.get_trials(deepcopy=False)
        holders = {t.number: t for t in trials
                   if t.number != trial.number and t.state.is_finished() and TrialRecord.of(t).adapter_uri}
        complete = [(n, t.value) for n, t in holders.items() if t.state == optuna.trial.TrialState.COMPLETE]
        keeper = adapter_keeper(complete + ([(trial.number, values[0])] if kept else []), study.direction)
        reason = ""
        if keeper is not None:
            best = values[0] if keeper == trial.number else holders[keeper].value
            reason = f"superseded by trial {keeper} ({self.cfg.study.objectives[0]} {best:.4f})"
        for n, t in holders.items():
            if t.state != optuna.trial.TrialState.COMPLETE:  # saved, then failed (its worker died): no result
                self.drop_adapter(TrialRecord.of(t).mlflow_run_id, f"trial {n} {t.state.name.lower()}")
            elif n != keeper:
                self.drop_adapter(TrialRecord.of(t).mlflow_run_id, reason)
        if kept and keeper != trial.number:  # a better trial finished while this one saved
            self.drop_adapter(TrialRecord.of(trial).mlflow_run_id, reason)
            record(trial, adapter_uri=None)

    def drop_adapter(self, run_id: str | None, reason: str) -> None:
        """Delete a run's saved adapter through its artifact repository, once (another worker or an earlier
        session may have done it: its run says so); a failure is logged, not raised."""
        if self.tracker is None or run_id is None:
            return
        from mlflow.exceptions import MlflowException

        # One thread at a time: trials finishing together each found the same superseded adapter.
        with self._dropping:
            if run_id in self._dropped:
                return
            try:
                run = self.tracker.get_run(run_id)
                tags = run.data.tags
                if REMOVED_TAG not in tags:
                    self.tracker.delete_artifacts(run.info.artifact_uri, "adapter")
                    self.tracker.set_tags(run_id, {REMOVED_TAG: reason})
                    if ADAPTER_TAG in tags:
                        self.tracker.delete_tag(run_id, ADAPTER_TAG)
            except (MlflowException, OSError) as e:  # housekeeping: the sweep goes on, with one adapter too many
                log.warning("could not delete the superseded adapter of run %s: %s", run_id, e)
                return
            self._dropped.add(run_id)
