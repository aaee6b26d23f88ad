"""Sweeps on the tiny random 4-bit model: budget, resume, failure policy, export -> train."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from sweeper import compose
from sweeper.launch import run_single, run_sweep
from sweeper.tracking import REDACTED
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
    assert "no_such_proj is not a linear module" in failed.user_attrs["state_reason"]
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


@pytest.mark.parametrize(("slots", "budget", "own_process", "engines"),
                         [(3, 5, False, 1), (4, 2, False, 1), (3, 4, True, 1), (2, 5, "auto", 2)])
def test_a_sweep_in_slots_finishes_its_budget_with_a_run_per_trial(tmp_path: Path, slots: int, budget: int,
                                                                  own_process: Any, engines: int) -> None:
    cfg, params = compose.load([*TINY, *SPACE, "train.max_steps=4", "train.eval_every=2", f"workers.slots={slots}",
                                f"workers.engine_process={own_process}", f"workers.engines={engines}",
                                f"output_dir={tmp_path}", f"study.n_trials={budget}"])
    study = run_sweep(cfg, params, show_progress=False)
    finished = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE,
                                                       optuna.trial.TrialState.PRUNED)]
    assert len(finished) == budget
    assert len(study.trials) == budget  # no thread asked a trial the budget had no room for
    runs = child_runs(cfg, study.user_attrs["mlflow_parent_run_id"])
    assert len(runs) == budget and all(r.info.status in ("FINISHED", "KILLED") for r in runs)
    assert {r.data.tags["trial_number"] for r in runs} == {str(t.number) for t in finished}
    assert all("train_loss" in r.data.metrics for r in runs)
    if any(t.state == optuna.trial.TrialState.COMPLETE for t in finished):  # the best's adapter, wherever it trained
        from urllib.parse import urlparse

        folder = Path(urlparse(study.best_trial.user_attrs["adapter_uri"]).path)
        assert json.loads((folder / "adapter_config.json").read_text())["r"] == study.best_trial.params["lora.r"]
        assert (folder / "adapter_model.safetensors").stat().st_size > 0


# --- train --config: a reproduction of the exported trial ----------------------------------------------

def test_train_logs_a_reproduction_of_the_exported_trial(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sweeper.cli import main
    from sweeper.export import exported_config, write_export

    cfg, params = compose.load([*TINY, *SPACE, f"output_dir={tmp_path}", "study.n_trials=2"])
    study = run_sweep(cfg, params, show_progress=False)
    best = study.best_trial
    out = write_export(exported_config(cfg, study, best), tmp_path / "best.yaml")
    capsys.readouterr()
    assert main(["train", "--config", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out

    client = MlflowClient(cfg.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.experiment_name)
    runs = client.search_runs([experiment.experiment_id])
    (run,) = [r for r in runs if r.data.tags.get("kind") == "reproduction"]
    tags = run.data.tags
    assert run.info.run_name == f"reproduce trial-{best.number}"
    assert "mlflow.parentRunId" not in tags and "trial_number" not in tags  # not one of the study's trials
    assert tags["reproduces.study"] == study.study_name
    assert tags["reproduces.trial_number"] == str(best.number)
    assert tags["reproduces.run_id"] == best.user_attrs["mlflow_run_id"]
    assert tags["reproduces.parent_run_id"] == study.user_attrs["mlflow_parent_run_id"]
    assert tags["reproduction"] == "matches to 1e-4"
    assert f"trial {best.number} of study `{study.study_name}`" in tags["mlflow.note.content"]
    assert not [r for r in runs if r.info.run_name == "trial-0" and "mlflow.parentRunId" not in r.data.tags]

    lines = printed.splitlines()
    assert f"eval_loss {best.value:.4f} (exported trial {best.number}: {best.value:.4f}, matches to 1e-4)" in lines
    assert f"MLflow run {run.info.run_id} ('reproduce trial-{best.number}') in experiment " \
           f"'{cfg.experiment_name}' (id {experiment.experiment_id})" in lines
    assert f"reproduces trial {best.number} of study '{study.study_name}': run {best.user_attrs['mlflow_run_id']}" \
           in lines
    assert (f"open it: python -m sweeper ui --config {out}   then browse to <the URL it prints>/"
            f"#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}") in lines


def test_a_config_without_provenance_trains_as_a_plain_run(tmp_path: Path) -> None:
    from sweeper.launch import SingleRun

    cfg, _ = compose.load([*TINY, f"output_dir={tmp_path}"])
    run = SingleRun()
    run.identify(cfg)
    assert (run.name, run.tags) == ("train", {"kind": "train"})
    run.experiment_id, run.run_id = "3", "abc"
    assert run.where(cfg, "python -m sweeper ui")[-1] == \
        "open it: python -m sweeper ui   then browse to <the URL it prints>/#/experiments/3/runs/abc"
    cfg, _ = compose.load([*TINY, "tracking.uri=http://user:pw@mlflow.internal:5000/"])
    assert run.where(cfg, "")[-1] == f"open it: http://user:{REDACTED}@mlflow.internal:5000/#/experiments/3/runs/abc"


def test_reproduced_values_beside_the_exported_ones() -> None:
    from sweeper.config import Provenance
    from sweeper.export import reproduction_verdict, value_lines

    source = Provenance(study="s", trial_number=6, values=[2.76991, 1234.0])
    assert value_lines(["eval_loss"], [2.76993], None) == ["eval_loss 2.7699"]
    assert value_lines(["eval_loss", "trainable_params"], [2.76993, 1234.0], source) == [
        "eval_loss 2.7699 (exported trial 6: 2.7699, matches to 1e-4)",
        "trainable_params 1234 (exported trial 6: 1234, matches to 1e-4)"]
    assert value_lines(["eval_loss"], [2.7810], source) == [
        "eval_loss 2.7810 (exported trial 6: 2.7699, differs by +0.01109)"]
    assert reproduction_verdict(["eval_loss"], [2.76993], [2.76991]) == "matches to 1e-4"
    assert reproduction_verdict(["eval_loss", "trainable_params"], [2.7810, 1234.0], [2.76991, 1234.0]) == \
        "differs: eval_loss by +0.01109"


# --- saved adapters ----------------------------------------------------------------------------------

def test_log_adapter_best_leaves_only_the_best_adapter(tmp_path: Path) -> None:
    import json
    from urllib.parse import urlparse

    from sweeper.export import exported_config

    # A grid walked so that a later trial beats an earlier one: the best changes during the sweep.
    cfg, params = compose.load([*TINY, "search_space=none", "optimizer.lr=choice(1e-2,1e-3,1e-5)",
                                "study/sampler=grid", "study/pruner=none", "study.n_trials=3",
                                "tracking.log_adapter=best", f"output_dir={tmp_path}"])
    study = run_sweep(cfg, params, show_progress=False)
    best = study.best_trial
    saved = [t for t in study.trials if "adapter_uri" in t.user_attrs]
    assert len(saved) >= 2 and saved[-1].number == best.number, [(t.number, t.value) for t in study.trials]

    client = MlflowClient(cfg.tracking_uri)
    with_adapter = [t.number for t in study.trials if client.list_artifacts(t.user_attrs["mlflow_run_id"], "adapter")]
    assert with_adapter == [best.number]
    for t in saved:
        tags = client.get_run(t.user_attrs["mlflow_run_id"]).data.tags
        if t.number == best.number:
            assert tags["adapter_uri"] == t.user_attrs["adapter_uri"] and "adapter_removed" not in tags
        else:
            assert "adapter_uri" not in tags and tags["adapter_removed"].startswith("superseded by trial ")
            assert exported_config(cfg, study, t)["provenance"]["adapter_uri"] is None
    assert exported_config(cfg, study, best)["provenance"]["adapter_uri"] == best.user_attrs["adapter_uri"]

    # The adapter names the model as configured, not the machine-local directory its weights were loaded from.
    folder = Path(urlparse(best.user_attrs["adapter_uri"]).path)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == cfg.model.source


def test_a_slot_adapter_names_the_configured_source(tmp_path: Path) -> None:
    import json

    import torch

    from objectives.config import LoraConfig
    from objectives.slots import SlotAdapter, SlotDraws, initialise_slot, inject_slots
    from objectives.transfer import Staging

    model = torch.nn.Sequential()
    model.add_module("q_proj", torch.nn.Linear(8, 8))
    _, wrapped = inject_slots(model, ["q_proj"], slots=2, r_max=4, device=torch.device("cpu"), max_length=16)
    lora = LoraConfig(r=2, targets="q_proj")
    initialise_slot(wrapped, 1, lora, SlotDraws.draw({"q_proj": 8}, lora, seed=0), Staging())
    SlotAdapter(wrapped, 1, lora, ["q_proj"], "hub-org/some-model").save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "hub-org/some-model"


def test_adapter_keeper_prefers_the_best_value_then_the_earliest_trial() -> None:
    from sweeper.export import adapter_keeper

    minimize, maximize = optuna.study.StudyDirection.MINIMIZE, optuna.study.StudyDirection.MAXIMIZE
    assert adapter_keeper([(0, 3.0), (1, 2.0), (2, 2.5)], minimize) == 1
    assert adapter_keeper([(0, 3.0), (1, 2.0), (2, 2.5)], maximize) == 0
    assert adapter_keeper([(4, 2.0), (1, 2.0)], minimize) == 1
    assert adapter_keeper([(0, None)], minimize) is None
    assert adapter_keeper([], minimize) is None


def test_a_sweep_in_which_every_trial_failed_exits_1_with_the_reasons(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from sweeper import cli, objective

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the device went away")

    monkeypatch.setattr(objective, "run_recipe", broken)
    code = cli.main(["launch", *TINY, "search_space=none", "study.n_trials=2", f"output_dir={tmp_path}",
                     "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1, err[-3000:]
    assert "every trial failed (2); the reasons:" in err and "2 x RuntimeError: the device went away" in err
