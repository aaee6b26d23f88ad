"""MLflow logging by explicit run ids: a parent run per study, a child run per trial, batched metrics."""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from objectives.config import ConfigError
from objectives.host_turns import PatientLock
from sweeper.config import SweepConfig, to_container
from sweeper.records import StudyRecord, record_study
from sweeper.redaction import REDACTED, SECRET_WORD, first_line, redact_text

if TYPE_CHECKING:  # optuna is imported by the callers that hand a study over; `sweeper --help` stays quick
    import optuna

    from sweeper.space import Param

log = logging.getLogger(__name__)

# Offline by default: MLflow's usage telemetry would otherwise try the network from every process that logs,
# and from the UI server, and wait for it at exit.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

# Whole words at the end of a key (hf_token, db.password, api-key), not bos_token_id or tokenizer.
SECRET_KEY = re.compile(rf"(?:^|[._-]){SECRET_WORD}$", re.IGNORECASE)
FLUSH_EVERY = 200
BATCH_LIMIT = 1000
"""The most metrics and tags MLflow takes in one batch."""
STALE_AFTER_S = 10.0
"""An evaluation writes a run's buffered metrics once the oldest of them is this old (see :meth:`Tracker.flush`):
a sweep in slots ends several trials a second, each evaluating in a few seconds, and its run's end writes the
rest. A worker killed outright loses at most this much of a run's metrics (its trial fails with it)."""

# Trial state -> MLflow run status
RUN_STATUS = {"complete": "FINISHED", "pruned": "KILLED", "failed": "FAILED", "interrupted": "KILLED"}


