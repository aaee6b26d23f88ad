"""Per-trial decisions from the memory model: does a trial fit, and does it need gradient checkpointing."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, TypeVar

from objectives.config import ConfigError, RecipeConfig
from objectives.memory import ALLOCATOR_SLACK, estimate_worst
from objectives.shape import TrialSettings

Recipe = TypeVar("Recipe", bound=RecipeConfig)


def fits(cfg: Recipe, model_config: Any, device_memory_bytes: int,
         linear_names: Sequence[str] | None = None) -> tuple[bool, int]:
    """Pre-flight check for one trial: (predicted total <= device memory, predicted total in bytes).

    ``linear_names`` (``ResidentBase.linear_names``) resolves the targets against the loaded model.
    """
    total = estimate_worst(model_config, TrialSettings.from_config(cfg), linear_names).total
    return total <= device_memory_bytes, total


def with_checkpointing(cfg: Recipe, on: bool) -> Recipe:
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, gradient_checkpointing=on))


def resolve_checkpointing(cfg: Recipe, model_config: Any, memory_bytes: int,
                          linear_names: Sequence[str] | None = None) -> Recipe:
    """A trial's config with ``model.gradient_checkpointing: auto`` decided: off when the trial is predicted to
    fit in ``memory_bytes`` without it (no recomputed forward: faster steps), on otherwise. ``true`` and
    ``false`` are kept. A model the memory model does not know keeps checkpointing on."""
    if cfg.model.gradient_checkpointing != "auto":
        return cfg
    try:
        fits_without = fits(with_checkpointing(cfg, False), model_config, memory_bytes, linear_names)[0]
    except ConfigError:
        fits_without = False
    return with_checkpointing(cfg, not fits_without)


def device_memory_bytes(device: Any = None) -> int:
    """Memory of the device a trial trains on: the GPU's, or the host's on the CPU (or when ``device`` is None)."""
    import psutil
    import torch

    if device is not None and device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return int(psutil.virtual_memory().total)




def slots_memory_bytes(cfg: RecipeConfig, model_config: Any, slots: int, r_max: int, checkpointing: bool,
                       linear_names: Sequence[str] | None = None) -> int:
    """Predicted peak of ``slots`` runs sharing each pass (:class:`objectives.engine.SlotEngine`): the
    activations of ``slots`` micro-batches, and per slot an adapter of rank ``r_max`` on every linear layer
    (what the engine allocates) with its gradients and AdamW state."""
    settings = dataclasses.replace(
        TrialSettings.from_config(cfg), r=r_max, targets="all-linear", optimizer="adamw",
        micro_batch_size=slots * cfg.train.micro_batch_size, gradient_checkpointing=checkpointing)
    one = estimate_worst(model_config, settings, linear_names)
    per_slot = one.adapter + one.gradients + one.optimizer
    return int(one.total + (slots - 1) * per_slot * (1 + ALLOCATOR_SLACK))


def slots_that_fit(cfg: RecipeConfig, model_config: Any, memory_bytes: int, r_max: int, cap: int,
                   linear_names: Sequence[str] | None = None) -> tuple[int, bool]:
    """The most runs per pass (at most ``cap``) predicted to fit in ``memory_bytes``, and whether they need
    gradient checkpointing (``model.gradient_checkpointing``: ``auto`` takes it only when it fits more runs).
    At least 1, even when one does not fit: the run's own forecast then says so."""
    setting = cfg.model.gradient_checkpointing
    choices = [False, True] if setting == "auto" else [bool(setting)]
    best: tuple[int, bool] = (1, choices[-1])
    for checkpointing in choices:
        fitting = [k for k in range(1, cap + 1)
                   if slots_memory_bytes(cfg, model_config, k, r_max, checkpointing, linear_names) <= memory_bytes]
        if fitting and fitting[-1] > best[0]:
            best = (fitting[-1], checkpointing)
    return best
