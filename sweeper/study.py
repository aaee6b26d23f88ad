"""The Optuna side: opening or resuming a study, failing and retrying dead trials, counting its budget."""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.storages._cached_storage import _CachedStorage
from optuna.trial import TrialState

from objectives.config import RECIPE_SECTIONS, ConfigError
from objectives.host_turns import PatientLock
from sweeper.config import SweepConfig, WorkersConfig, to_container
from sweeper.records import StudyRecord, TrialRecord, record_study
from sweeper.redaction import first_line
from sweeper.samplers import counting_running, for_worker, make_pruner, make_sampler
from sweeper.space import Param
from sweeper.tracking import redact

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def space_fingerprint(params: Sequence[Param]) -> str:
    """A stable text of the space, stored on the study so joining workers can check they agree."""
    return json.dumps([[p.name, p.path, optuna.distributions.distribution_to_json(p.distribution),
                        [[n, list(v)] for n, v in p.when]] for p in params], sort_keys=True)


def stored_space(study: optuna.Study) -> list[Param]:
    """The search space stored on the study (the inverse of :func:`space_fingerprint`).

    Empty for a study the sweeper did not create: it stores no space, or something else under the name.
    """
    return list(_parsed_space(StudyRecord.of(study).search_space or "[]"))


@functools.lru_cache(maxsize=8)
def _parsed_space(stored: str) -> tuple[Param, ...]:
    """A stored space, parsed once: a sweep in slots reads it after every trial, for the trial's line."""
    try:
        return tuple(Param(str(name), str(path), optuna.distributions.json_to_distribution(dist),
                           tuple((str(n), tuple(v)) for n, v in when)) for name, path, dist, when in json.loads(stored))
    except (TypeError, ValueError, KeyError):
        return ()


# Settings a worker may choose for its own device: they change where and how fast a trial runs, not its result.
PER_DEVICE = ("train.device", "model.gradient_checkpointing", "model.base_cache", "train.fused_loss", "model.tf32",
              "model.lean_layers", "train.cuda_graphs", "model.bf16_attention")


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
    if not create:
        check_store_exists(url)
    local = local_store_path(url)
    if local is not None:
        local.parent.mkdir(parents=True, exist_ok=True)
    storage = storage_for(url, cfg.workers, tracking_uri)
    sampler_cfg = cfg.study.sampler
    if not create:
        # Workers sharing a study must not draw the same suggestions from the same seed.
        offset = (os.getpid() if cfg.workers.index is None else cfg.workers.index) + 1
        sampler_cfg = for_worker(sampler_cfg, offset)
    elif cfg.workers.slots != 1:
        # Trials in slots run side by side: TPE counts the running ones (one at a time, nothing else runs).
        sampler_cfg = counting_running(sampler_cfg)
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
    known = StudyRecord.of(study)
    stored, stored_setup = known.search_space, known.fixed_setup
    if stored_setup is not None:  # studies from before a setting became per-device still store it
        stored_setup = {k: v for k, v in stored_setup.items() if k not in PER_DEVICE}
    if create and not study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING)):
        # Nothing finished or running under the old settings (a launch that failed or was stopped early):
        # the corrected command starts the study over with its own.
        stored = stored_setup = None
    if stored_setup is not None and stored_setup != setup:
        differ = sorted(k for k in set(setup) | set(stored_setup) if setup.get(k) != stored_setup.get(k))
        raise ConfigError(f"study {name!r} was started with other fixed settings; these differ: {', '.join(differ)}. "
                          "Use the study's settings, or a new study.name")
    if stored is None:
        record_study(study, search_space=fingerprint, fixed_setup=setup, objectives=list(cfg.study.objectives),
                     sweep_config=redact(to_container(cfg)))
    elif stored != fingerprint:
        raise ConfigError(f"search_space: differs from the one study {name!r} was started with; use the same "
                          "search space, or a new study.name")
    return study


class DeadTrialHandler(RetryHeartbeatStaleTrialCallback):
    """Called for a trial whose worker died (no heartbeat, or seen to exit); the trial is already failed.

    Optuna's retry enqueues its parameters again (up to ``max_retry`` times along one chain of retries,
    ``failed_trial``/``retry_history`` in its system attributes); on top of it the new trial's record says
    what it retries and why, and the dead trial's MLflow run is ended as KILLED, so none stays "running".
    """

    REASON = "its worker died mid-trial (no heartbeat or process exit); parameters enqueued again"
    UNCLAIMED_REASON = ("its process died before naming itself on the trial (no worker recorded); parameters "
                        "enqueued again")

    def __init__(self, max_retry: int, tracking_uri: str | None) -> None:
        super().__init__(max_retry=max_retry)
        self.tracking_uri = tracking_uri
        self._unclaimed_since: dict[int, float] = {}

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, reason: str = REASON) -> None:
        # Optuna carries the dead trial's user attributes over; its run id, config and OOM retries would
        # then pass for the retry's own. The retry starts from a record of what it retries.
        retry = copy.deepcopy(trial)
        retry.user_attrs = TrialRecord(retry_of=trial.number, retry_reason=reason).as_attrs()
        super().__call__(study, retry)
        run_id = TrialRecord.of(trial).mlflow_run_id
        if run_id and self.tracking_uri:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(self.tracking_uri)
            client.set_tag(run_id, "trial_state", "failed")
            client.set_tag(run_id, "state_reason", reason)
            client.set_terminated(run_id, status="KILLED")

    def unclaimed(self, trial: optuna.trial.FrozenTrial) -> bool:
        """Whether this process has seen ``trial`` running without a worker for :data:`UNCLAIMED_AFTER_S`, by its
        own monotonic clock (no other host's clock or time zone is compared)."""
        first = self._unclaimed_since.setdefault(trial.number, time.monotonic())
        return time.monotonic() - first > UNCLAIMED_AFTER_S