def redact(value: Any, key: str = "") -> Any:
    """Blank out secrets: values under secret-looking keys, and passwords inside URLs."""
    if SECRET_KEY.search(key) and value is not None and value != "" and value is not False:
        return REDACTED  # a secret-named mapping or list is blanked whole
    if isinstance(value, Mapping):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v, key) for v in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class Tracker:
    """Thin MLflow client wrapper: no global active run, so overlapping trials never mix.

    Example:
        >>> tracker = Tracker("sqlite:///mlruns/mlflow.db", "my-study", Path("mlruns/artifacts"))  # doctest: +SKIP
        >>> parent = tracker.start_run("study", tags={"kind": "study"})  # doctest: +SKIP
        >>> child = tracker.start_run("trial-0", parent_id=parent)  # doctest: +SKIP
    """

    def __init__(self, uri: str, experiment: str, artifact_dir: Path | None = None) -> None:
        from mlflow.tracking import MlflowClient

        if uri.startswith("sqlite:///"):
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        if uri.startswith("http"):
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        try:
            found = self.client.get_experiment_by_name(experiment)
            if found is None:
                location = artifact_dir.resolve().as_uri() if artifact_dir is not None else None
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
            else:
                self.experiment_id = found.experiment_id
        except Exception as e:  # any failure to reach the store is a config problem here
            raise ConfigError(f"tracking.uri: cannot reach MLflow at {redact(uri)!r}: "
                              f"{type(e).__name__}: {first_line(e)}") from None
        self._pending: dict[str, list[Any]] = {}
        self._pending_since: dict[str, float] = {}
        """When the oldest of each run's buffered metrics was logged (``time.monotonic``)."""
        self._artifact_uris: dict[str, str] = {}
        """The artifact location of each run this tracker created and has not ended, known from its creation:
        MLflow's client would read the run back to find it before its first artifact. Other runs (a reopened
        parent run, another process's) are read back when needed."""
        # Trials in slots log from one thread each: one write at a time, as SQLite takes them anyway (its
        # lock contention otherwise turns into retries with back-off inside MLflow).
        self._lock = PatientLock(reentrant=True)

    def start_run(self, name: str, parent_id: str | None = None, tags: Mapping[str, str] | None = None,
                  params: Mapping[str, Any] | None = None) -> str:
        all_tags = dict(tags or {})
        if parent_id:
            all_tags["mlflow.parentRunId"] = parent_id
        with self._lock:
            run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
            self._artifact_uris[run.info.run_id] = run.info.artifact_uri
        if params:
            self.log_params(run.info.run_id, params)
        return run.info.run_id

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in flatten(redact(params)).items()]
        with self._lock:
            for i in range(0, len(items), 100):
                self.client.log_batch(run_id, params=items[i:i + 100])

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        with self._lock:
            self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, run_id: str, step: int, metrics: Mapping[str, float]) -> None:
        """Buffer metrics; they reach the store in batches (one write per FLUSH_EVERY values)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        with self._lock:
            buf = self._pending.setdefault(run_id, [])
            if not buf:
                self._pending_since[run_id] = time.monotonic()
            buf.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
            full = len(buf) >= FLUSH_EVERY
        if full:
            self.flush(run_id)

    def flush(self, run_id: str, stale_after: float = 0.0, tags: Mapping[str, Any] | None = None) -> None:
        """Write the run's buffered metrics, with ``tags`` in the first batch; with ``stale_after``, only once the
        oldest buffered metric is that many seconds old."""
        from mlflow.entities import RunTag

        since = self._pending_since.get(run_id)  # read outside the lock: a skipped flush waits for no one
        if stale_after and (since is None or time.monotonic() - since < stale_after):
            return
        with self._lock:
            buf = self._pending.pop(run_id, [])
            self._pending_since.pop(run_id, None)
            extra = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
            first = BATCH_LIMIT - len(extra)
            batches = [(buf[:first], extra)]
            batches += [(buf[i:i + BATCH_LIMIT], []) for i in range(first, len(buf), BATCH_LIMIT)]
            for metrics, batch_tags in batches:
                if metrics or batch_tags:
                    self.client.log_batch(run_id, metrics=metrics, tags=batch_tags)

    def _artifact_repo(self, artifact_uri: str) -> Any:
        """The repository at a run's artifact URI, as MLflow's client finds it (a Databricks profile included)."""
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
        from mlflow.utils.uri import add_databricks_profile_info_to_artifact_uri

        uri = add_databricks_profile_info_to_artifact_uri(artifact_uri, self.uri)
        return get_artifact_repository(uri, tracking_uri=self.uri)

    def _artifact_uri(self, run_id: str) -> str:
        uri = self._artifact_uris.get(run_id)
        if uri is None:
            with self._lock:
                uri = self.client.get_run(run_id).info.artifact_uri
        return uri

    def log_dict(self, run_id: str, obj: Any, artifact_file: str) -> None:
        """``obj`` redacted, as MLflow's ``log_dict`` writes it: YAML for .yaml and .yml, else JSON."""
        import yaml

        obj = redact(obj)
        if os.path.splitext(artifact_file)[1] in (".yaml", ".yml"):
            self.log_text(run_id, yaml.dump(obj, indent=2, default_flow_style=False), artifact_file)
        else:
            self.log_text(run_id, json.dumps(obj, indent=2, default=str), artifact_file)

    def log_artifacts(self, run_id: str, local_dir: str | Path, artifact_path: str | None = None) -> None:
        repo = self._artifact_repo(self._artifact_uri(run_id))
        with self._lock:
            repo.log_artifacts(str(local_dir), artifact_path)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        path = posixpath.normpath(artifact_file)
        repo = self._artifact_repo(self._artifact_uri(run_id))
        with tempfile.TemporaryDirectory(prefix="qlora-sweep-") as tmp:
            local = Path(tmp) / posixpath.basename(path)
            local.write_text(text, encoding="utf-8")
            with self._lock:
                repo.log_artifact(str(local), posixpath.dirname(path) or None)

    def end_run(self, run_id: str, status: str = "FINISHED", tags: Mapping[str, Any] | None = None) -> None:
        """Write the buffered metrics and ``tags``, then end the run with ``status``."""
        try:
            with self._lock:
                self.flush(run_id, tags=tags)
                self.client.set_terminated(run_id, status=status)
        finally:
            self._artifact_uris.pop(run_id, None)

    def get_run(self, run_id: str) -> Any:
        """The run as the store has it (MLflow's ``Run``)."""
        with self._lock:
            return self.client.get_run(run_id)

    def delete_tag(self, run_id: str, key: str) -> None:
        with self._lock:
            self.client.delete_tag(run_id, key)

    def delete_artifacts(self, artifact_uri: str, artifact_path: str) -> None:
        """Delete a run's artifacts under ``artifact_path``; ``artifact_uri`` is the run's (files, not the store:
        no lock)."""
        self._artifact_repo(artifact_uri).delete_artifacts(artifact_path)

    def running_children(self, parent_id: str) -> list[tuple[str, dict[str, str]]]:
        """(run id, tags) of the parent's child runs whose status is RUNNING."""
        with self._lock:
            runs = self.client.search_runs(
                [self.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}' and attributes.status = 'RUNNING'")
        return [(r.info.run_id, r.data.tags) for r in runs]

    def reopen(self, run_id: str) -> None:
        with self._lock:
            self.client.update_run(run_id, status="RUNNING")

    def artifact_uri(self, run_id: str, path: str = "") -> str:
        base = self._artifact_uri(run_id)
        return f"{base}/{path}" if path else base


# --- the study's parent run -------------------------------------------------------------------------


def make_tracker(cfg: SweepConfig) -> Tracker:
    return Tracker(cfg.tracking_uri, cfg.experiment_name, cfg.output_path / "artifacts")


def parent_run(tracker: Tracker, study: optuna.Study, cfg: SweepConfig, params: Sequence[Param]) -> str:
    """The study's MLflow run: created on the first launch, reopened on a resume."""
    run_id = StudyRecord.of(study).mlflow_parent_run_id
    if run_id:
        tracker.reopen(run_id)
        return run_id
    run_id = tracker.start_run(
        cfg.study.name, tags={"kind": "study", "study": cfg.study.name},
        params={"sampler": cfg.study.sampler.name, "pruner": cfg.study.pruner.name,
                "n_trials": cfg.study.n_trials, "objectives": ",".join(cfg.study.objectives),
                "storage": cfg.storage_url, "sampler_seed": cfg.study.sampler.seed})
    tracker.log_dict(run_id, dict(cfg.search_space), "search_space.yaml")
    tracker.log_text(run_id, "\n".join(f"{p.name}: {p.describe()}"
                                       + (f"  when {p.describe_condition()}" if p.when else "")
                                       for p in params), "search_space_resolved.txt")
    tracker.log_dict(run_id, to_container(cfg), "sweep_config.yaml")
    record_study(study, mlflow_parent_run_id=run_id)
    return run_id


def update_parent(tracker: Tracker, run_id: str, study: optuna.Study, written: str | None = None) -> str | None:
    """Keep the best value and trial on the parent run current; returns what it shows, which the caller passes
    back as ``written`` so that a trial that changed nothing writes nothing (a sweep in slots ends several
    trials a second)."""
    if len(study.directions) > 1:
        pareto = ",".join(str(t.number) for t in study.best_trials)
        if pareto != written:
            tracker.set_tags(run_id, {"pareto_trials": pareto})
        return pareto
    try:
        best = study.best_trial
    except ValueError:
        return written
    if str(best.number) != written:
        tracker.log_metrics(run_id, best.number, {"best_value": float(best.value or 0.0)})
        tracker.flush(run_id, tags={"best_trial": str(best.number), "best_value": f"{best.value:.6f}"})
    return str(best.number)


STRAY_REASON = "its worker died before the run was linked to its trial"


def end_stray_children(tracker: Tracker, parent_id: str, study: optuna.Study) -> None:
    """End as KILLED each child run still "running" whose trial has finished: a worker killed between creating
    the run and recording its id on the trial leaves one that no dead-trial handler can find."""
    finished = {str(t.number) for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
    for child_id, tags in tracker.running_children(parent_id):
        if tags.get("trial_number") in finished:
            tracker.end_run(child_id, "KILLED", tags={"trial_state": "failed", "state_reason": STRAY_REASON})


def finish_parent(tracker: Tracker, run_id: str, study: optuna.Study, cfg: SweepConfig, status: str) -> None:
    """Plots and trial counts on the parent run, then end it with ``status`` (a resume reopens it)."""
    try:
        from sweeper.plots import log_study_plots

        if any(t.state.name == "COMPLETE" for t in study.get_trials(deepcopy=False)):  # else every plot is empty
            log_study_plots(tracker, run_id, study)
    except Exception as e:  # plots are a convenience; a failure must not hide the results
        log.warning("study plots skipped: %s", e)
    try:
        end_stray_children(tracker, run_id, study)
    except Exception as e:  # a cleanup: it must not keep the parent run open
        log.warning("child runs left running were not ended: %s", first_line(e))
    states = Counter(t.state.name.lower() for t in study.get_trials(deepcopy=False))
    finished = states["complete"] + states["pruned"]
    try:
        update_parent(tracker, run_id, study)  # the trials' own updates may have read the study a moment old
        tracker.end_run(run_id, status, tags={**{f"trials_{s}": n for s, n in states.items() if n},
                                              "budget_left": max(0, cfg.study.n_trials - finished)})
    except Exception as e:  # a full disk or a store gone away: the trials are safe in the study, say so in one line
        log.error("the study's MLflow run %s could not be ended %s: %s: %s", run_id, status, type(e).__name__,
                  first_line(e))
