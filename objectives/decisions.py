"""Per-trial decisions from the memory model: does a trial fit, does its loss run fused, does it need gradient
checkpointing, may it keep the base's dequantized copy."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from objectives.config import FOUR_BIT, ConfigError, RecipeConfig
from objectives.memory import ALLOCATOR_SLACK, estimate, estimate_worst
from objectives.shape import TrialSettings
from objectives.timing import host_bound

Recipe = TypeVar("Recipe", bound=RecipeConfig)


def fits(cfg: Recipe, model_config: Any, device_memory_bytes: int,
         linear_names: Sequence[str] | None = None) -> tuple[bool, int]:
    """Pre-flight check for one trial: (predicted total <= device memory, predicted total in bytes).

    ``linear_names`` (``ResidentBase.linear_names``) resolves the targets against the loaded model.
    """
    total = estimate_worst(model_config, TrialSettings.from_config(cfg), linear_names).total
    return total <= device_memory_bytes, total


def with_checkpointing(cfg: Recipe, on: bool | str) -> Recipe:
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


def with_base_cache(cfg: Recipe, on: bool) -> Recipe:
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, base_cache=on))


def resolve_base_cache(cfg: Recipe, model_config: Any, memory_bytes: int,
                       linear_names: Sequence[str] | None = None) -> Recipe:
    """A trial's config with ``model.base_cache: auto`` decided: on where the trial, with its checkpointing as
    decided, is predicted to fit in ``memory_bytes`` with the copy beside it, off otherwise (and for a base that
    is not 4-bit). The copy only saves work, so it never takes memory a trial needs; on the CPU it is faster
    too (dequantizing each layer's weight is a large part of a CPU step). ``true`` and ``false`` are kept."""
    if cfg.model.base_cache != "auto":
        return cfg
    if cfg.model.quant_type not in FOUR_BIT:
        return with_base_cache(cfg, False)
    try:
        fits_with = fits(with_base_cache(cfg, True), model_config, memory_bytes, linear_names)[0]
    except ConfigError:
        fits_with = False
    return with_base_cache(cfg, fits_with)


def with_fused_loss(cfg: Recipe, on: bool) -> Recipe:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, fused_loss=on))


def resolve_fused_loss(cfg: Recipe, device_kind: str, model_config: Any = None, memory_bytes: int | None = None,
                       linear_names: Sequence[str] | None = None) -> Recipe:
    """A trial's config with ``train.fused_loss: auto`` decided where it can run (CUDA, liger-kernel, a supported
    model family; off elsewhere). It saves memory but costs time (0.82-0.91x the tokens/s of the plain loss on the
    1B and 8B shapes, 0.84x on a default 135M trial; BENCHMARKS.md), less than checkpointing's recomputed forward
    costs. So of the ways the trial may run, fastest first (full logits without checkpointing, fused without,
    full logits with checkpointing, fused with; checkpointing only where ``model.gradient_checkpointing``
    allows it), the first predicted to fit ``memory_bytes`` decides; where none fits, the fused loss is on.
    Without ``memory_bytes``: on wherever it can run.

    Raises:
        ConfigError: ``train.fused_loss`` is on where it cannot run.
    """
    from objectives.loss import check_fused_loss

    reason = check_fused_loss(cfg.train.fused_loss, device_kind, model_config)
    if cfg.train.fused_loss == "auto":
        if reason is not None or memory_bytes is None:
            return with_fused_loss(cfg, reason is None)
        setting = cfg.model.gradient_checkpointing
        for checkpointing in ([False, True] if setting == "auto" else [bool(setting)]):
            for fused in (False, True):
                try:
                    if fits(with_checkpointing(with_fused_loss(cfg, fused), checkpointing), model_config,
                            memory_bytes, linear_names)[0]:
                        return with_fused_loss(cfg, fused)
                except ConfigError:
                    break
        return with_fused_loss(cfg, True)
    return cfg


def with_cuda_graphs(cfg: Recipe, on: bool) -> Recipe:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, cuda_graphs=on))


def cuda_graphs_unavailable(cfg: RecipeConfig, device_kind: str) -> str | None:
    """Why a trial's passes cannot be replayed as CUDA graphs, its other switches as decided (None: they can)."""
    if device_kind != "cuda":
        return f"needs CUDA (the trial trains on the {device_kind})"
    if cfg.model.gradient_checkpointing is not False:
        return "needs gradient checkpointing off (its recomputation reads the random state on the host)"
    if cfg.train.fused_loss is not False:
        return "needs the plain loss (train.fused_loss=off)"
    if not cfg.train.packing and cfg.train.grad_accum > 1:
        return "needs one pass per step (train.packing=true, or train.grad_accum=1)"
    return None


def resolve_cuda_graphs(cfg: Recipe, device_kind: str, model_config: Any = None, memory_bytes: int | None = None,
                        linear_names: Sequence[str] | None = None) -> Recipe:
    """A trial's config with ``train.cuda_graphs: auto`` decided: on where the graphs can run, the time model
    predicts the host bounds the step (:func:`objectives.timing.host_bound`: where the device bounds it, a replay
    saves nothing and the captures cost), and the trial is predicted to fit with its activations counted twice (a
    graph's memory pool keeps a step's activations between steps, and an evaluation's forward allocates beside
    them); without ``memory_bytes``, wherever they can run.

    Raises:
        ConfigError: ``train.cuda_graphs`` is on where the graphs cannot run.
    """
    reason = cuda_graphs_unavailable(cfg, device_kind)
    if cfg.train.cuda_graphs is True and reason is not None:
        raise ConfigError(f"train.cuda_graphs: on {reason}; use auto or off")
    if cfg.train.cuda_graphs != "auto":
        return cfg
    if reason is not None or memory_bytes is None:
        return with_cuda_graphs(cfg, reason is None)
    settings = TrialSettings.from_config(with_cuda_graphs(cfg, True))
    try:
        need = estimate_worst(model_config, settings, linear_names)
        pays = host_bound(model_config, settings)
    except ConfigError:
        return with_cuda_graphs(cfg, False)
    return with_cuda_graphs(cfg, pays and need.total + need.activations <= memory_bytes)


