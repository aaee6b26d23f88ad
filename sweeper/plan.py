"""Dry run of a sweep: the resolved space, and memory and time per trial at the corners of the space.

Nothing is trained and no weights are loaded: the model's config is read with ``AutoConfig`` (with
``model.config_overrides`` applied) and every number comes from the recipe's memory and time models
(:mod:`objectives.memory`, :mod:`objectives.timing`) and its per-trial decisions (:mod:`objectives.decisions`).

Corners are all combinations of the extreme values (every choice of a categorical, both ends of a range)
of the searched parameters that change memory or time. Values that change neither are folded
together, and when there are more than :data:`MAX_CORNERS` combinations the least important parameters
are pinned to their most expensive value.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from objectives.config import FOUR_BIT, ConfigError
from objectives.decisions import device_memory_bytes as total_device_memory
from objectives.decisions import resolve_trial, slots_memory_bytes
from objectives.loss import fused_loss_unavailable
from objectives.memory import MemoryEstimate, estimate_worst
from objectives.shape import ModelShape, TrialSettings, gib
from objectives.sources import load_model_config
from objectives.timing import CPU_FLOPS_PER_CORE, UTILIZATION, Device, detect_device, trial_seconds
from sweeper.config import SweepConfig, to_container, to_schema
from sweeper.slots import SlotPlan, plan_slots

if TYPE_CHECKING:
    from sweeper.space import Param

MAX_CORNERS = 64
# Searched paths that change memory, most important first (the last ones are pinned first).
MEMORY_PATHS = ("lora.targets", "lora.r", "train.micro_batch_size", "data.max_length", "optimizer.name",
                "lora.dropout", "optimizer.momentum")
TIME_PATHS = ("train.max_steps", "train.grad_accum", "train.eval_every")

# --- corners --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Corner:
    """One combination of corner values, with its predicted memory and time."""

    values: tuple[tuple[str, Any], ...]
    """(parameter name, value) pairs."""
    estimate: MemoryEstimate
    seconds: float
    checkpointing: bool
    base_cache: bool = False


def _trial_config(base: Mapping[str, Any], params: Sequence[Param], values: Mapping[str, Any], model_config: Any,
                  memory_bytes: int | None, device_kind: str = "cuda") -> SweepConfig:
    """A corner's config; with ``memory_bytes``, every ``auto`` (checkpointing, base cache, fused loss) decided as
    a trial on ``device_kind`` would decide it."""
    from sweeper.values import apply_values

    by_name = {p.name: p for p in params}
    cfg = to_schema(apply_values(base, {by_name[n].path: v for n, v in values.items()}))
    return cfg if memory_bytes is None else resolve_trial(cfg, model_config, memory_bytes, device_kind)


def _cost(model_config: Any, cfg: SweepConfig, device: Device) -> tuple[int, float]:
    est = estimate_worst(model_config, TrialSettings.from_config(cfg))
    return est.total, trial_seconds(model_config, cfg, device)


def corner_choices(cfg: SweepConfig, params: Sequence[Param], model_config: Any, device: Device,
                   max_corners: int = MAX_CORNERS, memory_bytes: int | None = None) -> dict[str, list[Any]]:
    """Parameter name -> the corner values worth showing, most important parameter first.

    A value is dropped when it costs the same memory and time as an earlier one; a parameter left with
    one value is not a corner parameter. Over ``max_corners`` combinations, the least important
    parameters are pinned to their most expensive value.
    """
    from sweeper.values import corner_values

    base = to_container(cfg)
    order = MEMORY_PATHS + TIME_PATHS
    relevant = sorted((p for p in params if p.path in order), key=lambda p: order.index(p.path))
    choices: dict[str, list[Any]] = {}
    costs: dict[str, dict[Any, tuple[int, float]]] = {}
    for p in relevant:
        by_cost: dict[tuple[int, float], Any] = {}
        for value in corner_values(p):
            trial = _trial_config(base, params, {p.name: value}, model_config, memory_bytes, device.kind)
            total, seconds = _cost(model_config, trial, device)
            by_cost.setdefault((total, round(seconds, 3)), value)
        if len(by_cost) > 1:
            choices[p.name] = list(by_cost.values())
            costs[p.name] = {value: cost for cost, value in by_cost.items()}
    while math.prod(len(v) for v in choices.values()) > max_corners:
        name = next(n for n in reversed(list(choices)) if len(choices[n]) > 1)
        choices[name] = [max(choices[name], key=costs[name].__getitem__)]
    return choices


def combinations(params: Sequence[Param], choices: Mapping[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the choices; a conditional parameter varies only where its condition holds."""
    by_name = {p.name: p for p in params}
    combos: list[dict[str, Any]] = [{}]
    for name, values in choices.items():
        cond = by_name[name].when
        out = []
        for combo in combos:
            active = all(c not in choices or combo.get(c) in allowed for c, allowed in cond)
            out += [{**combo, name: v} for v in values] if active else [combo]
        combos = out
    return combos