UNCLAIMED_AFTER_S = 120.0
"""A running trial that names no worker for this long was asked by a process killed before its first write
(the worker's name): no heartbeat or process check would ever fail it."""


def fail_trials_of(study: optuna.Study, is_dead: Callable[[str], bool], handler: DeadTrialHandler) -> list[int]:
    """Fail the running trials whose worker (``host:pid``) is dead, or that name none for a long time
    (:meth:`DeadTrialHandler.unclaimed`), and hand each to the retry handler."""
    recovered = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = TrialRecord.of(trial).worker
        if not (is_dead(worker) if worker else handler.unclaimed(trial)):
            continue
        try:
            failed = study.tell(trial.number, state=TrialState.FAIL)
        except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
            # Finished since it was listed (ValueError: before tell read it; the other: before tell wrote it):
            # a heartbeat check or another process failed it and ran the handler.
            continue
        except RuntimeError:
            # A grid sampler stops the study once its last point finishes, which Optuna refuses outside
            # optimize(); the state was written all the same.
            found = next((t for t in study.get_trials(states=(TrialState.FAIL,)) if t.number == trial.number), None)
            if found is None:
                raise
            failed = found
        handler(study, failed, reason=DeadTrialHandler.REASON if worker else DeadTrialHandler.UNCLAIMED_REASON)
        recovered.append(trial.number)
    return recovered


def dead_on_this_host(worker: str) -> bool:
    """True for a ``host:pid`` worker of this machine whose process is gone (works without heartbeats)."""
    import psutil

    host, _, pid = worker.rpartition(":")
    return host == socket.gethostname() and pid.isdigit() and not psutil.pid_exists(int(pid))


_FRESH = threading.local()


@contextmanager
def fresh_reads() -> Iterator[None]:
    """Reads of the study in this thread go to the database, whatever :class:`ReusedReads` would reuse."""
    before = getattr(_FRESH, "on", False)
    _FRESH.on = True
    try:
        yield
    finally:
        _FRESH.on = before


def _one_call_at_a_time(cls: type[_CachedStorage]) -> type[_CachedStorage]:
    """Every storage call of ``cls`` under its ``_calls`` lock. Optuna calls its storage from many places (the
    sampler, the pruner, ``tell``, the heartbeat thread), so the lock wraps the storage's methods, not its callers."""
    names = [n for n in dir(optuna.storages.BaseStorage) if not n.startswith("_")]
    names += ["record_heartbeat", "_get_stale_trial_ids", "get_heartbeat_interval",
              "get_heartbeat_stale_trial_callback"]
    for name in names:
        method = getattr(cls, name)
        if callable(method):
            setattr(cls, name, _under_calls_lock(method))
    return cls