def resolve_trial(cfg: Recipe, model_config: Any, memory_bytes: int, device_kind: str,
                  linear_names: Sequence[str] | None = None) -> Recipe:
    """Every ``auto`` of a trial decided, in this order: the fused loss (on where it can run and the trial does not
    fit without it), gradient checkpointing (off where the trial fits without it), the base cache (on where it
    still fits), CUDA graphs (on where they can run and the trial fits with their memory held)."""
    cfg = resolve_fused_loss(cfg, device_kind, model_config, memory_bytes, linear_names)
    cfg = resolve_checkpointing(cfg, model_config, memory_bytes, linear_names)
    cfg = resolve_base_cache(cfg, model_config, memory_bytes, linear_names)
    return resolve_cuda_graphs(cfg, device_kind, model_config, memory_bytes, linear_names)


def device_memory_bytes(device: Any = None) -> int:
    """Memory of the device a trial trains on: the GPU's, or the host's on the CPU (or when ``device`` is None)."""
    import psutil
    import torch

    if device is not None and device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return int(psutil.virtual_memory().total)




def slots_memory_bytes(cfg: RecipeConfig, model_config: Any, slots: int, r_max: int, checkpointing: bool,
                       linear_names: Sequence[str] | None = None, base_cache: bool = False,
                       rows: int | None = None, width: int | None = None, routed: bool = False) -> int:
    """Predicted peak of ``slots`` runs sharing each pass (:class:`objectives.engine.SlotEngine`): the
    activations of ``slots`` micro-batches (or of one pass of ``rows`` rows ``width`` tokens wide), and per slot
    an adapter of rank ``r_max`` on every linear layer (what the engine allocates) with its gradients and AdamW
    state; with ``base_cache``, the base's copy. ``routed``: the pass goes through flash's variable-length kernel
    in bf16 (:func:`objectives.attention.routed`), which takes no mask, so a row as wide as a run's examples end
    to end costs its tokens alone."""
    settings = dataclasses.replace(
        TrialSettings.from_config(cfg), r=r_max, targets="all-linear", optimizer="adamw",
        micro_batch_size=rows or slots * cfg.train.micro_batch_size, seq_len=width or cfg.data.max_length,
        gradient_checkpointing=checkpointing, base_cache=base_cache and cfg.model.quant_type in FOUR_BIT,
        cuda_graphs=False)
    if routed:
        one = estimate(model_config, dataclasses.replace(settings, padded=False, bf16_attention=True), linear_names)
    else:
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


def slots_base_cache(cfg: RecipeConfig, model_config: Any, memory_bytes: int, slots: int, r_max: int,
                     checkpointing: bool, linear_names: Sequence[str] | None = None) -> bool:
    """``model.base_cache`` for a worker's slot engine: ``auto`` keeps the copy where ``slots`` runs per pass
    are predicted to fit with it (the slots are decided first: more runs per pass gain more than the copy)."""
    setting = cfg.model.base_cache
    if setting != "auto":
        return bool(setting)
    if cfg.model.quant_type not in FOUR_BIT:
        return False
    try:
        need = slots_memory_bytes(cfg, model_config, slots, r_max, checkpointing, linear_names, base_cache=True)
    except ConfigError:
        return False
    return need <= memory_bytes


ROUTED_WIDTH_STEP = 128
"""A routed pass's width is rounded up to a multiple of this for its checkpointing decision (a larger estimate)."""


@dataclass(eq=False)
class PassCheckpointing:
    """Gradient checkpointing decided per training pass of a slot engine (``model.gradient_checkpointing: auto``
    where the worst case needs it): off for a pass whose real rows are predicted to fit without it.

    The worst case counts every slot's micro-batch at ``data.max_length``; a pass holds the rows its runs' examples
    pack into, padded to its widest, which on short examples is a fraction of that (on the default data, 64
    slots of rank 64 on SmolLM2-135M were predicted at 147 GiB without checkpointing and measured at 98 GiB).
    """

    cfg: RecipeConfig
    model_config: Any
    memory_bytes: int
    slots: int
    r_max: int
    base_cache: bool
    linear_names: tuple[str, ...] | None = None
    _decided: dict[tuple[int, int, bool], bool] = field(default_factory=dict, repr=False)

    def __call__(self, rows: int, width: int, routed: bool = False) -> bool:
        """Whether a pass of ``rows`` rows ``width`` tokens wide (through the variable-length kernel where
        ``routed``: see :func:`slots_memory_bytes`) trains with checkpointing."""
        if routed:  # one row per run is as wide as its examples: a key per rounded width, not per pass
            width = -(-width // ROUTED_WIDTH_STEP) * ROUTED_WIDTH_STEP
        key = (rows, width, routed)
        if key not in self._decided:
            try:
                need = slots_memory_bytes(self.cfg, self.model_config, self.slots, self.r_max, False,
                                          self.linear_names, self.base_cache, rows=rows, width=width,
                                          routed=routed)
            except ConfigError:  # a model the memory model does not know keeps checkpointing
                need = self.memory_bytes + 1
            self._decided[key] = need > self.memory_bytes
        return self._decided[key]
