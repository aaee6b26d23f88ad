"""The QLoRA objective: one Optuna trial = sample, attach an adapter, train, evaluate, detach."""

from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import optuna
import torch
from tqdm.auto import tqdm

from objectives.data import TokenizedSplits
from objectives.model import ResidentBase, free_accelerator_memory
from objectives.training import LossNotFinite, TrainResult, train_adapter
from sweeper.config import ConfigError, SweepConfig, TrainConfig, to_container, to_schema
from sweeper.plan import fits, resolve_checkpointing, trial_memory_bytes, with_checkpointing
from sweeper.space import Param, apply_values, sample
from sweeper.tracking import RUN_STATUS, Tracker

log = logging.getLogger(__name__)

# Keys of the config that describe the trial's training (logged as params); the rest is bookkeeping.
TRIAL_KEYS = ("model", "data", "lora", "optimizer", "train")


class TrialOutOfMemory(RuntimeError):
    """Out of memory even at the smallest micro-batch the retry policy allows."""


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower())


def halve_micro_batch(train: TrainConfig) -> TrainConfig | None:
    """Half the micro-batch, twice the accumulation: the same effective batch. None below one example."""
    size = train.micro_batch_size
    if size < 2:
        return None
    if size % 2:  # odd: one example at a time keeps the effective batch exact
        return dataclasses.replace(train, micro_batch_size=1, grad_accum=train.grad_accum * size)
    return dataclasses.replace(train, micro_batch_size=size // 2, grad_accum=train.grad_accum * 2)


def trial_record(cfg: SweepConfig) -> dict[str, Any]:
    """The parts of a trial's config that describe its training (logged, and what an export reproduces)."""
    return {k: v for k, v in to_container(cfg).items() if k in TRIAL_KEYS}


def objective_values(cfg: SweepConfig, result: TrainResult, seconds: float) -> list[float]:
    by_name = {"eval_loss": result.eval_loss, "trainable_params": float(result.trainable_params),
               "peak_memory_mb": result.peak_memory_mb, "trial_seconds": seconds}
    return [by_name[name] for name in cfg.study.objectives]


class QLoRAObjective:
    """Callable for ``study.optimize``; holds the resident base, the data and the tracker.

    Failure policy: ``TrialPruned`` (pruner, non-finite loss) marks the trial pruned; any other
    exception marks it failed and propagates to Optuna, which records it and goes on with the next
    trial. Whatever happens, the adapter is detached and the trial's MLflow run is ended.

    Example:
        >>> objective = QLoRAObjective(cfg, params, base, data, tracker, parent_run_id)  # doctest: +SKIP
        >>> objective(optuna.trial.FixedTrial({"lora.r": 8}))  # doctest: +SKIP
    """

    def __init__(self, cfg: SweepConfig, params: Sequence[Param], base: ResidentBase, data: TokenizedSplits,
                 tracker: Tracker | None, parent_run_id: str | None = None, show_progress: bool = True) -> None:
        self.cfg = cfg
        self.config = to_container(cfg)
        self.params = list(params)
        self.base = base
        self.data = data
        self.tracker = tracker
        self.parent_run_id = parent_run_id
        self.show_progress = show_progress
        self.memory_bytes = trial_memory_bytes(cfg, base.device)

    def trial_config(self, trial: optuna.Trial | optuna.trial.FixedTrial) -> tuple[SweepConfig, dict[str, Any]]:
        """The sampled values applied, and checkpointing ``auto`` decided for this trial's memory."""
        values = sample(trial, self.params)
        cfg = to_schema(apply_values(self.config, values))
        return resolve_checkpointing(cfg, self.base.config, self.memory_bytes, self.base.linear_names), values

    def __call__(self, trial: optuna.Trial | optuna.trial.FixedTrial) -> float | list[float]:
        cfg, sampled = self.trial_config(trial)
        resolved = trial_record(cfg)
        trial.set_user_attr("config", resolved)
        run_id = self._start_run(trial, cfg, resolved, sampled)
        state, reason = "failed", ""
        started = time.perf_counter()
        bar = tqdm(total=cfg.train.max_steps, desc=f"trial {trial.number}", leave=False,
                   disable=not self.show_progress, unit="step")
        try:
            values = self._train(trial, cfg, run_id, bar, started)
            state = "complete"
            return values[0] if len(values) == 1 else values
        except optuna.TrialPruned as e:
            state, reason = "pruned", str(e)
            raise
        except LossNotFinite as e:
            state, reason = "pruned", f"non-finite loss: {e}"
            raise optuna.TrialPruned(reason) from e
        except Exception as e:
            reason = f"{type(e).__name__}: {e}"[:1000]
            raise
        finally:
            bar.close()
            trial.set_user_attr("state_reason", reason)
            if self.tracker is not None and run_id is not None:
                self.tracker.set_tags(run_id, {"trial_state": state, **({"state_reason": reason} if reason else {})})
                self.tracker.end_run(run_id, RUN_STATUS[state])

    def _preflight(self, trial: Any, cfg: SweepConfig, run_id: str | None) -> None:
        """Log the predicted peak memory; on a GPU, prune a configuration predicted not to fit, before it loads."""
        on_gpu = self.base.device.type == "cuda"
        capacity = self.memory_bytes if on_gpu else 2**62
        try:
            ok, need = fits(cfg, self.base.config, capacity, self.base.linear_names)
        except ConfigError as e:  # an architecture the memory model does not know: train without a forecast
            log.info("no memory prediction for this model: %s", e)
            return
        trial.set_user_attr("predicted_peak_mb", need / 2**20)
        if self.tracker is not None and run_id is not None:
            self.tracker.log_metrics(run_id, 0, {"predicted_peak_memory_mb": need / 2**20})
        if not ok:
            raise optuna.TrialPruned(f"predicted peak memory {need / 2**30:.1f} GiB exceeds the "
                                     f"{capacity / 2**30:.1f} GiB this trial may use of the device")

    def _train(self, trial: Any, cfg: SweepConfig, run_id: str | None, bar: Any, started: float) -> list[float]:
        """Train and evaluate; on out-of-memory, retry with half the micro-batch and twice the accumulation."""
        self._preflight(trial, cfg, run_id)
        self.base.use_checkpointing(cfg.model.gradient_checkpointing)
        train_cfg = cfg.train
        for retry in range(cfg.train.oom_retries + 1):
            try:
                with self.base.adapter(cfg.lora, train_cfg.seed) as model:
                    bar.reset()
                    result = train_adapter(
                        model, self.data, train_cfg, cfg.optimizer, self.base.device,
                        self.base.tokenizer.pad_token_id,
                        on_step=lambda step, metrics: self._on_step(run_id, bar, step, metrics),
                        on_eval=lambda step, loss: self._on_eval(trial, run_id, step, loss))
                    seconds = time.perf_counter() - started
                    values = objective_values(cfg, result, seconds)
                    self._log_result(trial, run_id, result, seconds, model, values)
                    return values
            except Exception as e:
                if not is_out_of_memory(e):
                    raise
            # Out of memory. Freed here, outside the except block, where no traceback pins the step's tensors.
            free_accelerator_memory(self.base.device)
            if (retry < cfg.train.oom_retries and self.cfg.model.gradient_checkpointing == "auto"
                    and not self.base.checkpointing):
                # The forecast said it fits without checkpointing and it did not: first the same batch with it.
                log.warning("trial %d: out of memory without gradient checkpointing; retrying with it", trial.number)
                self.base.use_checkpointing(True)
                trial.set_user_attr("config", trial_record(with_checkpointing(cfg, True)))
                self._record_retry(trial, run_id, retry, {"gradient_checkpointing": True})
                continue
            smaller = halve_micro_batch(train_cfg)
            if smaller is None or retry == cfg.train.oom_retries:
                raise TrialOutOfMemory(f"out of memory at micro_batch_size={train_cfg.micro_batch_size}, "
                                       f"grad_accum={train_cfg.grad_accum} after {retry} retries")
            log.warning("trial %d: out of memory at micro_batch_size=%d; retrying with %d x %d accumulation",
                        trial.number, train_cfg.micro_batch_size, smaller.micro_batch_size, smaller.grad_accum)
            train_cfg = smaller
            self._record_retry(trial, run_id, retry, {"micro_batch_size": smaller.micro_batch_size,
                                                      "grad_accum": smaller.grad_accum})
        raise AssertionError("unreachable")

    def _record_retry(self, trial: Any, run_id: str | None, retry: int, changes: dict[str, Any]) -> None:
        trial.set_user_attr("oom_retries", retry + 1)
        if self.tracker is not None and run_id is not None:
            self.tracker.set_tags(run_id, {"oom_retries": retry + 1, **changes})

    def _start_run(self, trial: Any, cfg: SweepConfig, resolved: dict[str, Any],
                   sampled: dict[str, Any]) -> str | None:
        if self.tracker is None:
            return None
        run_id = self.tracker.start_run(
            f"trial-{trial.number}", parent_id=self.parent_run_id,
            tags={"trial_number": str(trial.number), "trial_state": "running", "study": cfg.study.name},
            params={**{f"config.{k}": v for k, v in resolved.items()}, **sampled})
        self.tracker.log_dict(run_id, resolved, "config.yaml")
        trial.set_user_attr("mlflow_run_id", run_id)
        return run_id

    def _on_step(self, run_id: str | None, bar: Any, step: int, metrics: dict[str, float]) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['train_loss']:.3f}", refresh=False)
        if self.tracker is not None and run_id is not None:
            self.tracker.log_metrics(run_id, step, metrics)

    def _on_eval(self, trial: Any, run_id: str | None, step: int, loss: float) -> None:
        if self.tracker is not None and run_id is not None:
            self.tracker.log_metrics(run_id, step, {"eval_loss": loss})
            self.tracker.flush(run_id)
        if not math.isfinite(loss):
            raise LossNotFinite(f"eval loss is {loss} at step {step}")
        if len(self.cfg.study.objectives) == 1:  # Optuna prunes single-objective studies only
            trial.report(loss, step)
            # At the last step the work is done: pruning would only throw the finished result away.
            if step < self.cfg.train.max_steps and trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step}: eval_loss {loss:.4f}")

    def _log_result(self, trial: Any, run_id: str | None, result: TrainResult, seconds: float,
                    model: Any, values: list[float]) -> None:
        trial.set_user_attr("trainable_params", result.trainable_params)
        trial.set_user_attr("peak_memory_mb", result.peak_memory_mb)
        trial.set_user_attr("train_seconds", result.seconds)
        if self.tracker is None or run_id is None:
            return
        self.tracker.log_metrics(run_id, result.steps, {
            "final_eval_loss": result.eval_loss, "trainable_params": result.trainable_params,
            "trial_seconds": seconds, "train_seconds": result.seconds})
        if self._keep_adapter(trial, values):
            with tempfile.TemporaryDirectory(prefix="qlora-sweep-") as tmp:
                model.save_pretrained(tmp)
                self.tracker.log_artifacts(run_id, Path(tmp), "adapter")
            trial.set_user_attr("adapter_uri", self.tracker.artifact_uri(run_id, "adapter"))

    def _keep_adapter(self, trial: Any, values: list[float]) -> bool:
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
        better = values[0] < best if study.direction == optuna.study.StudyDirection.MINIMIZE else values[0] > best
        return better

