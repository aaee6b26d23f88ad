"""The real path: SmolLM2-135M-Instruct in 4-bit NF4, a 2-trial sweep, MLflow, export, train."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from sweeper import compose
from sweeper.study import storage_for
from tests.conftest import run_cli

pytestmark = pytest.mark.slow

SHORT = ["train.max_steps=3", "train.eval_every=3", "train.micro_batch_size=2", "data.max_length=96",
         "data.max_eval_examples=12", "study.n_trials=2", "lora.r=choice(4, 8)", "lora.targets=choice(qk, all-linear)"]


def test_real_model_sweep_export_train(tmp_path: Path) -> None:
    out = f"output_dir={tmp_path}"
    launched = run_cli("launch", "search_space=none", *SHORT, out, "--no-progress")
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert "best trial: #" in launched.stdout

    # The store the launch made (a journal file where a GPU's launch ran its engines as workers), as export finds it.
    url = compose.load([f"output_dir={tmp_path}"])[0].storage_url
    study = optuna.load_study(study_name="qlora-default", storage=storage_for(url))
    assert len(study.trials) == 2
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("qlora-default").experiment_id])
    parents = [r for r in runs if r.data.tags.get("kind") == "study"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == 2
    assert all(r.info.status == "FINISHED" for r in children)

    # Real 4-bit layers: the run's resolved config says so, and the loss is that of a trained LM.
    assert 0.5 < study.best_value < 5.0
    best = tmp_path / "best.yaml"
    exported = run_cli("export", out, "--out", str(best))
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert yaml.safe_load(best.read_text())["model"]["quant_type"] == "nf4"

    trained = run_cli("train", "--config", str(best), "--no-progress")
    assert trained.returncode == 0, trained.stderr[-3000:]
    value = float(trained.stdout.split("eval_loss ")[1].split()[0])
    assert value == pytest.approx(study.best_value, abs=1e-4)