def corners(cfg: SweepConfig, params: Sequence[Param], model_config: Any, device: Device,
            max_corners: int = MAX_CORNERS, memory_bytes: int | None = None) -> tuple[list[str], list[Corner]]:
    """The corner parameters' names and every corner, with memory and time; with ``memory_bytes``, each
    corner decides checkpointing ``auto`` as a trial with that much memory would."""
    choices = corner_choices(cfg, params, model_config, device, max_corners, memory_bytes)
    base = to_container(cfg)
    out = []
    for combo in combinations(params, choices):
        try:
            trial = _trial_config(base, params, combo, model_config, memory_bytes, device.kind)
        except ConfigError:
            continue  # e.g. nesterov with momentum 0: Optuna would never run it either
        est = estimate_worst(model_config, TrialSettings.from_config(trial))
        out.append(Corner(tuple(combo.items()), est, trial_seconds(model_config, trial, device),
                          trial.model.gradient_checkpointing is not False, trial.model.base_cache is True))
    return list(choices), out


# --- the report -----------------------------------------------------------------------------------

def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _device_memory(given: int | None) -> tuple[int | None, str]:
    if given is not None:
        return given, f"given: {gib(given)}"
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return props.total_memory, f"{props.name}: {gib(props.total_memory)}"
    return None, "no accelerator: memory shown for reference"


def _describe_model(cfg: SweepConfig, config: Any) -> str:
    shape = ModelShape.from_config(config)
    return (f"{cfg.model.source}{' (random weights)' if cfg.model.random_init else ''}: "
            f"{type(config).__name__}, {shape.num_layers} layers, hidden {shape.hidden_size}, "
            f"intermediate {shape.intermediate_size}, {shape.num_heads} heads ({shape.num_kv_heads} kv) x "
            f"{shape.head_dim}, vocab {shape.vocab_size}{', tied' if shape.tie_word_embeddings else ''}; "
            f"{shape.n_params / 1e6:.1f}M parameters")


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return ["  " + fmt.format(*headers).rstrip()] + ["  " + fmt.format(*r).rstrip() for r in rows]


