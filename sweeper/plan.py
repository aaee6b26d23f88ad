"""Dry run of a sweep: the resolved space, and memory and time per trial at the corners of the space.

Nothing is trained and no weights are loaded: the model's config is read with ``AutoConfig`` (with
``model.config_overrides`` applied) and every number comes from :mod:`sweeper.memory` and the time model
below.

Corners are all combinations of the extreme values (every choice of a categorical, both ends of a range)
of the searched parameters that change memory or time. Values that change neither are folded
together, and when there are more than :data:`MAX_CORNERS` combinations the least important parameters
are pinned to their most expensive value.

Time model (rough, upper bound on the sequence length)
    A training micro-step costs, per token: ``2N`` FLOPs forward through the base's linear layers
    (``N`` their weights), ``2N`` for the gradient of their input (the frozen base needs no weight
    gradient) and ``2N`` more when gradient checkpointing recomputes the forward; the output head,
    attention (``2 * s * heads * head_dim`` per layer forward, 2.5x that backward) and the adapter
    (6 FLOPs per adapter weight) come on top. The base's products run in bf16; with a quantized base the
    head, attention and adapter run in fp32 (the kbit upcast leaves an fp32 residual stream). FLOPs are
    divided by the device's peak rate for each dtype times :data:`UTILIZATION`. On a GPU the host's
    work (Python and kernel launches: :data:`LAYER_OVERHEAD_S` per decoder layer and pass, plus
    :data:`ADAPTER_OVERHEAD_S` per wrapped module) runs ahead of the device, so a step takes the larger of
    the two: small models are host-bound (SmolLM2-135M takes ~0.3 s per step on an H200 whatever the
    batch). These constants were fitted on an H200 (bench/memory_accuracy.py reports both). On the CPU
    the rate is :data:`CPU_FLOPS_PER_CORE` per thread, from SmolLM2-135M taking about 2 s for a
    4 x 128-token step on 2 cores (the CPU's rate is an effective one: no utilization factor). Evaluation
    adds forward passes over ``data.max_eval_examples`` rows at every evaluation. Every micro-batch is
    taken as ``data.max_length`` tokens wide: padded batches with shorter rows run faster, and with
    ``train.packing`` short examples need fewer passes than ``grad_accum`` per step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sweeper.config import ConfigError, SweepConfig, to_container, to_schema
from sweeper.memory import (
    MemoryEstimate,
    ModelShape,
    TrialSettings,
    adapter_modules,
    adapter_param_count,
    estimate_worst,
    gib,
)

if TYPE_CHECKING:
    from sweeper.space import Param

MAX_CORNERS = 64
# Searched paths that change memory, most important first (the last ones are pinned first).
MEMORY_PATHS = ("lora.targets", "lora.r", "train.micro_batch_size", "data.max_length", "optimizer.name",
                "lora.dropout", "optimizer.momentum")
TIME_PATHS = ("train.max_steps", "train.grad_accum", "train.eval_every")

# Dense peak FLOP/s (bf16 tensor cores, plain fp32) by a substring of the device name.
PEAK_FLOPS: dict[str, tuple[float, float]] = {
    "H200": (989e12, 67e12), "H100": (989e12, 67e12), "A100": (312e12, 19.5e12), "L40": (181e12, 90e12),
    "L4": (121e12, 30e12), "A10": (125e12, 31e12), "4090": (165e12, 83e12), "V100": (125e12, 15.7e12),
    "T4": (65e12, 8.1e12),
}
DEFAULT_PEAK_FLOPS = (100e12, 20e12)
UTILIZATION = 0.35
"""Share of the peak rate sustained by the products of a training step (dequantization, small matrices)."""
LAYER_OVERHEAD_S = 3e-3
"""Host time per decoder layer per pass (forward, backward, recompute) on a GPU: Python and kernel launches."""
ADAPTER_OVERHEAD_S = 0.6e-3
"""Host time per wrapped module per layer per pass (peft's LoRA forward adds a handful of kernels)."""
CPU_FLOPS_PER_CORE = 100e9
"""Sustained FLOP/s per CPU thread for this loop (measured: SmolLM2-135M, 4 x 128 tokens, ~2 s on 2 cores)."""


@dataclass(frozen=True)
class Device:
    """Where the time estimate applies."""

    kind: str
    """cuda or cpu."""
    name: str
    bf16_flops: float
    fp32_flops: float


def detect_device(cfg: SweepConfig | None = None) -> Device:
    """The device a trial of this config would train on (``train.device``), with its assumed rates."""
    import torch

    wanted = cfg.train.device if cfg is not None else "auto"
    if wanted != "cpu" and torch.cuda.is_available():
        index = torch.device(wanted).index if wanted.startswith("cuda") else None
        name = torch.cuda.get_device_name(index or 0)
        bf16, fp32 = next((v for k, v in PEAK_FLOPS.items() if k in name), DEFAULT_PEAK_FLOPS)
        return Device("cuda", name, bf16, fp32)
    rate = CPU_FLOPS_PER_CORE * torch.get_num_threads()
    return Device("cpu", f"CPU ({torch.get_num_threads()} threads)", rate, rate)


def cpu_device(threads: int = 2) -> Device:
    """A CPU with ``threads`` threads at the assumed rate (for planning without detecting)."""
    rate = CPU_FLOPS_PER_CORE * threads
    return Device("cpu", f"CPU ({threads} threads)", rate, rate)


def step_flops(config: Any, s: TrialSettings, train: bool = True) -> tuple[float, float]:
    """(bf16 FLOPs, fp32 FLOPs) of one micro-step: forward, and backward (+ recompute) when ``train``."""
    shape = ModelShape.from_config(config)
    t = s.tokens
    base = 2.0 * shape.linear_params * t
    head = 2.0 * shape.vocab_size * shape.hidden_size * t
    attention = 2.0 * s.seq_len * shape.num_heads * shape.head_dim * shape.num_layers * t
    adapter = 2.0 * adapter_param_count(shape, s.r, s.targets) * t
    if train:
        recompute = 1.0 if s.gradient_checkpointing else 0.0
        base *= 2 + recompute
        head *= 2
        attention *= 1 + 2.5 + recompute
        adapter *= 3 + recompute
    if s.fp32_unquantized:
        return base, head + attention + adapter
    return base + head + attention, adapter


def step_seconds(config: Any, s: TrialSettings, device: Device | str = "cuda", train: bool = True) -> float:
    """Rough seconds of one micro-step (see the module docstring for the assumptions)."""
    dev = _device(device)
    bf16, fp32 = step_flops(config, s, train)
    if dev.kind != "cuda":
        return (bf16 + fp32) / dev.bf16_flops
    compute = bf16 / (dev.bf16_flops * UTILIZATION) + fp32 / (dev.fp32_flops * UTILIZATION)
    shape = ModelShape.from_config(config)
    wrapped = len(adapter_modules(shape, s.targets)) / shape.num_layers
    passes = (2 + (1 if s.gradient_checkpointing else 0)) if train else 1
    # The host issues kernels while the GPU runs earlier ones: the slower of the two sets the pace.
    launches = shape.num_layers * passes * (LAYER_OVERHEAD_S + ADAPTER_OVERHEAD_S * wrapped)
    return max(compute, launches)


def _device(device: Device | str) -> Device:
    if isinstance(device, Device):
        return device
    if device == "cpu":
        return cpu_device()
    bf16, fp32 = PEAK_FLOPS["H100"]
    return Device("cuda", "H100-class GPU", bf16, fp32)


def evaluations(max_steps: int, eval_every: int) -> int:
    """How many times ``train_adapter`` evaluates: every ``eval_every`` steps and at the end."""
    return len({s for s in range(1, max_steps + 1) if s % eval_every == 0 or s == max_steps})


def trial_seconds(config: Any, cfg: SweepConfig, device: Device | str = "cuda") -> float:
    """Rough seconds of one trial: its optimizer steps and its evaluations."""
    s = TrialSettings.from_config(cfg)
    train = cfg.train.max_steps * cfg.train.grad_accum * step_seconds(config, s, device)
    eval_batches = math.ceil(cfg.data.max_eval_examples / cfg.train.micro_batch_size)
    evals = evaluations(cfg.train.max_steps, cfg.train.eval_every) * eval_batches
    return train + evals * step_seconds(config, s, device, train=False)


def load_model_config(cfg: SweepConfig) -> Any:
    """The model's transformers config without its weights, with ``model.config_overrides`` applied.

    Raises:
        ConfigError: an override names a field the config does not have.
    """
    from objectives.model import model_config, resolve_source

    return model_config(cfg.model, resolve_source(cfg.model))


def fits(cfg: SweepConfig, model_config: Any, device_memory_bytes: int,
         linear_names: Sequence[str] | None = None) -> tuple[bool, int]:
    """Pre-flight check for one trial: (predicted total <= device memory, predicted total in bytes).

    ``linear_names`` (``ResidentBase.linear_names``) resolves the targets against the loaded model.
    """
    total = estimate_worst(model_config, TrialSettings.from_config(cfg), linear_names).total
    return total <= device_memory_bytes, total


def with_checkpointing(cfg: SweepConfig, on: bool) -> SweepConfig:
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, gradient_checkpointing=on))


