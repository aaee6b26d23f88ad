"""Checks before anything is written: every setting a launch can check without training is checked here.

A launch that fails after it created the study and the MLflow store leaves files behind, and a user's
corrected command then meets a study "started with other settings". So the output folder, the device,
the model's config, the target modules of every trial, every data row, the study's storage and the
tracking store are checked first, each failure a :class:`ConfigError` naming the setting.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from objectives.config import ConfigError
from objectives.decisions import cuda_graphs_unavailable, with_checkpointing, with_fused_loss
from objectives.timing import detect_device
from sweeper.config import SweepConfig
from sweeper.redaction import first_line
from sweeper.space import Param
from sweeper.study import local_store_path
from sweeper.tracking import redact

log = logging.getLogger(__name__)

MIN_FREE_BYTES = 64 * 2**20
"""Room a sweep needs in its output folder at least: the stores, the study plots, one adapter."""
RDB_SCHEMES = ("sqlite", "postgresql", "mysql", "oracle", "mssql")
TRACKING_SCHEMES = (*RDB_SCHEMES, "http", "https", "databricks")  # MLflow 3 refuses its old file store
CONNECT_TIMEOUT_S = 5
TIMEOUT_DRIVERS = ("postgresql", "postgresql+psycopg", "postgresql+psycopg2", "mysql", "mysql+mysqldb",
                   "mysql+pymysql")
"""Drivers that take ``connect_timeout`` (pg8000 and others name it differently: they get their default)."""


def check_launch(cfg: SweepConfig, params: Sequence[Param], *, study: bool = True) -> Any:
    """Everything a launch, a worker or a training run needs, before the first write; returns the model's config
    (without its weights), which the checks read.

    Args:
        study: False for a run outside the study (``train``), which never opens its storage.

    Raises:
        ConfigError: naming the first setting that cannot work.
    """
    check_output_dir(cfg.output_path)
    if cfg.launcher.name == "local":  # else the workers train on other machines and check their own device
        check_device(cfg.train.device)
    check_cuda_graphs(cfg)
    model_config = check_model(cfg)
    check_targets(cfg, params, model_config)
    check_data(cfg)
    if study:
        check_storage(cfg.storage_url)
    check_tracking(cfg.tracking_uri)
    return model_config


def check_cuda_graphs(cfg: SweepConfig) -> None:
    """``train.cuda_graphs=on`` where no trial could replay its step: on the CPU, with checkpointing or the fused loss
    on, with several passes per step, or in slots. (A trial whose ``auto`` turns checkpointing or the fused loss on
    still fails alone.)"""
    if cfg.train.cuda_graphs is not True:
        return
    if isinstance(cfg.workers.slots, int) and cfg.workers.slots > 1:
        raise ConfigError("train.cuda_graphs: on is not run in slots (workers.slots > 1); use auto or off, or "
                          "workers.slots=1")
    # "auto" counts as off here: a trial's own resolution may still turn checkpointing or the fused loss on
    ckpt, fused = cfg.model.gradient_checkpointing, cfg.train.fused_loss
    trial = with_fused_loss(with_checkpointing(cfg, ckpt is True), fused is True)
    reason = cuda_graphs_unavailable(trial, detect_device(cfg).kind)
    if reason is not None:
        raise ConfigError(f"train.cuda_graphs: on {reason}; use auto or off")


def nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_dir(path: Path) -> None:
    """The output folder (or the folder it will be made in) takes files, and has room for a sweep."""
    where = nearest_existing(path)
    if not where.is_dir():
        raise ConfigError(f"output_dir: {where} is a file, not a folder")
    try:
        # A real write: as root, permission bits and os.access say nothing about a read-only mount.
        with tempfile.TemporaryFile(dir=where):
            pass
    except OSError as e:
        raise ConfigError(f"output_dir: cannot write in {where}: {e.strerror or e}") from None
    free = shutil.disk_usage(where).free
    if free < MIN_FREE_BYTES:
        raise ConfigError(f"output_dir: {where} has {free / 2**20:.0f} MiB free; a sweep needs at least "
                          f"{MIN_FREE_BYTES // 2**20} MiB (free some space or set output_dir=...)")


def check_device(name: str) -> None:
    """``train.device`` names a device this machine has."""
    if name in ("auto", "cpu"):
        return
    import torch

    kind, _, index = name.partition(":")
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError("train.device: cuda is not available on this machine (no CUDA device or a CPU "
                              "build of torch); use train.device=auto or cpu")
        if index and (not index.isdigit() or int(index) >= count):
            raise ConfigError(f"train.device: {name!r}: this machine has cuda:0..cuda:{count - 1}")
    elif kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("train.device: mps is not available on this machine; use train.device=auto or cpu")


def check_model(cfg: SweepConfig) -> Any:
    """The model's architecture config (no weights): its source exists and is readable."""
    from objectives.sources import load_model_config

    try:
        return load_model_config(cfg.model)
    except ConfigError:
        raise
    except Exception as e:
        hint = ("; without the network, a hub id must be in the local cache (HF_HUB_OFFLINE)"
                if "/" in cfg.model.source and not Path(cfg.model.source).exists() else "")
        raise ConfigError(f"model.source: cannot read the config of {cfg.model.source!r}: {type(e).__name__}: "
                          f"{first_line(e)}{hint}") from None


