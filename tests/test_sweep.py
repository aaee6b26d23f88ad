"""Sweeps on the tiny random 4-bit model: budget, resume, failure policy, export -> train."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from sweeper import compose
from sweeper.launch import run_single, run_sweep
from tests.conftest import TINY, run_cli

SPACE = ["search_space=none", "lora.r=choice(2,4)", "optimizer.lr=tag(log, interval(1e-4, 1e-2))"]


def child_runs(cfg, parent_id: str) -> list:  # type: ignore[no-untyped-def]
    client = MlflowClient(cfg.tracking_uri)
    exp = client.get_experiment_by_name(cfg.experiment_name)
    runs = client.search_runs([exp.experiment_id])
    return [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]


def test_budget_resume_and_mlflow(tmp_path: Path) -> None:
    cfg, params = compose.load([*TINY, *SPACE, f"output_dir={tmp_path}", "study.n_trials=2"])
    study = run_sweep(cfg, params, show_progress=False)
    assert len(study.trials) == 2
    parent = study.user_attrs["mlflow_parent_run_id"]
    assert len(child_runs(cfg, parent)) == 2

    # The budget is the study's total: raising it to 3 runs one more trial, in the same parent run.
    cfg, params = compose.load([*TINY, *SPACE, f"output_dir={tmp_path}", "study.n_trials=3"])
    study = run_sweep(cfg, params, show_progress=False)
    assert len(study.trials) == 3
    assert study.user_attrs["mlflow_parent_run_id"] == parent
    assert len(child_runs(cfg, parent)) == 3
    assert {t.params["lora.r"] for t in study.trials} <= {2, 4}


def test_a_failing_trial_does_not_stop_the_sweep(tmp_path: Path) -> None:
    # "no_such_proj" is a valid name but matches no module of the model: that trial raises.
    cfg, params = compose.load([*TINY, "search_space=none", "lora.targets=choice(no_such_proj, qk)",
                                "study/sampler=grid", "study.n_trials=2", f"output_dir={tmp_path}"])
    study = run_sweep(cfg, params, show_progress=False)
    states = {t.params["lora.targets"]: t.state for t in study.trials}
    assert states == {"no_such_proj": optuna.trial.TrialState.FAIL, "qk": optuna.trial.TrialState.COMPLETE}
    failed = next(t for t in study.trials if t.state == optuna.trial.TrialState.FAIL)
    assert "matches no linear module" in failed.user_attrs["state_reason"]
    assert "q_proj" in failed.user_attrs["state_reason"]  # lists what the model has


def test_export_then_train_reproduces(tmp_path: Path) -> None:
    cfg, params = compose.load([*TINY, *SPACE, f"output_dir={tmp_path}", "study.n_trials=2"])
    study = run_sweep(cfg, params, show_progress=False)
    out = tmp_path / "best.yaml"
    result = run_cli("export", *TINY, f"output_dir={tmp_path}", "--out", str(out))
    assert result.returncode == 0, result.stderr
    exported = yaml.safe_load(out.read_text())
    assert exported["provenance"]["trial_number"] == study.best_trial.number
    assert exported["lora"]["r"] == study.best_trial.params["lora.r"]
    assert out.read_text().startswith("# Trial ")
    cfg2, params2 = compose.load([], config_file=out)
    assert params2 == []
    value = run_single(cfg2, show_progress=False)
    assert value == pytest.approx(study.best_value, rel=1e-6)


def test_best_adapter_is_a_folder_peft_loads(tmp_path: Path) -> None:
    from urllib.parse import urlparse

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from objectives.sources import random_model_dir, resolve_source

    cfg, params = compose.load([*TINY, *SPACE, f"output_dir={tmp_path}", "study.n_trials=2"])
    study = run_sweep(cfg, params, show_progress=False)
    folder = Path(urlparse(study.best_trial.user_attrs["adapter_uri"]).path)
    assert (folder / "adapter_config.json").is_file()
    base = AutoModelForCausalLM.from_pretrained(random_model_dir(cfg.model, resolve_source(cfg.model)))
    model = PeftModel.from_pretrained(base, folder)
    assert model.peft_config["default"].r == study.best_trial.params["lora.r"]


def test_a_sweep_in_slots_finishes_its_budget_with_a_run_per_trial(tmp_path: Path) -> None:
    cfg, params = compose.load([*TINY, *SPACE, "train.max_steps=4", "train.eval_every=2", "workers.slots=3",
                                f"output_dir={tmp_path}", "study.n_trials=5"])
    study = run_sweep(cfg, params, show_progress=False)
    finished = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE,
                                                       optuna.trial.TrialState.PRUNED)]
    assert len(finished) == 5
    assert all(t.user_attrs.get("surplus") for t in study.trials if t not in finished)
    runs = child_runs(cfg, study.user_attrs["mlflow_parent_run_id"])
    assert len(runs) == 5 and all(r.info.status in ("FINISHED", "KILLED") for r in runs)
    assert {r.data.tags["trial_number"] for r in runs} == {str(t.number) for t in finished}
    assert all("train_loss" in r.data.metrics for r in runs)
