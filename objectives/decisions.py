"""Per-trial decisions from the memory model: does a trial fit, and does it need gradient checkpointing."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, TypeVar

from objectives.config import ConfigError, RecipeConfig
from objectives.memory import estimate_worst
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