def _under_calls_lock(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self._calls:
            return method(self, *args, **kwargs)

    return call


@_one_call_at_a_time
class ReusedReads(_CachedStorage):
    """An RDB storage (SQLite, PostgreSQL) whose read of the study's unfinished trials is reused for up to
    ``max_age_s`` (0, the default: every read goes to the database, as Optuna's own wrapper does).

    Optuna keeps finished trials and reads every unfinished one again on each read of the study: 45-60 ms with
    64 running trials on SQLite, and a sweep in slots reads the study a dozen times per trial (the sampler, the
    pruner at each evaluation, the progress line). At 64 slots on an H200 those reads held the interpreter's
    lock for three quarters of the trials' bookkeeping (BENCHMARKS.md, benchmark 5). A read under a second old
    serves the sampler, the pruner and the progress line as well. A read in :func:`fresh_reads` (the budget
    guard, the failure count, the adapter clean-up) asks the database only for the states of the trials it
    holds as unfinished, and reads in full just those whose state changed and the trials it has not seen: every
    state is then current, while a running trial's other fields may be up to ``max_age_s`` old, except its reports
    from this process, which enter the reused read as they are written. Heartbeats and writes go to the database as
    before.

    One call at a time goes to the database: SQLite takes one writer at a time anyway (and others retry with
    back-off meanwhile), and a trial's thread waiting for its turn waits outside its bookkeeping section
    (:class:`objectives.host_turns.PatientLock`), so a slot engine does not wait for a queue of writers.
    """

    def __init__(self, backend: optuna.storages.RDBStorage) -> None:
        super().__init__(backend)
        self.max_age_s = 0.0
        self._read_at: dict[int, float] = {}
        self._calls = PatientLock(reentrant=True)

    def _read_trials_from_remote_storage(self, study_id: int) -> None:
        # Under the call lock (every caller is a storage call): threads that find the study just read take that read.
        if time.monotonic() - self._read_at.get(study_id, -math.inf) < self.max_age_s:
            if getattr(_FRESH, "on", False):
                self._read_changed(study_id)
            return
        super()._read_trials_from_remote_storage(study_id)
        self._read_at[study_id] = time.monotonic()

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        super().set_trial_intermediate_value(trial_id, step, intermediate_value)
        # Into the read this process reuses, at once: the trials of a wave report a step together, and each one's
        # pruner compares it with the others' reports (sweeper.pruning). A new dict, not the held one changed:
        # other threads may be reading it.
        with self._lock:
            where = self._trial_id_to_study_id_and_number.get(trial_id)
            held = self._studies[where[0]].trials.get(where[1]) if where else None
            if held is not None and not held.state.is_finished():
                held.intermediate_values = {**held.intermediate_values, step: intermediate_value}

    def _read_changed(self, study_id: int) -> None:
        """Every trial whose state differs from the one held, and every trial not held, in full.

        Asks for the states of the trials held as unfinished and of every trial past the last finished one read:
        another worker's trial may have an id below one this process created since (and holds without reading).
        Uses Optuna's private RDB models and session helper, as its own cached storage does (pyproject pins
        ``optuna<6``).
        """
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session

        with self._lock:
            study = self._studies[study_id]
            held = {t._trial_id: t.state for t in study.trials.values()}
            unfinished = [i for i, state in held.items() if not state.is_finished()]
            trial = models.TrialModel
            with _create_scoped_session(self._backend.scoped_session) as session:
                states = session.query(trial.trial_id, trial.state).filter(
                    trial.study_id == study_id,
                    trial.trial_id.in_(unfinished) | (trial.trial_id > study.last_finished_trial_id)).all()
            if not states:
                return
            changed = {i for i, state in states if held.get(i) != state}
            trials = self._backend._get_trials(study_id, states=None, included_trial_ids=changed,
                                               trial_id_greater_than=max(i for i, _ in states))
            self._add_trials_to_cache(study_id, trials)
            # As Optuna's own read keeps its sets: every unfinished trial listed, the last finished one's id.
            study.unfinished_trial_ids.update(i for i, state in states if not state.is_finished())
            for read in trials:
                if not read.state.is_finished():
                    study.unfinished_trial_ids.add(read._trial_id)
                    continue
                study.last_finished_trial_id = max(study.last_finished_trial_id, read._trial_id)
                study.unfinished_trial_ids.discard(read._trial_id)


@contextmanager
def reused_reads(study: optuna.Study, max_age_s: float) -> Iterator[None]:
    """While inside, reads of the study may be up to ``max_age_s`` old (where its storage is :class:`ReusedReads`);
    after, they are fresh again."""
    storage = study._storage  # Optuna gives no public handle on a study's storage
    if not isinstance(storage, ReusedReads):
        yield
        return
    storage.max_age_s = max_age_s
    try:
        yield
    finally:
        storage.max_age_s = 0.0


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
            return ReusedReads(optuna.storages.RDBStorage(url))
        return ReusedReads(optuna.storages.RDBStorage(
            url, heartbeat_interval=workers.heartbeat_s, grace_period=workers.grace_s,
            heartbeat_stale_trial_callback=DeadTrialHandler(workers.max_retry, tracking_uri)))
    except Exception as e:  # any connection problem is reported with the (redacted) URL
        raise ConfigError(f"study.storage: cannot open {redact(url)!r}: {type(e).__name__}: "
                          f"{first_line(e)}") from None


def finished_trials(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def local_store_path(url: str) -> Path | None:
    """The file behind a ``sqlite:///`` or ``journal:`` URL (its query left out); None for a server's URL."""
    if url.startswith("sqlite:///"):
        return Path(url.removeprefix("sqlite:///").split("?")[0]).expanduser()
    if url.startswith("journal:"):
        return Path(url.removeprefix("journal:")).expanduser()
    return None


def check_store_exists(url: str) -> None:
    """A local study store (SQLite or journal file) exists: opening a missing one would create it empty."""
    local = local_store_path(url)
    if local is not None and not local.is_file():
        raise ConfigError(f"study.storage: no study store at {local} "
                          "(run `sweeper launch` first, or pass study.storage=... / output_dir=...)")


def load_study(cfg: SweepConfig) -> optuna.Study:
    """An existing study, read-only use (export, report); ConfigError listing the studies that exist."""
    url = cfg.storage_url
    check_store_exists(url)
    storage = storage_for(url)
    existing = optuna.get_all_study_names(storage)
    if cfg.study.name not in existing:
        raise ConfigError(f"study.name: no study {cfg.study.name!r} in {cfg.storage_url}; "
                          f"it holds: {', '.join(existing) or 'none'}")
    return optuna.load_study(study_name=cfg.study.name, storage=storage)