def plan(cfg: SweepConfig, params: list[Param], device_memory_bytes: int | None,
         model_config: Any = None, device: Device | None = None) -> str:
    """The dry run as text: space, model, device, and memory and time at the corners.

    Args:
        cfg: the composed sweep config.
        params: its search space.
        device_memory_bytes: memory to check the corners against; None: the CUDA device's, if any.
        model_config: the model's config (default: read with :func:`load_model_config`).
        device: where the time estimate applies (default: :func:`detect_device`).
    """
    from sweeper.values import volume

    model_config = model_config if model_config is not None else load_model_config(cfg.model)
    device = device or detect_device(cfg)
    memory, memory_text = _device_memory(device_memory_bytes)
    if memory is not None and (share := cfg.workers.memory_share(memory)) < memory:
        memory = share
        memory_text += f"; {gib(memory)} per trial (workers.per_gpu={cfg.workers.per_gpu} share a GPU)"
    size = volume(params)
    m = cfg.model
    auto = m.gradient_checkpointing == "auto"
    checkpointing = ("auto (per trial: on only where the trial would not fit without it)" if auto
                     else "on" if m.gradient_checkpointing else "off")
    four_bit = m.quant_type in FOUR_BIT
    cache_auto = m.base_cache == "auto" and four_bit
    base_cache = ("auto (per trial: a compute-dtype copy of the 4-bit weights where the trial still fits with it)"
                  if cache_auto else "on" if m.base_cache is True else "off")
    unfused = fused_loss_unavailable(device.kind, model_config)
    if cfg.train.fused_loss is False:
        fused = "full logits (train.fused_loss=off)"
    elif unfused:
        fused = f"full logits (fused loss: {unfused})"
    elif cfg.train.fused_loss is True:
        fused = "fused with the head (liger-kernel)"
    else:
        fused = "auto (per trial: fused with the head only where the trial would not fit with full logits)"
    graphs = {True: "on", False: "off"}.get(cfg.train.cuda_graphs, "auto (per trial: on where the step can be replayed "
                                                                      "and the trial fits with its memory held)")
    if device.kind != "cuda":
        graphs = "off (CUDA only)"
    bf16_attention = TrialSettings.from_config(cfg, device=device.kind).attention_bytes == 2
    layers = ("peft's and transformers' own layers" if not m.lean_layers
              else "lean layers (LoRA as one autograd step, fused RMSNorm)" if four_bit else "fused RMSNorm")
    lines = [f"plan for study {cfg.study.name!r} ({cfg.study.n_trials} trials); nothing is trained",
             f"model: {_describe_model(cfg, model_config)}",
             f"base: {m.quant_type}{' (double quant)' if m.double_quant and four_bit else ''}, "
             f"compute {m.compute_dtype}, gradient checkpointing {checkpointing}; "
             f"sequence length up to data.max_length={cfg.data.max_length}",
             f"step: {'fp32' if four_bit and m.upcast_unquantized else m.compute_dtype} activations"
             f"{', fp32 products on TF32' if m.tf32 and device.kind == 'cuda' else ''}"
             f"{', attention in bf16' if bf16_attention else ''}; "
             f"base cache {base_cache}; loss from {fused}; {layers}; CUDA graphs {graphs}",
             f"search space: {len(params)} parameters, "
             f"{'continuous' if math.isinf(size) else f'{int(size)} configurations'}"]
    for p in params:
        cond = f"   when {p.describe_condition()}" if p.when else ""
        lines.append(f"  {p.name:<24} {p.path:<24} {p.describe()}{cond}")
    lines.append(f"device memory: {memory_text}")
    budget = memory if memory is not None else cfg.workers.memory_share(total_device_memory())
    slots = plan_slots(cfg, params, device.kind, model_config, budget, device=device)
    lines.append(f"trials per pass (workers.slots={cfg.workers.slots}): {slots.slots} ({slots.reason})"
                 + (f"; each slot rank {slots.r_max} on every linear layer, checkpointing "
                    f"{_slot_checkpointing(slots)}, base cache {'on' if slots.base_cache else 'off'}, "
                    f"loss from {'the fused head' if cfg.train.fused_loss is True else 'full logits'}, "
                    f"engine in {'a process of its own' if slots.own_process else 'the worker process'}, "
                    "predicted peak "
                    + gib(slots_memory_bytes(cfg, model_config, slots.slots, slots.r_max, slots.checkpointing,
                                             base_cache=slots.base_cache))
                    + (" per engine" if slots.engines > 1 else "")
                    + (f" (a pass without checkpointing: within {gib(budget // slots.engines)})"
                       if slots.per_pass else "")
                    if slots.slots > 1 else ""))
    if cfg.launcher.name == "slurm":
        from sweeper.slurm import request_lines

        lines += request_lines(cfg, memory, slots.slots, slots.engines)
    names, rows = corners(cfg, params, model_config, device, memory_bytes=budget)
    if not rows:
        lines.append("no corner makes a valid config")
        return "\n".join(lines)
    lines.append(f"corners: {len(rows)} (of {', '.join(names) or 'no searched parameter that changes memory or time'})"
                 f"; peak = predicted device memory per trial (allocated + CUDA context)")
    table_rows = []
    for i, c in enumerate(rows, 1):
        values = dict(c.values)
        fit = "-" if memory is None else ("yes" if c.estimate.total <= memory else "NO")
        table_rows.append([str(i), *(str(values.get(n, "")) for n in names), f"{c.estimate.adapter_params:,}",
                           *(["on" if c.checkpointing else "off"] if auto else []),
                           *(["on" if c.base_cache else "off"] if cache_auto else []),
                           gib(c.estimate.total), _duration(c.seconds), fit])
    lines += _table(["#", *names, "adapter", *(["ckpt"] if auto else []), *(["cache"] if cache_auto else []),
                     "peak", "time/trial", "fits"], table_rows)
    worst = max(range(len(rows)), key=lambda i: rows[i].estimate.total)
    lines.append(f"largest corner (#{worst + 1}), by component:")
    lines.append(rows[worst].estimate.format())
    median = sorted(c.seconds for c in rows)[len(rows) // 2]
    at_once = slots.slots * slots.engines
    full = median * cfg.study.n_trials / at_once
    together = f", {at_once} at a time" if at_once > 1 else ""
    lines.append(f"sweep: {cfg.study.n_trials} trials of about {_duration(median)} (the median corner){together}: "
                 f"at most about {_duration(full)} if every trial runs to its last step; pruned trials stop at an "
                 "evaluation")
    rate = (f"{UTILIZATION:.0%} of the peak rate, or the host's launch time per layer if longer"
            if device.kind == "cuda" else f"{CPU_FLOPS_PER_CORE / 1e9:.0f} GFLOP/s per thread")
    lines.append(f"time: {device.name}; rough: FLOPs of the base (bf16) and of head, attention and adapter "
                 f"(fp32 with a quantized base) at {rate}; sequences at data.max_length")
    if memory is not None:
        bad = [str(i) for i, c in enumerate(rows, 1) if c.estimate.total > memory]
        lines.append(f"{len(bad)} of {len(rows)} corners do not fit in {gib(memory)}"
                     + (f": #{', #'.join(bad)}" if bad else ""))
    return "\n".join(lines)



def _slot_checkpointing(plan: SlotPlan) -> str:
    if not plan.checkpointing:
        return "off"
    return "per pass (off for a pass whose rows fit without it)" if plan.per_pass else "on"
