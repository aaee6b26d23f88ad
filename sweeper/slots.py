"""How many trials one worker trains in each pass over its base (``workers.slots``), and why that many."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from objectives.config import RECIPE_SECTIONS, RecipeConfig
from objectives.decisions import PassCheckpointing, slots_base_cache, slots_that_fit
from objectives.shape import TrialSettings
from objectives.timing import Device, host_bound
from sweeper.config import SweepConfig
from sweeper.space import Param

MAX_AUTO_SLOTS = 32
"""``auto`` never goes above this: past it a pass is compute-bound on the models this tool targets, and the
sampler would propose many trials from the same evidence."""
MAX_AUTO_ENGINES = 3
"""``workers.engines=auto`` runs up to this many engines where one engine's passes are bound by the host and each
engine's part of the memory holds as many slots and as much of the base's cache as one engine would get (the most
that do). On an H200 with SmolLM2-135M in 32 slots, one engine kept the GPU 35-49% busy; in the user's command, three
workers of 32 slots kept it 95-98% busy after their start-up (BENCHMARKS.md, benchmark 5). Four were about as busy
(99.7% by nvidia-smi) after a longer start-up: with three the GPU is hardly ever idle. Each engine holds a copy of
the base and a CUDA context of its own."""
ENGINE_HOST_BOUND = 0.5
"""A pass of a worker's slots whose predicted host time is over this share of its predicted device time is
host-bound. The time model takes every row ``data.max_length`` wide, which overstates a pass's device time: on the
default config at 32 slots on an H200 it puts SmolLM2-135M at 1.6 (one engine 35-49% busy) and Llama-3.2-1B under
0.2 (87-92% busy)."""
SHARED_PREFIXES = ("model.", "data.", "train.packing", "train.device")
"""Settings every trial of a pass shares: a space that samples one runs one trial at a time."""


@dataclass(frozen=True)
class SlotPlan:
    """A worker's slots: how many, how wide, with or without checkpointing, and why."""

    slots: int
    r_max: int
    """The widest rank the space can sample: every slot is this wide (narrower ranks are zero-padded)."""
    checkpointing: bool
    reason: str
    base_cache: bool = False
    """Whether the worker keeps the base's dequantized copy (``model.base_cache``) while its slots train; one trial
    at a time decides it per trial instead."""
    own_process: bool = False
    """Whether the engine trains in a process of its own (``workers.engine_process``)."""
    per_pass: PassCheckpointing | None = None
    """With ``model.gradient_checkpointing: auto`` where the worst case needs checkpointing: the rule that turns
    it off for each pass whose real rows fit without it."""
    engines: int = 1
    """Engines on the worker's device (``workers.engines``), each with ``slots`` trials per pass."""


def engine_in_own_process(cfg: SweepConfig, device_kind: str) -> bool:
    """``workers.engine_process`` decided: ``auto`` is on for CUDA, where the engine only launches kernels and the
    trials' bookkeeping in its process held it back (on the CPU, torch's own threads do the work), and for more
    than one engine, which need a process each."""
    setting, engines = cfg.workers.engine_process, cfg.workers.engines
    return (device_kind == "cuda" or engines != "auto" and engines > 1) if setting == "auto" else bool(setting)


def pass_settings_sampled(params: Sequence[Param]) -> list[str]:
    """The sampled settings that every trial of a pass would share (then trials run one at a time)."""
    return [p.path for p in params if p.path.startswith(SHARED_PREFIXES)]


def widest_rank(cfg: SweepConfig, params: Sequence[Param]) -> int:
    """The largest ``lora.r`` a trial can get: the fixed value, or the top of its sampled range or choices."""
    for p in params:
        if p.path == "lora.r":
            dist = p.distribution
            high = getattr(dist, "high", None)
            return int(high if high is not None else max(int(c) for c in dist.choices))  # type: ignore[attr-defined]
    return int(cfg.lora.r)


def with_engines(cfg: SweepConfig, engines: int) -> SweepConfig:
    """``cfg`` with ``workers.engines`` set to a number."""
    return dataclasses.replace(cfg, workers=dataclasses.replace(cfg.workers, engines=engines))


def recipe_of(cfg: SweepConfig) -> RecipeConfig:
    """The recipe's sections of ``cfg`` (no storage URLs)."""
    return RecipeConfig(**{name: getattr(cfg, name) for name in RECIPE_SECTIONS})


def pass_host_bound(cfg: SweepConfig, model_config: Any, plan: SlotPlan, device: Device | str) -> bool:
    """Whether the time model finds a pass of ``plan``'s slots, each a micro-batch at the widest rank on every
    linear layer, bound by the host's kernel launches on ``device`` (:data:`ENGINE_HOST_BOUND`)."""
    one_pass = dataclasses.replace(TrialSettings.from_config(recipe_of(cfg)), r=plan.r_max, targets="all-linear",
                                   micro_batch_size=plan.slots * cfg.train.micro_batch_size,
                                   gradient_checkpointing=plan.checkpointing)
    return host_bound(model_config, one_pass, device, ENGINE_HOST_BOUND)


