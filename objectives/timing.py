"""How long one trial takes, roughly, from the model's shape and the trial's settings (nothing runs).

Assumptions (rough, upper bound on the sequence length)
    A training micro-step costs, per token: ``2N`` FLOPs forward through the base's linear layers
    (``N`` their weights), ``2N`` for the gradient of their input (the frozen base needs no weight
    gradient) and ``2N`` more when gradient checkpointing recomputes the forward; the output head,
    attention (``2 * s * heads * head_dim`` per layer forward, 2.5x that backward) and the adapter
    (6 FLOPs per adapter weight) come on top. The base's products run in bf16; with a quantized base the
    head, attention and adapter run in fp32 (the kbit upcast leaves an fp32 residual stream; with
    ``model.bf16_attention`` on CUDA, attention runs in bf16). FLOPs are
    divided by the device's peak rate for each dtype times :data:`UTILIZATION`. On a GPU the host's
    work (Python and kernel launches: :data:`LAYER_OVERHEAD_S` per decoder layer and pass, plus
    :data:`ADAPTER_OVERHEAD_S` per wrapped module) runs ahead of the device, so a step takes the larger of
    the two: small models are host-bound (SmolLM2-135M takes ~0.3 s per step on an H200 whatever the
    batch). These constants were fitted on an H200 (bench/memory_accuracy.py reports both). On the CPU
    the rate is :data:`CPU_FLOPS_PER_CORE` per thread, an effective rate (no utilization factor) fitted to
    the default sweep on 2 cores: its complete trials took 52-81 s (qk at rank 5 to all-linear at rank 32,
    24 steps and 4 evaluations each), which this model puts within 17% of each. Evaluation
    adds forward passes over ``data.max_eval_examples`` rows at every evaluation. Every micro-batch is
    taken as ``data.max_length`` tokens wide: padded batches with shorter rows run faster, and with
    ``train.packing`` short examples need fewer passes than ``grad_accum`` per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from objectives.shape import ModelShape, TrialSettings, adapter_modules, adapter_param_count

if TYPE_CHECKING:
    from objectives.config import RecipeConfig

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
HOST_BOUND = 1.5
"""A step whose predicted host time is over this many times its device time is host-bound. Fitted on an H200 with
CUDA graphs (``train.cuda_graphs``), median step with and without them (predicted host/device ratio): a default
SmolLM2-135M trial 0.19 to 0.02 s (ratio 50-300), a Llama-3.2-1B pass at bf16 activations 0.13 to 0.09 s (3.2);
no gain for the 1B pass at fp32 (0.13 s both, ratio 0.8) or Llama-3-8B's (0.33 to 0.39 s at fp32, ratio 0.5;
0.28 s both at bf16, ratio 1.1), where the captures come on top."""
REPLAY_OVERHEAD_S = 15e-3
"""Host time of a step replayed from a CUDA graph: the copies into the graph's inputs, the replay, clipping and the
optimizer step (a default SmolLM2-135M trial's step took 0.018-0.020 s on an H200, its kernels a few ms)."""
CPU_FLOPS_PER_CORE = 147e9
"""Effective FLOP/s per CPU thread for this loop, fitted to the default sweep's complete trials on 2 cores."""


@dataclass(frozen=True)
class Device:
    """Where the time estimate applies."""

    kind: str
    """cuda or cpu."""
    name: str
    bf16_flops: float
    fp32_flops: float


def detect_device(cfg: RecipeConfig | None = None) -> Device:
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
    if s.fp32_unquantized and s.attention_bytes == 2:
        return base + attention, head + adapter
    if s.fp32_unquantized:
        return base, head + attention + adapter
    return base + head + attention, adapter


def step_seconds(config: Any, s: TrialSettings, device: Device | str = "cuda", train: bool = True) -> float:
    """Rough seconds of one micro-step (see the module docstring for the assumptions)."""
    dev = _device(device)
    if dev.kind != "cuda":
        return sum(step_flops(config, s, train)) / dev.bf16_flops
    compute, launches = _device_and_host_seconds(config, s, dev, train)
    if train and s.cuda_graphs:
        return max(compute, REPLAY_OVERHEAD_S)
    # The host issues kernels while the GPU runs earlier ones: the slower of the two sets the pace.
    return max(compute, launches)


def host_bound(config: Any, s: TrialSettings, device: Device | str = "cuda", factor: float = HOST_BOUND) -> bool:
    """Whether the host's dispatch sets the pace of a training micro-step on a GPU: its predicted time is over
    ``factor`` times the device's. The default, :data:`HOST_BOUND`, asks whether replaying the step as a CUDA graph
    pays."""
    dev = _device(device)
    if dev.kind != "cuda":
        return False
    compute, launches = _device_and_host_seconds(config, s, dev, True)
    return launches > factor * compute


def _device_and_host_seconds(config: Any, s: TrialSettings, dev: Device, train: bool) -> tuple[float, float]:
    bf16, fp32 = step_flops(config, s, train)
    compute = bf16 / (dev.bf16_flops * UTILIZATION) + fp32 / (dev.fp32_flops * UTILIZATION)
    shape = ModelShape.from_config(config)
    wrapped = len(adapter_modules(shape, s.targets)) / shape.num_layers
    passes = (2 + (1 if s.gradient_checkpointing else 0)) if train else 1
    return compute, shape.num_layers * passes * (LAYER_OVERHEAD_S + ADAPTER_OVERHEAD_S * wrapped)


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


def trial_seconds(config: Any, cfg: RecipeConfig, device: Device | str = "cuda") -> float:
    """Rough seconds of one trial: its optimizer steps and its evaluations."""
    s = TrialSettings.from_config(cfg)
    train = cfg.train.max_steps * cfg.train.grad_accum * step_seconds(config, s, device)
    eval_batches = math.ceil(cfg.data.max_eval_examples / cfg.train.micro_batch_size)
    evals = evaluations(cfg.train.max_steps, cfg.train.eval_every) * eval_batches
    return train + evals * step_seconds(config, s, device, train=False)


