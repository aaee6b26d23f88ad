"""One training run of the recipe: forecast its memory, attach an adapter, train, evaluate, detach.

A caller watches the run through :class:`RunHooks`; any hook may raise to stop it (a sweep prunes this way).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from objectives.base import ResidentBase, free_accelerator_memory
from objectives.config import ConfigError, RecipeConfig, TrainConfig
from objectives.data import TokenizedSplits
from objectives.decisions import (
    Recipe,
    fits,
    resolve_trial,
    with_base_cache,
    with_checkpointing,
    with_cuda_graphs,
)
from objectives.training import TrainResult, train_adapter

log = logging.getLogger(__name__)


class TrialOutOfMemory(RuntimeError):
    """Out of memory even at the smallest micro-batch the retry policy allows."""


class DoesNotFit(RuntimeError):
    """The memory model predicts the run will not fit its share of the device: stopped before it loads."""


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


class RunHooks:
    """What a caller of :func:`run_recipe` sees of a run. Every method may raise to stop the run."""

    def on_start(self, cfg: RecipeConfig) -> None:
        """The config the run will train, per-run decisions made (every ``auto`` of :func:`plan_run`)."""

    def on_forecast(self, predicted_peak_mb: float) -> None:
        """The memory model's forecast of the run's peak, before anything trains."""

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        """After each optimizer step: train_loss, learning_rate, grad_norm, tokens_per_s, peak_memory_mb."""

    def on_eval(self, step: int, loss: float) -> None:
        """After each evaluation (a non-finite loss stops the run right after this hook)."""

    def on_retry(self, cfg: RecipeConfig, attempt: int, changes: dict[str, Any]) -> None:
        """Out of memory: the run starts over with ``changes`` (``cfg`` is the config it now trains)."""

    def on_finish(self, result: TrainResult, adapter: Any) -> None:
        """Training is done; ``adapter`` (the peft model) is still attached, for saving."""


@dataclass
class RunResult:
    """A finished run: what it measured and the config it trained in the end."""

    train: TrainResult
    config: RecipeConfig
    """After per-run decisions (checkpointing) and out-of-memory retries (micro-batch)."""
    seconds: float
    """Wall time of the whole run, set-up and logging included."""


def plan_run(cfg: Recipe, base: ResidentBase, memory_bytes: int) -> Recipe:
    """The run's config with every ``auto`` decided for ``memory_bytes`` of the base's device
    (:func:`objectives.decisions.resolve_trial`): the fused loss only where memory asks for it, checkpointing off
    when the memory model predicts the run fits without it (no recomputed forward), the base cache on when it
    predicts the run still fits with it."""
    return resolve_trial(cfg, base.config, memory_bytes, base.device.type, base.linear_names)


def forecast(cfg: RecipeConfig, base: ResidentBase, memory_bytes: int, hooks: RunHooks) -> None:
    """Report the predicted peak memory; on a GPU, refuse a run predicted not to fit, before it loads.

    Raises:
        DoesNotFit: the forecast exceeds ``memory_bytes`` on a GPU.
    """
    on_gpu = base.device.type == "cuda"
    capacity = memory_bytes if on_gpu else 2**62
    try:
        ok, need = fits(cfg, base.config, capacity, base.linear_names)
    except ConfigError as e:  # an architecture the memory model does not know: train without a forecast
        log.info("no memory prediction for this model: %s", e)
        return
    hooks.on_forecast(need / 2**20)
    if not ok:
        raise DoesNotFit(f"predicted peak memory {need / 2**30:.1f} GiB exceeds the "
                         f"{capacity / 2**30:.1f} GiB this trial may use of the device")


def run_recipe(cfg: RecipeConfig, base: ResidentBase, data: TokenizedSplits, memory_bytes: int,
               hooks: RunHooks | None = None) -> RunResult:
    """Train one adapter on the resident base and evaluate it.

    ``memory_bytes`` is the run's share of the device, which decides every ``auto`` (:func:`plan_run`)
    and, on a GPU, whether the run may start at all. Failure policy: an out-of-memory error frees memory and
    retries, first without the base cache and with gradient checkpointing (where ``auto`` chose the copy or no
    checkpointing), then with half the micro-batch and twice the accumulation, up to ``train.oom_retries``
    times; anything else propagates. Whatever happens, the adapter's gradients are released.

    Raises:
        DoesNotFit: predicted not to fit (on a GPU), before anything trains.
        LossNotFinite: the loss, gradient norm or an evaluation became NaN or infinite.
        TrialOutOfMemory: out of memory after every retry.
    """
    hooks = hooks or RunHooks()
    started = time.perf_counter()
    auto = cfg.model.gradient_checkpointing == "auto"
    auto_cache = cfg.model.base_cache == "auto"
    auto_graphs = cfg.train.cuda_graphs == "auto"
    cfg = plan_run(cfg, base, memory_bytes)
    hooks.on_start(cfg)
    forecast(cfg, base, memory_bytes, hooks)
    base.use_checkpointing(cfg.model.gradient_checkpointing)
    base.use_base_cache(cfg.model.base_cache)
    for attempt in range(cfg.train.oom_retries + 1):
        try:
            with base.adapter(cfg.lora, cfg.train.seed) as model:
                result = train_adapter(model, data, cfg.train, cfg.optimizer, base.device,
                                       base.tokenizer.pad_token_id, on_step=hooks.on_step, on_eval=hooks.on_eval)
                hooks.on_finish(result, model)
                return RunResult(result, cfg, time.perf_counter() - started)
        except Exception as e:
            if not is_out_of_memory(e):
                raise
        # Out of memory. Freed here, outside the except block, where no traceback pins the step's tensors.
        free_accelerator_memory(base.device)
        undo: dict[str, Any] = {}
        if auto_cache and base.base_cache:
            undo["base_cache"] = False
        if auto and not base.checkpointing:
            undo["gradient_checkpointing"] = True
        if cfg.train.cuda_graphs is True and (auto_graphs or "gradient_checkpointing" in undo):
            undo["cuda_graphs"] = False  # a graph's pool holds a step's activations; they need checkpointing off
        if attempt < cfg.train.oom_retries and undo:
            # The forecast said the same batch fits with the base cache, without checkpointing and with CUDA graphs,
            # and it did not: first that batch with the memory-saving choices, one retry for all.
            log.warning("out of memory with the memory model's choices; retrying with %s",
                        ", ".join(f"{k}={v}" for k, v in undo.items()))
            if "base_cache" in undo:
                base.use_base_cache(False)
                cfg = with_base_cache(cfg, False)
            if "gradient_checkpointing" in undo:
                base.use_checkpointing(True)
                cfg = with_checkpointing(cfg, True)
            if "cuda_graphs" in undo:
                cfg = with_cuda_graphs(cfg, False)
            hooks.on_retry(cfg, attempt, undo)
            continue
        smaller = halve_micro_batch(cfg.train)
        if smaller is None or attempt == cfg.train.oom_retries:
            raise TrialOutOfMemory(f"out of memory at micro_batch_size={cfg.train.micro_batch_size}, "
                                   f"grad_accum={cfg.train.grad_accum} after {attempt} retries")
        log.warning("out of memory at micro_batch_size=%d; retrying with %d x %d accumulation",
                    cfg.train.micro_batch_size, smaller.micro_batch_size, smaller.grad_accum)
        cfg = dataclasses.replace(cfg, train=smaller)
        hooks.on_retry(cfg, attempt, {"micro_batch_size": smaller.micro_batch_size, "grad_accum": smaller.grad_accum})
    raise AssertionError("unreachable")
