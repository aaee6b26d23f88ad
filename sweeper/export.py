"""Export a trial as a Hydra config that ``sweeper train`` runs as is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import yaml

from objectives.config import ConfigError
from sweeper.config import SweepConfig, to_container
from sweeper.records import StudyRecord, TrialRecord
from sweeper.tracking import redact


def pick_trial(study: optuna.Study, number: int | None) -> optuna.trial.FrozenTrial:
    """The chosen trial, or the best one (single objective); ConfigError saying what exists."""
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if number is not None:
        by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
        if number not in by_number:
            known = f"trials: 0..{len(by_number) - 1}" if by_number else "it has no trials"
            raise ConfigError(f"--trial: study {study.study_name!r} has no trial {number}; {known}")
        trial = by_number[number]
        if trial.state != optuna.trial.TrialState.COMPLETE:
            raise ConfigError(f"--trial: trial {number} is {trial.state.name.lower()}; completed trials: "
                              f"{', '.join(str(t.number) for t in complete) or 'none'}")
        return trial
    if not complete:
        raise ConfigError(f"study {study.study_name!r} has no completed trial to export")
    if len(study.directions) > 1:
        front = ", ".join(str(t.number) for t in study.best_trials)
        raise ConfigError(f"--trial: study {study.study_name!r} has several objectives; choose a trial of its "
                          f"Pareto front: {front}")
    return study.best_trial


def exported_config(cfg: SweepConfig, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """The trial's resolved config, the sweep's bookkeeping sections, and a provenance block.

    Raises:
        ConfigError: the trial has no recorded config (a study the sweeper did not run).
    """
    study_record, trial_record = StudyRecord.of(study), TrialRecord.of(trial)
    if trial_record.config is None:
        raise ConfigError(f"--trial: trial {trial.number} of study {study.study_name!r} has no recorded config")
    out = dict(study_record.sweep_config or to_container(cfg))
    out.update(trial_record.config)
    out["search_space"] = {}
    out["provenance"] = {
        "study": study.study_name,
        "storage": cfg.storage_url,
        "trial_number": trial.number,
        "values": list(trial.values),
        "mlflow_parent_run_id": study_record.mlflow_parent_run_id,
        "mlflow_run_id": trial_record.mlflow_run_id,
        "adapter_uri": trial_record.adapter_uri,
    }
    return redact(out)


def write_export(config: dict[str, Any], path: Path) -> Path:
    p = config["provenance"]
    header = (f"# Trial {p['trial_number']} of study {p['study']} (value {p['values']}).\n"
              f"# Reproduce it:  python -m sweeper train --config {path}\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(header + yaml.safe_dump(config, sort_keys=False))
    tmp.replace(path)
    return path