def resolve_checkpointing(cfg: SweepConfig, model_config: Any, memory_bytes: int,
                          linear_names: Sequence[str] | None = None) -> SweepConfig:
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


def trial_memory_bytes(cfg: SweepConfig, device: Any = None) -> int:
    """The memory one trial may plan for: its share of the GPU, or of the host's memory on the CPU (or
    when ``device`` is None)."""
    import psutil
    import torch

    if device is not None and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        total = psutil.virtual_memory().total
    return cfg.workers.memory_share(total)


# --- corners --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Corner:
    """One combination of corner values, with its predicted memory and time."""

    values: tuple[tuple[str, Any], ...]
    """(parameter name, value) pairs."""
    estimate: MemoryEstimate
    seconds: float
    checkpointing: bool


def _trial_config(base: Mapping[str, Any], params: Sequence[Param], values: Mapping[str, Any], model_config: Any,
                  memory_bytes: int | None) -> SweepConfig:
    """A corner's config; with ``memory_bytes``, checkpointing ``auto`` decided as a trial would decide it."""
    from sweeper.space import apply_values

    by_name = {p.name: p for p in params}
    cfg = to_schema(apply_values(base, {by_name[n].path: v for n, v in values.items()}))
    return cfg if memory_bytes is None else resolve_checkpointing(cfg, model_config, memory_bytes)


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
    from sweeper.space import corner_values

    base = to_container(cfg)
    order = MEMORY_PATHS + TIME_PATHS
    relevant = sorted((p for p in params if p.path in order), key=lambda p: order.index(p.path))
    choices: dict[str, list[Any]] = {}
    costs: dict[str, dict[Any, tuple[int, float]]] = {}
    for p in relevant:
        by_cost: dict[tuple[int, float], Any] = {}
        for value in corner_values(p):
            trial = _trial_config(base, params, {p.name: value}, model_config, memory_bytes)
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
            trial = _trial_config(base, params, combo, model_config, memory_bytes)
        except ConfigError:
            continue  # e.g. nesterov with momentum 0: Optuna would never run it either
        est = estimate_worst(model_config, TrialSettings.from_config(trial))
        out.append(Corner(tuple(combo.items()), est, trial_seconds(model_config, trial, device),
                          trial.model.gradient_checkpointing is not False))
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
    from sweeper.space import volume

    model_config = model_config if model_config is not None else load_model_config(cfg)
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
    lines = [f"plan for study {cfg.study.name!r} ({cfg.study.n_trials} trials); nothing is trained",
             f"model: {_describe_model(cfg, model_config)}",
             f"base: {m.quant_type}{' (double quant)' if m.double_quant and m.quant_type in ('nf4', 'fp4') else ''}, "
             f"compute {m.compute_dtype}, gradient checkpointing {checkpointing}; "
             f"sequence length up to data.max_length={cfg.data.max_length}",
             f"search space: {len(params)} parameters, "
             f"{'continuous' if math.isinf(size) else f'{int(size)} configurations'}"]
    for p in params:
        cond = f"   when {p.describe_condition()}" if p.when else ""
        lines.append(f"  {p.name:<24} {p.path:<24} {p.describe()}{cond}")
    lines.append(f"device memory: {memory_text}")
    budget = memory if memory is not None else trial_memory_bytes(cfg)
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
                           gib(c.estimate.total), _duration(c.seconds), fit])
    lines += _table(["#", *names, "adapter", *(["ckpt"] if auto else []), "peak", "time/trial", "fits"], table_rows)
    worst = max(range(len(rows)), key=lambda i: rows[i].estimate.total)
    lines.append(f"largest corner (#{worst + 1}), by component:")
    lines.append(rows[worst].estimate.format())
    rate = (f"{UTILIZATION:.0%} of the peak rate, or the host's launch time per layer if longer"
            if device.kind == "cuda" else f"{CPU_FLOPS_PER_CORE / 1e9:.0f} GFLOP/s per thread")
    lines.append(f"time: {device.name}; rough: FLOPs of the base (bf16) and of head, attention and adapter "
                 f"(fp32 with a quantized base) at {rate}; sequences at data.max_length")
    if memory is not None:
        bad = [str(i) for i, c in enumerate(rows, 1) if c.estimate.total > memory]
        lines.append(f"{len(bad)} of {len(rows)} corners do not fit in {gib(memory)}"
                     + (f": #{', #'.join(bad)}" if bad else ""))
    return "\n".join(lines)

