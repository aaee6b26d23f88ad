"""Export a trial as a Hydra config that ``sweeper train`` runs as is."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import optuna
import yaml

from objectives.config import ConfigError
from sweeper.config import Provenance, SweepConfig, to_container
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
    policy = out.get("tracking", {}).get("log_adapter", cfg.tracking.log_adapter)
    adapter_uri = trial_record.adapter_uri
    if adapter_uri and policy == "best" and len(study.directions) == 1:
        # A finished trial's record cannot be changed: a better trial's adapter deleted this one's files.
        keeper = adapter_keeper(((t.number, t.value) for t in study.get_trials(
            deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)) if TrialRecord.of(t).adapter_uri),
            study.direction)
        adapter_uri = adapter_uri if keeper == trial.number else None
    out.update(trial_record.config)
    out["search_space"] = {}
    out["provenance"] = {
        "study": study.study_name,
        "storage": cfg.storage_url,
        "trial_number": trial.number,
        "values": list(trial.values),
        "mlflow_parent_run_id": study_record.mlflow_parent_run_id,
        "mlflow_run_id": trial_record.mlflow_run_id,
        "adapter_uri": adapter_uri,
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


def adapter_keeper(candidates: Iterable[tuple[int, float | None]],
                   direction: optuna.study.StudyDirection) -> int | None:
    """Of trials (number, value) holding an adapter, the one ``log_adapter=best`` keeps: the best value, the
    earliest trial on a tie (the one that became the best first)."""
    sign = 1.0 if direction == optuna.study.StudyDirection.MINIMIZE else -1.0
    ranked = [(sign * value, number) for number, value in candidates if value is not None]
    return min(ranked)[1] if ranked else None


MATCH_TOLERANCE = 1e-4
MATCHES = "matches to 1e-4"  # MATCH_TOLERANCE as people write it, not 0.0001


def _fmt_value(name: str, value: float) -> str:
    return f"{value:.0f}" if name == "trainable_params" else f"{value:.4f}"


def value_lines(objectives: Sequence[str], values: Sequence[float], provenance: Provenance | None) -> list[str]:
    """One line per objective, beside the exported trial's value when the config came from an export, e.g.
    ``eval_loss 2.7699 (exported trial 6: 2.7699, matches to 1e-4)``."""
    exported = list(provenance.values) if provenance is not None else []
    lines = []
    for i, (name, value) in enumerate(zip(objectives, values, strict=False)):
        line = f"{name} {_fmt_value(name, value)}"
        if i < len(exported) and provenance is not None:
            diff = value - exported[i]
            verdict = MATCHES if abs(diff) <= MATCH_TOLERANCE else f"differs by {diff:+.4g}"
            line += f" (exported trial {provenance.trial_number}: {_fmt_value(name, exported[i])}, {verdict})"
        lines.append(line)
    return lines


def reproduction_verdict(objectives: Sequence[str], values: Sequence[float], exported: Sequence[float]) -> str:
    """``matches to 1e-4``, or which objectives differ and by how much (a tag on the reproduction's run)."""
    differ = [f"{name} by {v - e:+.4g}" for name, v, e in zip(objectives, values, exported, strict=False)
              if abs(v - e) > MATCH_TOLERANCE]
    return f"differs: {', '.join(differ)}" if differ else MATCHES
