"""The sweep's typed config: the recipe's (objectives.config) plus study, tracking and workers.

The YAML files in ``conf/`` are merged onto these dataclasses, so an unknown key or a value of the
wrong type fails with the field's dotted name before anything heavy runs. Each field's default is the
default the CLI runs; ``conf/`` holds only what a choice changes.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from objectives.config import ConfigError, RecipeConfig, check_choice, check_positive, close_matches
from sweeper.redaction import redact_text
from sweeper.samplers import (
    MedianPrunerConfig,
    PrunerConfig,
    SamplerConfig,
    TpeSamplerConfig,
    pruner_schema,
    sampler_schema,
)

SchemaT = TypeVar("SchemaT")

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@dataclass
class StudyConfig:
    """The Optuna study: name, storage, budget, objectives."""

    name: str = "qlora-default"
    n_trials: int = 10
    """Total budget of finished (complete or pruned) trials; a resumed study runs only what is missing."""
    storage: str | None = None
    """Optuna storage: an RDB URL (postgresql://..., sqlite:///...) or ``journal:/path/file``; None keeps it beside
    MLflow under ``output_dir`` (SQLite, or a journal file when several workers share it)."""
    directions: list[str] = field(default_factory=lambda: ["minimize"])
    """One per objective."""
    objectives: list[str] = field(default_factory=lambda: ["eval_loss"])
    """eval_loss, trainable_params, peak_memory_mb, trial_seconds."""
    timeout_s: float | None = None
    """Stop starting new trials after this many seconds."""
    sampler: SamplerConfig = field(default_factory=TpeSamplerConfig)
    """Which sampler suggests the trials' parameters, and its options (conf/study/sampler/)."""
    pruner: PrunerConfig = field(default_factory=MedianPrunerConfig)
    """Which pruner stops unpromising trials early, and its options (conf/study/pruner/)."""

    def __post_init__(self) -> None:
        check_positive("study.n_trials", self.n_trials)
        for d in self.directions:
            check_choice("study.directions", d, ("minimize", "maximize"))
        for o in self.objectives:
            check_choice("study.objectives", o, OBJECTIVES)
        for kind in ("sampler", "pruner"):
            options = getattr(self, kind)
            for f in dataclasses.fields(options):
                value = getattr(options, f.name)
                # Counts, steps and seeds: Optuna takes none of them below zero, some only when a trial reports.
                if isinstance(value, int) and not isinstance(value, bool) and value < 0:
                    raise ConfigError(f"study.{kind}.{f.name}: must be >= 0, got {value}")
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
    slots: Any = "auto"
    """Trials trained together in every pass over this worker's base, each row through its own trial's adapter:
    a small model leaves a GPU idle at one trial's batch. ``auto``: on CUDA the most that fit the worker's
    share of the device (at most 32), on the CPU 1. 1: one trial at a time (peft's adapter)."""
    engine_process: Any = "auto"
    """With slots, whether the engine trains in a process of its own, so that its passes never wait for the
    trials' Optuna and MLflow work in this one. ``auto``: on CUDA (where the engine only launches kernels and
    the bookkeeping of 64 slots held it back); true or false."""
    engines: Any = "auto"
    """Slot engines this worker runs on its device, each in a process of its own with its own copy of the base and
    ``workers.slots`` trials per pass, each planned for its part of the worker's memory. On a small model one
    engine's host (its kernel launches) is the bound, and others launch while its kernels run. More than 1 puts
    the engines in processes of their own (``workers.engine_process``). ``auto``: on CUDA where the time model finds
    a pass of the worker's slots bound by the host, the worker's engines may have processes of their own and no
    other workers share its GPU (``workers.per_gpu``), the most engines up to 3 whose parts of the memory each hold
    as many slots and as much of the base's cache; otherwise 1. A launch that would train in its own process
    (``workers.count=0``) then runs them as worker processes on its GPU, one engine each, whose trials' Optuna and
    MLflow work no longer share one interpreter (the study in a journal file; not where ``output_dir`` holds an
    ``optuna.db``, ``study.storage`` is set or ``train.device`` names a GPU other than the first); a number keeps
    its engines under the launch."""
    index: int | None = None
    """This worker's position among the launch's workers: its sampler draws from ``study.sampler.seed + index + 1``.
    None: a worker started by hand, seeded from its process id so that two never draw the same suggestions."""
    supervised: bool = False
    """A launcher owns the study's parent MLflow run and closes it: this worker leaves it open when it is done."""

    def __post_init__(self) -> None:
        check_positive("workers.count", self.count, zero_ok=True)
        if self.index is not None:
            check_positive("workers.index", self.index, zero_ok=True)
        if self.slots != "auto" and (isinstance(self.slots, bool) or not isinstance(self.slots, int)
                                     or self.slots < 1):
            raise ConfigError(f"workers.slots: {self.slots!r} is not allowed; use auto or a whole number >= 1")
        if self.engine_process not in ("auto", True, False):
            raise ConfigError(f"workers.engine_process: {self.engine_process!r} is not allowed; use auto, true "
                              "or false")
        check_positive("workers.per_gpu", self.per_gpu)
        if self.engines != "auto" and (isinstance(self.engines, bool) or not isinstance(self.engines, int)
                                       or self.engines < 1):
            raise ConfigError(f"workers.engines: {self.engines!r} is not allowed; use auto or a whole number >= 1")
        explicit = 1 if self.engines == "auto" else self.engines
        if explicit > 1 and self.slots == 1:
            raise ConfigError(f"workers.engines: {self.engines} engines train trials in slots, but workers.slots=1 "
                              "trains one trial at a time; set workers.slots to auto or a number > 1, or "
                              "workers.engines=1")
        if explicit > 1 and self.engine_process is False:
            raise ConfigError(f"workers.engines: {self.engines} engines each train in a process of their own; "
                              "workers.engine_process=false allows none; set it to auto or true, or "
                              "workers.engines=1")
        check_positive("workers.heartbeat_s", self.heartbeat_s)
        if self.grace_s <= self.heartbeat_s:
            raise ConfigError(f"workers.grace_s: must exceed workers.heartbeat_s ({self.heartbeat_s}), "
                              f"got {self.grace_s}")

    @property
    def shares_device(self) -> bool:
        """Whether a worker may share its GPU with others (worker processes, ``per_gpu`` > 1)."""
        return self.count > 0 and self.per_gpu > 1

    def memory_share(self, device_bytes: int) -> int:
        """The device memory one trial may plan for: a worker shares its GPU with per_gpu - 1 others."""
        return device_bytes // self.per_gpu if self.shares_device else device_bytes


LAUNCHERS = ("local", "slurm")


@dataclass
class LauncherConfig:
    """Where ``launch`` runs the workers: on this machine, or as one SLURM job array (conf/launcher/)."""

    name: str = "local"
    """local: in this process, or workers.count processes on this machine; slurm: workers.count array tasks,
    submitted through submitit, each running ``python -m sweeper worker``; ``launch`` returns once they are queued."""
    partition: str | None = None
    """SLURM partition; None: the cluster's default."""
    account: str | None = None
    """SLURM account to charge; None: the user's default."""
    qos: str | None = None
    """SLURM quality of service; None: the partition's default."""
    time_min: int = 240
    """Time limit of each array task, in minutes. Longer limits wait longer in most queues; a task that reaches
    its limit is requeued (at most 3 times) and its running trial retried."""
    gpus_per_worker: int = 1
    """GPUs per array task: 1, or 0 for CPU nodes. A worker trains on one device; more trials on a GPU come from
    ``workers.slots``, more GPUs from more workers."""
    cpus_per_worker: int = 8
    """CPU cores per array task; the worker's intra-op threads. Tokenizing and the host's side of each step need
    a few; more only wait in the queue."""
    mem_gb: float = 32.0
    """Host memory per array task, in GB: the base is read whole before it is quantized onto the GPU (twice, one
    after the other, where a slot engine trains in a process of its own: ``workers.engine_process``; with several
    engines, ``workers.engines``, each engine's process reads it at the same time)."""
    array_parallelism: int | None = None
    """Array tasks running at once; None: every worker at once."""
    additional_parameters: dict[str, Any] = field(default_factory=dict)
    """More sbatch options, as Hydra's submitit launcher takes them: ``{constraint: a100, exclude: node7}``
    becomes ``--constraint=a100 --exclude=node7``."""
    folder: str | None = None
    """submitit's folder (job scripts, logs, the workers' 0600 config files); None: ``<output_dir>/slurm``.
    Every node must see it, as it must see ``output_dir``."""

    def __post_init__(self) -> None:
        check_choice("launcher.name", self.name, LAUNCHERS)
        check_positive("launcher.time_min", self.time_min)
        if self.gpus_per_worker not in (0, 1):
            raise ConfigError(f"launcher.gpus_per_worker: a worker trains on one device, so 0 or 1, got "
                              f"{self.gpus_per_worker}; more GPUs come from more workers (workers.count)")
        check_positive("launcher.cpus_per_worker", self.cpus_per_worker)
        check_positive("launcher.mem_gb", self.mem_gb)
        if self.array_parallelism is not None:
            check_positive("launcher.array_parallelism", self.array_parallelism)
        for key, value in self.additional_parameters.items():
            if isinstance(value, (dict, list)):
                raise ConfigError(f"launcher.additional_parameters.{key}: an sbatch option takes one value, "
                                  f"got {value!r}")


@dataclass
class TrackingConfig:
    """Where runs are logged."""

    uri: str | None = None
    """MLflow tracking URI (http://host:5000, postgresql://...); None is an SQLite store under ``output_dir``."""
    experiment: str | None = None
    """Experiment name; None is the study name."""
    log_adapter: str = "best"
    """Adapter weights as artifacts: none, best (only when a trial becomes the best), all."""

    def __post_init__(self) -> None:
        check_choice("tracking.log_adapter", self.log_adapter, ("none", "best", "all"))


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
class SweepConfig(RecipeConfig):
    """The recipe's config plus what a sweep adds: the study, tracking, workers and where they run."""

    study: StudyConfig = field(default_factory=StudyConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
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
        journal, sqlite = self.output_path / "optuna.journal", self.output_path / "optuna.db"
        # SQLite is for one process; a journal file serves several on one machine. A later command (export,
        # report, a resume without the worker count) finds the one the launch made.
        if self.workers.count > 1 or (journal.is_file() and not sqlite.is_file()):
            return f"journal:{journal}"
        return f"sqlite:///{sqlite}"

    @property
    def tracking_uri(self) -> str:
        return self.tracking.uri or f"sqlite:///{self.output_path / 'mlflow.db'}"

    @property
    def experiment_name(self) -> str:
        return self.tracking.experiment or self.study.name


def to_schema(cfg: DictConfig | dict[str, Any]) -> SweepConfig:
    """Validate a composed config against the schema and build the typed object.

    ``study.sampler`` and ``study.pruner`` are checked against the schema of the sampler and pruner they name,
    so an option the chosen one does not take is an error (see ``samplers.sampler_schema``).

    Raises:
        ConfigError: naming the offending field.
    """
    try:
        schema = OmegaConf.structured(SweepConfig)
        raw = OmegaConf.to_container(cfg) if isinstance(cfg, DictConfig) else cfg
        study = raw.get("study") if isinstance(raw, Mapping) else None
        if isinstance(study, Mapping):
            for kind, schema_of in (("sampler", sampler_schema), ("pruner", pruner_schema)):
                options = study.get(kind)
                if isinstance(options, Mapping):
                    # The field holds the named kind's schema, so the merge checks its options' types too.
                    schema.study[kind] = OmegaConf.structured(schema_of(options))
        merged = OmegaConf.merge(schema, cfg)
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(schema_message(e)) from None
    assert isinstance(obj, SweepConfig)
    return obj


def schema_message(e: OmegaConfBaseException) -> str:
    """OmegaConf's error in one line after the field's dotted name; an unknown key names the closest fields of
    its section and lists them all. Secrets in a quoted value are hidden."""
    key = getattr(e, "full_key", None) or ""
    object_type = getattr(e, "object_type", None)
    if isinstance(e, ConfigKeyError) and isinstance(object_type, type) and dataclasses.is_dataclass(object_type):
        parent, _, leaf = key.rpartition(".")
        names = [f.name for f in dataclasses.fields(object_type)]
        near = " or ".join(f"{parent}.{n}" if parent else n for n in close_matches(leaf, names))
        hint = f"did you mean {near}? " if near else ""
        return f"{key}: not a field of {parent or 'the config'}; {hint}it has: {', '.join(names)}"
    if isinstance(e, MissingMandatoryValue):
        return f"{key}: needs a value here, e.g. {key}=..."
    text = str(getattr(e, "msg", e)).strip()
    return redact_text(f"{key}: {text.splitlines()[0] if text else type(e).__name__}".strip(": "))


def with_values(cfg: SchemaT, values: Mapping[str, Any]) -> SchemaT | None:
    """A validated config with each ``path -> value`` set as :func:`to_schema` would set it, without OmegaConf
    (which takes tens of milliseconds per trial, holding the interpreter's lock beside a slot engine).

    None where a value is not plainly of its field's type, or a path leaves the schema's dataclasses: a schema
    merge would convert or reject it, so the caller asks :func:`to_schema`.
    """
    for path, value in values.items():
        replaced = _with_value(cfg, path.split("."), value)
        if replaced is None:
            return None
        cfg = replaced
    return cfg


def _with_value(node: Any, parts: list[str], value: Any) -> Any:
    head, *rest = parts
    if not dataclasses.is_dataclass(node) or isinstance(node, type) or head not in _field_types(type(node)):
        return None
    if rest:
        inner = _with_value(getattr(node, head), rest, value)
        return None if inner is None else dataclasses.replace(node, **{head: inner})  # type: ignore[type-var]
    typed = _as_field_type(_field_types(type(node))[head], value)
    return None if typed is _UNTYPED else dataclasses.replace(node, **{head: typed})  # type: ignore[type-var]


_UNTYPED = object()


@functools.cache
def _field_types(cls: type[Any]) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _as_field_type(kind: Any, value: Any) -> Any:
    """``value`` as a field of type ``kind`` holds it after a schema merge, or ``_UNTYPED`` where that is not plain."""
    if kind is Any:
        return value if value is None or isinstance(value, (bool, int, float, str)) else _UNTYPED
    args = typing.get_args(kind)
    if type(None) in args:  # X | None
        if value is None:
            return None
        rest = [a for a in args if a is not type(None)]
        return _as_field_type(rest[0], value) if len(rest) == 1 else _UNTYPED
    if kind is float and type(value) in (int, float):
        return float(value)
    if kind in (int, bool, str) and type(value) is kind:
        return value
    return _UNTYPED


def plain(obj: Any) -> Any:
    """A schema object as plain containers, as :func:`to_container` gives a validated one."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def to_container(cfg: RecipeConfig) -> dict[str, Any]:
    """The fully resolved config as plain containers (for export, logging and trials)."""
    out = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    assert isinstance(out, dict)
    return out  # type: ignore[return-value]