def linear_names(cfg: SweepConfig, model_config: Any) -> list[str] | None:
    """The model's linear layers from its config alone (an empty model on the meta device); None when the
    architecture cannot be built that way, and the trials find out for themselves."""
    import torch
    from transformers import AutoModelForCausalLM

    from objectives.base import linear_module_names

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=cfg.model.trust_remote_code)
    except Exception as e:
        log.info("target modules are checked by each trial: the model could not be built empty (%s)", e)
        return None
    return linear_module_names(model)


def check_targets(cfg: SweepConfig, params: Sequence[Param], model_config: Any) -> None:
    """The fixed ``lora.targets`` and every choice the space samples for it name modules of this model."""
    from optuna.distributions import CategoricalDistribution

    from objectives.targets import resolve_targets

    choices = [list(p.distribution.choices) for p in params
               if p.path == "lora.targets" and isinstance(p.distribution, CategoricalDistribution)]
    names = linear_names(cfg, model_config)
    if names is None:
        return
    for value in [v for c in choices for v in c] if choices else [cfg.lora.targets]:
        try:
            resolve_targets(value, names)
        except ConfigError as e:
            prefix = f"search_space: lora.targets choice {value!r}: " if choices else ""
            raise ConfigError(f"{prefix}{e}") from None


def check_data(cfg: SweepConfig) -> None:
    """Every row of a data file, without the tokenizer."""
    from objectives.data import check_rows

    check_rows(cfg.data)


def check_storage(url: str) -> None:
    """The study's storage: a scheme Optuna stores in, a folder that takes files, a server that answers."""
    scheme = urlsplit(url).scheme.split("+")[0]
    if scheme not in (*RDB_SCHEMES, "journal"):
        raise ConfigError(f"study.storage: {redact(url)!r} is not a storage Optuna opens; use "
                          "sqlite:///path/optuna.db, postgresql://user@host/db, mysql://... or journal:/path/file")
    local = local_store_path(url)
    if local is not None:
        check_output_dir(local.parent)
        return
    check_database("study.storage", url)


def check_tracking(uri: str) -> None:
    """The MLflow store: a scheme MLflow logs to, and, for a database or a server, that it answers."""
    scheme = urlsplit(uri).scheme.split("+")[0]
    if scheme not in TRACKING_SCHEMES:
        raise ConfigError(f"tracking.uri: {redact(uri)!r} is not a store MLflow logs to; use "
                          "sqlite:///path/mlflow.db, postgresql://user@host/db or http(s)://host:port")
    local = local_store_path(uri) if scheme == "sqlite" else None
    if local is not None:
        check_output_dir(local.parent)
    elif scheme in ("http", "https"):
        check_server(uri)
    elif scheme in RDB_SCHEMES:
        check_database("tracking.uri", uri)


def check_database(field: str, url: str) -> None:
    """A database server answers a connection (within a few seconds) with these credentials."""
    import sqlalchemy

    driver = urlsplit(url).scheme
    args = {"connect_timeout": CONNECT_TIMEOUT_S} if driver in TIMEOUT_DRIVERS else {}
    try:
        engine = sqlalchemy.create_engine(url, connect_args=args)
        try:
            with engine.connect():
                pass
        finally:
            engine.dispose()
    except Exception as e:
        what = "cannot open" if field == "study.storage" else "cannot reach MLflow at"
        raise ConfigError(f"{field}: {what} {redact(url)!r}: {type(e).__name__}: "
                          f"{first_line(e)}") from None


def check_server(uri: str) -> None:
    """An MLflow tracking server answers its health check."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=CONNECT_TIMEOUT_S):
            pass
    except urllib.error.HTTPError:
        return  # it answered (a proxy asking for credentials MLflow's client has): reachable
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise ConfigError(f"tracking.uri: cannot reach MLflow at {redact(uri)!r}: "
                          f"{first_line(e)}") from None


