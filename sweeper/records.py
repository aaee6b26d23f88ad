"""What a sweep keeps in Optuna's user attributes: every key named once, written and read through here."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Protocol


class HasUserAttrs(Protocol):
    """An Optuna ``Trial``, ``FixedTrial`` or ``Study``: anything that stores user attributes."""

    def set_user_attr(self, key: str, value: Any) -> None: ...


@dataclass
class TrialRecord:
    """A trial's user attributes. Every field is optional: a trial writes what it knows when it knows it."""

    config: dict[str, Any] | None = None
    """The recipe config the trial trained (model, data, lora, optimizer, train): what an export reproduces."""
    state_reason: str | None = None
    """Why the trial was pruned or failed ('' when it completed)."""
    mlflow_run_id: str | None = None
    adapter_uri: str | None = None
    """MLflow artifact URI of the trial's saved adapter, when it was kept."""
    predicted_peak_mb: float | None = None
    oom_retries: int | None = None
    trainable_params: int | None = None
    peak_memory_mb: float | None = None
    train_seconds: float | None = None
    """Wall time inside training and evaluation steps."""
    graph_replays: int | None = None
    """Training passes replayed from a CUDA graph (``train.cuda_graphs``)."""
    worker: str | None = None
    """``host:pid`` of the process that ran it."""
    slurm_job: str | None = None
    """The SLURM job of that process (``<array job>_<task>`` for an array task), when a scheduler started it."""
    worker_memory_mb: float | None = None
    surplus: bool | None = None
    """Dropped before it ran: trials ahead of it had already covered the budget."""
    retry_of: int | None = None
    """The trial whose parameters this one retries (its worker died)."""
    retry_reason: str | None = None

    @classmethod
    def of(cls, trial: Any) -> TrialRecord:
        """Read a trial's record (a ``FrozenTrial``); keys this record does not know are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in trial.user_attrs.items() if k in names})

    def as_attrs(self) -> dict[str, Any]:
        """The fields that are set, as user attributes."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


TRIAL_FIELDS = frozenset(f.name for f in dataclasses.fields(TrialRecord))


def record(trial: HasUserAttrs, **values: Any) -> None:
    """Write fields of a trial's record.

    Raises:
        KeyError: a name that is not a :class:`TrialRecord` field (a typo would otherwise be stored silently).
    """
    unknown = set(values) - TRIAL_FIELDS
    if unknown:
        raise KeyError(f"not trial record fields: {', '.join(sorted(unknown))}")
    for key, value in values.items():
        trial.set_user_attr(key, value)


@dataclass
class StudyRecord:
    """A study's user attributes: what every worker that joins it must agree on, and where it is logged."""

    search_space: str | None = None
    """The space's fingerprint (JSON, see :func:`sweeper.study.space_fingerprint`)."""
    fixed_setup: dict[str, Any] | None = None
    """What every trial shares (flat, redacted): a relaunch with other values is refused."""
    objectives: list[str] | None = None
    sweep_config: dict[str, Any] | None = None
    """The launch's whole config (redacted): what an export starts from."""
    mlflow_parent_run_id: str | None = None

    @classmethod
    def of(cls, study: Any) -> StudyRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in study.user_attrs.items() if k in names})


STUDY_FIELDS = frozenset(f.name for f in dataclasses.fields(StudyRecord))


def record_study(study: HasUserAttrs, **values: Any) -> None:
    """Write fields of a study's record.

    Raises:
        KeyError: a name that is not a :class:`StudyRecord` field.
    """
    unknown = set(values) - STUDY_FIELDS
    if unknown:
        raise KeyError(f"not study record fields: {', '.join(sorted(unknown))}")
    for key, value in values.items():
        study.set_user_attr(key, value)
