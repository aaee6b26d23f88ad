"""The Optuna side: samplers, pruners, opening or resuming a study, counting its budget."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from objectives.config import RECIPE_SECTIONS, ConfigError, TrainConfig
from sweeper.config import PrunerConfig, SamplerConfig, SweepConfig, WorkersConfig, to_container
from sweeper.space import Param, grid_values
from sweeper.tracking import redact

# group=True, QMC and friends are stable in use; the per-call notice is noise in every sweep's output.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

SAMPLERS = ("tpe", "random", "grid", "cmaes", "gp", "qmc", "nsga2")
PRUNERS = ("median", "percentile", "successive_halving", "asha", "hyperband", "none")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def make_sampler(cfg: SamplerConfig, params: Sequence[Param]) -> optuna.samplers.BaseSampler:
    """Sampler by name; every one is seeded by ``cfg.seed``.

    Raises:
        ConfigError: an unknown name, a setting the sampler rejects, or a grid over a space it
            cannot enumerate (continuous or conditional parameters).
    """
    s = optuna.samplers
    name = cfg.name
    # Parameters a sampler cannot model (categoricals for CMA-ES, QMC) are drawn at random, seeded too.
    fallback: dict[str, Any] = {"independent_sampler": s.RandomSampler(seed=cfg.seed),
                                "warn_independent_sampling": False}
    try:
        if name == "tpe":
            return s.TPESampler(seed=cfg.seed, n_startup_trials=cfg.n_startup_trials,
                                multivariate=cfg.multivariate, group=cfg.group,
                                constant_liar=cfg.constant_liar)
        if name == "random":
            return s.RandomSampler(seed=cfg.seed)
        if name == "grid":
            # A grid fixes every parameter of every trial; a branch that is not sampled breaks its count.
            conditional = [p.name for p in params if p.when]
            if conditional:
                raise ConfigError(f"study.sampler.name: grid cannot sample conditional parameters "
                                  f"({', '.join(conditional)}); fix their condition "
                                  "(e.g. optimizer.name=sgd) or use tpe or random")
            return s.GridSampler({p.name: grid_values(p) for p in params}, seed=cfg.seed)
        if name == "cmaes":
            return s.CmaEsSampler(seed=cfg.seed, n_startup_trials=cfg.n_startup_trials, **fallback)
        if name == "gp":
            return s.GPSampler(seed=cfg.seed, n_startup_trials=cfg.n_startup_trials, **fallback)
        if name == "qmc":
            return s.QMCSampler(qmc_type=cfg.qmc_type, seed=cfg.seed, scramble=True, **fallback)
        if name == "nsga2":
            return s.NSGAIISampler(population_size=cfg.population_size, seed=cfg.seed)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:  # Optuna's own checks of the settings
        raise ConfigError(f"study.sampler: {name} rejects its settings: {e}") from None
    raise ConfigError(f"study.sampler.name: {name!r} is not allowed; choose one of {', '.join(SAMPLERS)}")


def make_pruner(cfg: PrunerConfig, train: TrainConfig) -> optuna.pruners.BasePruner:
    """Pruner by name; asked at every evaluation of a trial but the last.

    Successive halving and hyperband with ``min_resource: auto`` put their first rung at the first evaluation
    (``train.eval_every``), so rungs fall on evaluations: Optuna's own estimate (a hundredth of a finished
    trial's steps) assumes a report every step and, with evaluations every few steps, stacks several rungs on
    the first one (keeping 1/9 of the trials there instead of 1/3).

    Raises:
        ConfigError: an unknown name or a setting the pruner rejects.
    """
    p = optuna.pruners
    name = cfg.name
    # Hyperband checks its rungs only when a trial first reports; fail here, before anything runs.
    if name in ("successive_halving", "asha", "hyperband") and cfg.reduction_factor < 2:
        raise ConfigError(f"study.pruner.reduction_factor: must be >= 2 for {name}, got {cfg.reduction_factor}")
    try:
        if name == "median":
            return p.MedianPruner(n_startup_trials=cfg.n_startup_trials, n_warmup_steps=cfg.n_warmup_steps,
                                  interval_steps=cfg.interval_steps)
        if name == "percentile":
            return p.PercentilePruner(cfg.percentile, n_startup_trials=cfg.n_startup_trials,
                                      n_warmup_steps=cfg.n_warmup_steps, interval_steps=cfg.interval_steps)
        first_rung = min(train.eval_every, train.max_steps) if cfg.min_resource == "auto" else cfg.min_resource
        if name in ("successive_halving", "asha"):
            return p.SuccessiveHalvingPruner(min_resource=first_rung, reduction_factor=cfg.reduction_factor)
        if name == "hyperband":
            return p.HyperbandPruner(min_resource=first_rung, max_resource=train.max_steps,
                                     reduction_factor=cfg.reduction_factor)
        if name == "none":
            return p.NopPruner()
    except (ValueError, TypeError) as e:  # Optuna's own checks of the settings
        raise ConfigError(f"study.pruner: {name} rejects its settings: {e}") from None
    raise ConfigError(f"study.pruner.name: {name!r} is not allowed; choose one of {', '.join(PRUNERS)}")


def space_fingerprint(params: Sequence[Param]) -> str:
    """A stable text of the space, stored on the study so joining workers can check they agree."""
    return json.dumps([[p.name, p.path, optuna.distributions.distribution_to_json(p.distribution),
                        [[n, list(v)] for n, v in p.when]] for p in params], sort_keys=True)


# Settings a worker may choose for its own device: they change where and how fast a trial runs, not its result.
PER_DEVICE = ("train.device", "model.gradient_checkpointing")


def fixed_setup(cfg: SweepConfig, params: Sequence[Param]) -> dict[str, Any]:
    """What every trial of a study shares (model, data, unsearched training settings), flat and redacted."""
    from sweeper.tracking import flatten

    config = to_container(cfg)
    searched = {p.path for p in params}
    flat = flatten({k: config[k] for k in RECIPE_SECTIONS})
    return redact({k: v for k, v in flat.items() if k not in searched and k not in PER_DEVICE})


def open_study(cfg: SweepConfig, params: Sequence[Param], *, create: bool = True,
               tracking_uri: str | None = None) -> optuna.Study:
    """Create or resume the study named in the config; ConfigError when the stored one disagrees.

    ``create=False`` joins an existing study only (workers), failing with the names that exist.
    """
    url = cfg.storage_url
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    storage = storage_for(url, cfg.workers, tracking_uri)
    sampler_cfg = cfg.study.sampler
    if not create:
        # Workers sharing a study must not draw the same suggestions from the same seed.
        offset = int(os.environ.get("SWEEPER_WORKER_INDEX", os.getpid())) + 1
        sampler_cfg = dataclasses.replace(sampler_cfg, constant_liar=True,
                                          seed=None if sampler_cfg.seed is None else sampler_cfg.seed + offset)
    sampler = make_sampler(sampler_cfg, params)
    pruner = make_pruner(cfg.study.pruner, cfg.train)
    existing = optuna.get_all_study_names(storage)
    name = cfg.study.name
    if name not in existing and not create:
        raise ConfigError(f"study.name: no study {name!r} in the storage; it holds: {', '.join(existing) or 'none'}")
    study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                                directions=list(cfg.study.directions), load_if_exists=True)  # type: ignore[arg-type]
    stored_dirs = [d.name.lower() for d in study.directions]
    if stored_dirs != [d.lower() for d in cfg.study.directions]:
        raise ConfigError(f"study.directions: the stored study {name!r} has {stored_dirs}, "
                          f"the config asks for {list(cfg.study.directions)}")
    fingerprint = space_fingerprint(params)
    setup = fixed_setup(cfg, params)
    stored = study.user_attrs.get("search_space")
    stored_setup = study.user_attrs.get("fixed_setup")
    if stored_setup is not None:  # studies from before a setting became per-device still store it
        stored_setup = {k: v for k, v in stored_setup.items() if k not in PER_DEVICE}
    if stored_setup is not None and stored_setup != setup:
        differ = sorted(k for k in set(setup) | set(stored_setup) if setup.get(k) != stored_setup.get(k))
        raise ConfigError(f"study {name!r} was started with other fixed settings; these differ: {', '.join(differ)}. "
                          "Use the study's settings, or a new study.name")
    if stored is None:
        study.set_user_attr("search_space", fingerprint)
        study.set_user_attr("fixed_setup", setup)
        study.set_user_attr("objectives", list(cfg.study.objectives))
        study.set_user_attr("sweep_config", redact(to_container(cfg)))
    elif stored != fingerprint:
        raise ConfigError(f"search_space: differs from the one study {name!r} was started with; use the same "
                          "search space, or a new study.name")
    return study


class DeadTrialHandler:
    """Called for a trial whose worker died (no heartbeat, or seen to exit); the trial is already failed.

    Its parameters are enqueued again (up to ``max_retry`` times along one chain of retries) with the
    reason on the new trial, and its MLflow run is ended as KILLED, so no run stays "running" forever.
    """

    REASON = "its worker died mid-trial (no heartbeat or process exit); parameters enqueued again"

    def __init__(self, max_retry: int, tracking_uri: str | None) -> None:
        self.max_retry = max_retry
        self.tracking_uri = tracking_uri

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        history = [*trial.system_attrs.get("retry_history", []), trial.number]
        if len(history) <= self.max_retry:
            study.add_trial(optuna.trial.create_trial(
                state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
                user_attrs={"retry_of": trial.number, "retry_reason": self.REASON},
                system_attrs={"failed_trial": trial.number, "retry_history": history}))
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id and self.tracking_uri:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(self.tracking_uri)
            client.set_tag(run_id, "trial_state", "failed")
            client.set_tag(run_id, "state_reason", self.REASON)
            client.set_terminated(run_id, status="KILLED")


def fail_trials_of(study: optuna.Study, is_dead: Callable[[str], bool], handler: DeadTrialHandler) -> list[int]:
    """Fail the running trials whose worker (``host:pid``) is dead, and hand each to the retry handler."""
    recovered = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker")
        if not worker or not is_dead(worker):
            continue
        try:
            failed = study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another process (a heartbeat check) got there first and ran the handler
        if failed:
            handler(study, study._storage.get_trial(trial._trial_id))
            recovered.append(trial.number)
    return recovered


def dead_on_this_host(worker: str) -> bool:
    """True for a ``host:pid`` worker of this machine whose process is gone (works without heartbeats)."""
    import psutil

    host, _, pid = worker.rpartition(":")
    return host == socket.gethostname() and pid.isdigit() and not psutil.pid_exists(int(pid))


def storage_for(url: str, workers: WorkersConfig | None = None, tracking_uri: str | None = None) -> Any:
    """Optuna storage for a URL: an RDB URL (with heartbeats), or ``journal:<path>`` for a journal file."""
    if url.startswith("journal:"):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        path = Path(url.removeprefix("journal:")).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    try:
        if workers is None:
            return optuna.storages.RDBStorage(url)
        return optuna.storages.RDBStorage(
            url, heartbeat_interval=workers.heartbeat_s, grace_period=workers.grace_s,
            heartbeat_stale_trial_callback=DeadTrialHandler(workers.max_retry, tracking_uri))
    except Exception as e:  # noqa: BLE001 - any connection problem is reported with the (redacted) URL
        raise ConfigError(f"study.storage: cannot open {redact(url)!r}: {type(e).__name__}: "
                          f"{str(e).splitlines()[0][:300]}") from None


def finished_trials(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def load_study(cfg: SweepConfig) -> optuna.Study:
    """An existing study, read-only use (export, report); ConfigError listing the studies that exist."""
    url = cfg.storage_url
    local = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else url.removeprefix("journal:")
    if url.startswith(("sqlite:///", "journal:")) and not Path(local).expanduser().is_file():
        raise ConfigError(f"study.storage: no study store at {local} "
                          "(run `sweeper launch` first, or pass study.storage=... / output_dir=...)")
    storage = storage_for(url)
    existing = optuna.get_all_study_names(storage)
    if cfg.study.name not in existing:
        raise ConfigError(f"study.name: no study {cfg.study.name!r} in {cfg.storage_url}; "
                          f"it holds: {', '.join(existing) or 'none'}")
    return optuna.load_study(study_name=cfg.study.name, storage=storage)