def plan_slots(cfg: SweepConfig, params: Sequence[Param], device_kind: str, model_config: Any,
               memory_bytes: int, linear_names: Sequence[str] | None = None,
               device: Device | str = "cuda") -> SlotPlan:
    """Decide ``workers.slots`` and ``workers.engines`` for a worker on ``device_kind`` (cuda or cpu) with
    ``memory_bytes`` of it; ``device`` (its name and rates) decides ``workers.engines=auto``."""
    if cfg.workers.engines != "auto":
        return _plan_engine_slots(cfg, params, device_kind, model_config, memory_bytes, linear_names)
    one = _plan_engine_slots(with_engines(cfg, 1), params, device_kind, model_config, memory_bytes, linear_names)
    if (device_kind != "cuda" or one.slots == 1 or cfg.workers.shares_device or cfg.workers.engine_process is False
            or not pass_host_bound(cfg, model_config, one, device)):
        return one
    # More engines only where each engine's part of the memory holds as many slots and as much of the base's cache.
    # A part may checkpoint more of its passes (``model.gradient_checkpointing: auto`` does it by pass, for those too
    # wide for the part): device time that host-bound passes hide (three engines of 32 slots on an H200 did).
    for engines in range(MAX_AUTO_ENGINES, 1, -1):
        fitting, _ = slots_that_fit(cfg, model_config, memory_bytes // engines, one.r_max, one.slots, linear_names)
        if fitting < one.slots:
            why = f"each half of the memory holds fewer than {one.slots} slots"
            continue
        more = _plan_engine_slots(with_engines(cfg, engines), params, device_kind, model_config, memory_bytes,
                                  linear_names)
        if more.base_cache < one.base_cache:
            why = "each half of the memory would hold less of the base's cache"
            continue
        under = (f"; a launch runs them as {more.engines} worker processes on its GPU, each doing its trials' "
                 "bookkeeping in an interpreter of its own" if launches_as_workers(cfg) else "")
        return dataclasses.replace(more, reason=f"{more.reason} (workers.engines=auto: the time model finds a pass of "
                                                f"{more.slots} slots bound by the host's kernel launches{under})")
    return dataclasses.replace(one, reason=f"{one.reason}; workers.engines=auto: one engine, though its passes are "
                                           f"bound by the host: {why}")


def launches_as_workers(cfg: SweepConfig) -> bool:
    """Whether a launch runs the engines ``workers.engines=auto`` takes as worker processes (:func:`as_workers`):
    it would train in its own process (``workers.count=0``) on the first visible GPU (a worker sees its GPU
    alone), and the study's store is its to choose with no study in ``optuna.db`` yet (workers share a journal
    file; a study begun in SQLite stays with one process)."""
    return (cfg.workers.count == 0 and cfg.workers.engines == "auto" and cfg.train.device in ("auto", "cuda")
            and not cfg.study.storage and not (cfg.output_path / "optuna.db").is_file())


def as_workers(cfg: SweepConfig, plan: SlotPlan) -> SweepConfig | None:
    """Where :func:`launches_as_workers` and ``workers.engines=auto`` took several engines: the same engines as
    that many worker processes sharing the GPU, one engine each; None otherwise.

    Engines under one launch share its interpreter for every trial's Optuna and MLflow work, which then bounds
    them: on an H200 two workers of 32 slots ran 1.14-1.21x the trials per hour of two engines of 32 under one
    launch, in two runs (BENCHMARKS.md, benchmark 5)."""
    if not launches_as_workers(cfg) or plan.engines < 2:
        return None
    return dataclasses.replace(cfg, workers=dataclasses.replace(cfg.workers, count=plan.engines,
                                                                per_gpu=plan.engines, engines=1))


def _plan_engine_slots(cfg: SweepConfig, params: Sequence[Param], device_kind: str, model_config: Any,
                       memory_bytes: int, linear_names: Sequence[str] | None = None) -> SlotPlan:
    """Decide ``workers.slots`` for each of ``workers.engines`` (a number, not auto) engines."""
    r_max = widest_rank(cfg, params)
    checkpointing = cfg.model.gradient_checkpointing
    shared = pass_settings_sampled(params)
    unused = f"; workers.engines={cfg.workers.engines} unused" if cfg.workers.engines > 1 else ""
    if shared:
        return SlotPlan(1, r_max, checkpointing is not False,
                        f"one trial at a time: the space samples {', '.join(shared)}, which every trial of a pass "
                        f"shares{unused}")
    requested = cfg.workers.slots
    if requested == "auto" and device_kind != "cuda":
        return SlotPlan(1, r_max, checkpointing is not False,
                        f"auto on the CPU: one trial at a time (a CPU is busy with one trial's step already){unused}")
    cap = MAX_AUTO_SLOTS if requested == "auto" else int(requested)
    own_process = engine_in_own_process(cfg, device_kind)
    engines = cfg.workers.engines
    memory_bytes //= engines
    fitting, needs_checkpointing = slots_that_fit(cfg, model_config, memory_bytes, r_max, cap, linear_names)
    if requested == "auto" and fitting == 1 and engines > 1:  # no slots to spread: one engine, all the memory
        alone = _plan_engine_slots(with_engines(cfg, 1), params, device_kind, model_config,
                                   memory_bytes * engines, linear_names)
        return dataclasses.replace(alone, reason=f"{alone.reason}; workers.engines={engines} unused: one trial per "
                                                 "pass fits each engine's part of the memory")
    if requested == "auto":
        slots, reason = fitting, f"auto: the most trials per pass predicted to fit (at most {MAX_AUTO_SLOTS})"
        checkpointing = needs_checkpointing
    else:
        slots, reason = cap, f"workers.slots={cap}"
        if checkpointing == "auto":
            checkpointing = needs_checkpointing if fitting >= cap else True
    cache = slots_base_cache(cfg, model_config, memory_bytes, slots, r_max, bool(checkpointing), linear_names)
    per_pass = None
    if checkpointing and cfg.model.gradient_checkpointing == "auto":
        per_pass = PassCheckpointing(recipe_of(cfg), model_config, memory_bytes, slots, r_max, cache,
                                     None if linear_names is None else tuple(linear_names))
    if engines > 1:
        reason += f"; {engines} engines, each in its own process with a copy of the base and 1/{engines} of the memory"
    return SlotPlan(slots, r_max, bool(checkpointing), reason, cache, own_process, per_pass, engines)
