"""MLflow tracking of a real tiny sweep: one parent run, a child run per trial, states, artifacts, secrets.

The module shares one sweep (about 30 s on 2 CPU cores): a grid over two target choices and two
learning rates, so that every trial state appears whatever the order the grid is walked in:
``bogus_proj`` matches no module of the model (the trial fails), a learning rate of 1e30 makes the
loss NaN after the first step (the trial is pruned), and qkvo with 1e-4 completes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from sweeper import compose
from sweeper.config import SweepConfig, to_container
from sweeper.launch import run_sweep
from sweeper.tracking import REDACTED, Tracker, redact
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parent.parent
SWEEP_ENTRIES = {"lora.targets": "choice(qkvo,bogus_proj)", "optimizer.lr": "choice(1e-4,1e30)"}
STEP_METRICS = ("train_loss", "learning_rate", "grad_norm", "tokens_per_s", "peak_memory_mb")
RUN_STATUS = {optuna.trial.TrialState.COMPLETE: "FINISHED", optuna.trial.TrialState.PRUNED: "KILLED",
              optuna.trial.TrialState.FAIL: "FAILED"}


@dataclass
class Sweep:
    cfg: SweepConfig
    study: optuna.Study
    client: MlflowClient
    parent: Run
    children: dict[int, Run]
    """Child runs by trial number."""

    def trials(self, state: optuna.trial.TrialState) -> list[optuna.trial.FrozenTrial]:
        return self.study.get_trials(deepcopy=False, states=(state,))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Sweep:
    from sweeper import compose
    from sweeper.launch import run_sweep

    out = tmp_path_factory.mktemp("sweep")
    # Failed trials do not count towards the budget: the grid stops the study once all 4 points ran.
    cfg, params = compose.load([
        *TINY, f"output_dir={out}", f"study.storage=sqlite:///{out / 'study.db'}", "study.n_trials=4",
        "study/sampler=grid", "search_space=none", *(f"{path}={grammar}" for path, grammar in SWEEP_ENTRIES.items())])
    study = run_sweep(cfg, params, show_progress=False)
    client = MlflowClient(cfg.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.experiment_name)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    children = {int(r.data.tags["trial_number"]): r for r in runs if r is not parents[0]}
    return Sweep(cfg, study, client, parents[0], children)


def test_every_trial_state_is_present(sweep: Sweep) -> None:
    states = sorted(t.state.name for t in sweep.study.trials)
    assert states == ["COMPLETE", "FAIL", "FAIL", "PRUNED"]


def test_one_parent_run_with_a_child_run_per_trial(sweep: Sweep) -> None:
    parent = sweep.parent
    assert parent.info.run_name == sweep.cfg.study.name == "qlora-default"
    assert parent.data.tags["kind"] == "study"
    assert sweep.study.user_attrs["mlflow_parent_run_id"] == parent.info.run_id
    assert sorted(sweep.children) == [t.number for t in sweep.study.trials]
    for trial in sweep.study.trials:
        child = sweep.children[trial.number]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.run_name == f"trial-{trial.number}"
        assert trial.user_attrs["mlflow_run_id"] == child.info.run_id


def test_child_runs_carry_sampled_and_fixed_params(sweep: Sweep) -> None:
    for trial in sweep.study.trials:
        params = sweep.children[trial.number].data.params
        for name, value in trial.params.items():  # no conditions here: Optuna names are the config paths
            assert params[name] == str(value)
        assert params["config.lora.targets"] == str(trial.params["lora.targets"])
        assert params["config.model.quant_type"] == "nf4"
        assert params["config.train.max_steps"] == "2"


def test_child_runs_have_their_config_as_an_artifact(sweep: Sweep, tmp_path: Path) -> None:
    for trial in sweep.study.trials:
        run_id = sweep.children[trial.number].info.run_id
        local = sweep.client.download_artifacts(run_id, "config.yaml", str(tmp_path))
        config = yaml.safe_load(Path(local).read_text())
        assert set(config) == {"model", "data", "lora", "optimizer", "train"}
        assert config["lora"]["targets"] == trial.params["lora.targets"]
        assert config["optimizer"]["lr"] == pytest.approx(trial.params["optimizer.lr"])


def test_trained_trials_log_step_metrics(sweep: Sweep) -> None:
    (complete,) = sweep.trials(optuna.trial.TrialState.COMPLETE)
    (pruned,) = sweep.trials(optuna.trial.TrialState.PRUNED)
    run_id = sweep.children[complete.number].info.run_id
    for name in (*STEP_METRICS, "eval_loss"):
        steps = [m.step for m in sweep.client.get_metric_history(run_id, name)]
        assert steps == [1, 2], name
    eval_loss = sweep.client.get_metric_history(run_id, "eval_loss")[-1].value
    assert eval_loss == pytest.approx(complete.value)
    assert sweep.children[complete.number].data.metrics["predicted_peak_memory_mb"] > 0  # beside the measured
    # The pruned trial stopped at its first evaluation, which logged the NaN that pruned it.
    metrics = sweep.children[pruned.number].data.metrics
    assert set(STEP_METRICS) | {"eval_loss"} <= set(metrics)
    assert metrics["eval_loss"] != metrics["eval_loss"]


def test_run_status_follows_the_trial_state(sweep: Sweep) -> None:
    for trial in sweep.study.trials:
        child = sweep.children[trial.number]
        assert child.info.status == RUN_STATUS[trial.state], trial.number
        assert child.data.tags["trial_state"] == {"COMPLETE": "complete", "PRUNED": "pruned",
                                                  "FAIL": "failed"}[trial.state.name]
        if trial.state != optuna.trial.TrialState.COMPLETE:
            assert child.data.tags["state_reason"] == trial.user_attrs["state_reason"] != ""
    (failed, _) = sweep.trials(optuna.trial.TrialState.FAIL)
    assert "bogus_proj" in failed.user_attrs["state_reason"]
    (pruned,) = sweep.trials(optuna.trial.TrialState.PRUNED)
    assert "non-finite" in pruned.user_attrs["state_reason"]


def test_failed_trials_log_no_metrics(sweep: Sweep) -> None:
    for trial in sweep.trials(optuna.trial.TrialState.FAIL):
        assert sweep.children[trial.number].data.metrics == {}


def test_parent_run_has_plots_search_space_and_best_trial(sweep: Sweep, tmp_path: Path) -> None:
    run_id = sweep.parent.info.run_id
    plots = {Path(a.path).name for a in sweep.client.list_artifacts(run_id, "plots")}
    # One self-contained page for every interactive plot (the UI's preview cannot load files next to it).
    assert {"optimization_history.png", "study_plots.html"} <= plots
    assert [p for p in plots if not p.endswith(".png")] == ["study_plots.html"]
    page = Path(sweep.client.download_artifacts(run_id, "plots/study_plots.html", str(tmp_path))).read_text()
    assert page.count("* plotly.js v") == 1  # the library's banner: inlined once, not once per figure
    assert not re.search(r"<script[^>]*\bsrc=", page)
    assert 'id="plot-optimization_history"' in page
    local = sweep.client.download_artifacts(run_id, "search_space.yaml", str(tmp_path))
    assert yaml.safe_load(Path(local).read_text()) == SWEEP_ENTRIES
    best = sweep.study.best_trial
    tags = sweep.parent.data.tags
    assert tags["best_trial"] == str(best.number)
    assert float(tags["best_value"]) == pytest.approx(best.value, abs=1e-6)
    assert (tags["trials_complete"], tags["trials_pruned"], tags["trials_fail"]) == ("1", "1", "2")
    assert sweep.parent.data.params["storage"] == sweep.cfg.storage_url
    assert sweep.parent.data.params["sampler"] == "grid"


# --- secrets -------------------------------------------------------------------------------------

PG_URL = "postgresql://sweeper:s3cret-pw@db.internal:5432/optuna"


@pytest.mark.parametrize(("value", "expected"), [
    (PG_URL, f"postgresql://sweeper:{REDACTED}@db.internal:5432/optuna"),
    ("postgresql+psycopg2://u:p%40ss@h/db", f"postgresql+psycopg2://u:{REDACTED}@h/db"),
    ("http://user:tok@127.0.0.1:5000", f"http://user:{REDACTED}@127.0.0.1:5000"),
    ("mysql://user@host/db", "mysql://user@host/db"),   # no password: unchanged
    ("sqlite:////tmp/optuna.db", "sqlite:////tmp/optuna.db"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
])
def test_redact_urls(value: str, expected: str) -> None:
    assert redact(value) == expected


@pytest.mark.parametrize("value", [
    "redis://:s3cret-pw@host:6379",                    # password without a user name
    "postgresql://db/optuna?user=u&password=s3cret-pw",  # libpq keyword in the query string
    "postgresql://u:pa@ss-s3cret@host/db",             # an unescaped @ in the password
])
def test_redact_other_url_forms(value: str) -> None:
    assert "s3cret" not in str(redact(value))


def test_redact_secret_keys_at_any_depth() -> None:
    config = {"hf_token": "hf_abcdef", "HF_TOKEN": "hf_abcdef", "wandb_api_key": "k-123",
              "study": {"storage": PG_URL, "name": "s", "password": "pw"}, "data": {"source": "stdlib"},
              "nothing": {"secret": None}}
    assert redact(config) == {
        "hf_token": REDACTED, "HF_TOKEN": REDACTED, "wandb_api_key": REDACTED,
        "study": {"storage": f"postgresql://sweeper:{REDACTED}@db.internal:5432/optuna", "name": "s",
                  "password": REDACTED},
        "data": {"source": "stdlib"}, "nothing": {"secret": None}}


def test_secrets_never_reach_the_mlflow_store(tmp_path: Path) -> None:
    """Params, tags and dict artifacts written through a real Tracker come back without the password."""
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "secrets", tmp_path / "artifacts")
    run_id = tracker.start_run("run", params={"storage": PG_URL, "hf_token": "hf_abcdef",
                                              "config": {"study": {"storage": PG_URL}}})
    tracker.log_dict(run_id, {"study": {"storage": PG_URL}, "hf_token": "hf_abcdef"}, "sweep_config.yaml")
    tracker.end_run(run_id)
    run = tracker.client.get_run(run_id)
    assert run.data.params["storage"] == run.data.params["config.study.storage"] == redact(PG_URL)
    assert run.data.params["hf_token"] == REDACTED
    local = tracker.client.download_artifacts(run_id, "sweep_config.yaml", str(tmp_path / "dl"))
    text = Path(local).read_text()
    assert "s3cret-pw" not in text and "hf_abcdef" not in text
    assert yaml.safe_load(text)["study"]["storage"] == redact(PG_URL)


def test_the_parent_run_ends_children_left_running_by_a_dead_worker(tmp_path: Path) -> None:
    """A worker killed between creating a trial's run and linking it to the trial leaves a run no dead-trial
    handler can find: ending the parent ends it; a running trial's run, or one of a trial this view of the study
    does not know yet, is left alone."""
    from sweeper.tracking import STRAY_REASON, end_stray_children

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "strays", tmp_path / "artifacts")
    study = optuna.create_study()
    dead, live = study.ask(), study.ask()
    study.tell(dead, state=optuna.trial.TrialState.FAIL)
    parent = tracker.start_run("study")
    runs = {t.number: tracker.start_run(f"trial-{t.number}", parent_id=parent,
                                        tags={"trial_number": str(t.number)}) for t in (dead, live)}
    runs[7] = tracker.start_run("trial-7", parent_id=parent, tags={"trial_number": "7"})
    end_stray_children(tracker, parent, study)
    stray = tracker.client.get_run(runs[dead.number])
    assert stray.info.status == "KILLED" and stray.data.tags["state_reason"] == STRAY_REASON
    assert [tracker.client.get_run(runs[n]).info.status for n in (live.number, 7)] == ["RUNNING", "RUNNING"]


def test_study_config_with_a_database_password_is_stored_redacted(tmp_path: Path) -> None:
    """What open_study keeps on the study and launch logs as sweep_config.yaml: no password."""
    from sweeper import compose

    cfg, _ = compose.load([f"output_dir={tmp_path}", f"study.storage={PG_URL}"])
    assert cfg.storage_url == PG_URL
    stored = redact(to_container(cfg))
    assert stored["study"]["storage"] == redact(PG_URL)
    assert "s3cret-pw" not in yaml.safe_dump(stored)


def test_the_sweep_store_holds_no_secret_looking_values(sweep: Sweep) -> None:
    for run in (sweep.parent, *sweep.children.values()):
        for key, value in {**run.data.params, **run.data.tags}.items():
            assert redact(value, key) == value, key


# --- bad input through the command line -----------------------------------------------------------

def sweeper_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LOGLEVEL": "INFO"}
    return subprocess.run([sys.executable, "-m", "sweeper", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def files_under(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in path.rglob("*")} if path.exists() else {}


def test_unreachable_tracking_server_is_a_config_error(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = sweeper_cli("launch", "model=tiny_random", f"output_dir={out}", "tracking.uri=http://127.0.0.1:9",
                       "--no-progress", cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "error: tracking.uri: cannot reach MLflow at 'http://127.0.0.1:9'" in done.stderr
    assert "Traceback" not in done.stderr
    # It stopped before the model or the data were loaded, and before the study was created.
    assert "base and data ready" not in done.stderr + done.stdout
    assert not out.exists()


def test_export_from_a_missing_store(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    done = sweeper_cli("export", f"output_dir={missing}", cwd=tmp_path)
    assert done.returncode == 2
    assert f"error: study.storage: no study store at {missing / 'optuna.db'}" in done.stderr
    assert not missing.exists() and not (tmp_path / "exports").exists()


def test_export_of_an_unknown_study_lists_the_existing_ones(sweep: Sweep, tmp_path: Path) -> None:
    before = files_under(sweep.cfg.output_path)
    done = sweeper_cli("export", f"output_dir={sweep.cfg.output_dir}", f"study.storage={sweep.cfg.storage_url}",
                       "study.name=no-such-study", cwd=tmp_path)
    assert done.returncode == 2
    assert "error: study.name: no study 'no-such-study'" in done.stderr
    assert "it holds: qlora-default" in done.stderr
    assert files_under(sweep.cfg.output_path) == before and not (tmp_path / "exports").exists()


def test_export_of_an_unknown_or_unfinished_trial(sweep: Sweep, tmp_path: Path) -> None:
    before = files_under(sweep.cfg.output_path)
    common = (f"output_dir={sweep.cfg.output_dir}", f"study.storage={sweep.cfg.storage_url}")
    done = sweeper_cli("export", *common, "--trial", "99", cwd=tmp_path)
    assert done.returncode == 2
    assert "error: --trial: study 'qlora-default' has no trial 99; trials: 0..3" in done.stderr
    (pruned,) = sweep.trials(optuna.trial.TrialState.PRUNED)
    (complete,) = sweep.trials(optuna.trial.TrialState.COMPLETE)
    done = sweeper_cli("export", *common, "--trial", str(pruned.number), cwd=tmp_path)
    assert done.returncode == 2
    assert (f"error: --trial: trial {pruned.number} is pruned; completed trials: {complete.number}"
            in done.stderr)
    assert files_under(sweep.cfg.output_path) == before and not (tmp_path / "exports").exists()


def test_a_tracking_server_over_http(tmp_path: Path) -> None:
    """The same sweep against an MLflow server reached over HTTP instead of a local store."""
    from sweeper.ui import start_ui, stop_ui

    server_store = tmp_path / "server"
    server_store.mkdir()
    proc, url = start_ui(f"sqlite:///{server_store / 'mlflow.db'}", (server_store / "artifacts").as_uri())
    try:
        cfg, params = compose.load([*TINY, "search_space=none", "lora.r=choice(2,4)", "study.n_trials=2",
                                    f"tracking.uri={url}", f"output_dir={tmp_path / 'local'}"])
        study = run_sweep(cfg, params, show_progress=False)
        client = MlflowClient(url)
        runs = client.search_runs([client.get_experiment_by_name("qlora-default").experiment_id])
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
        assert sorted(r.info.run_id for r in children) == sorted(t.user_attrs["mlflow_run_id"] for t in study.trials)
        assert not (tmp_path / "local" / "mlflow.db").exists()  # nothing went to the local default store
    finally:
        stop_ui(proc)


def test_ordinary_keys_that_mention_tokens_are_kept() -> None:
    config = {"model": {"config_overrides": {"bos_token_id": 1, "eos_token_id": 0}}, "tokenizer": "x",
              "num_tokens": 5, "hf_token": "hf_x", "db": {"password": 0}}
    assert redact(config) == {"model": {"config_overrides": {"bos_token_id": 1, "eos_token_id": 0}},
                              "tokenizer": "x", "num_tokens": 5, "hf_token": REDACTED, "db": {"password": REDACTED}}


def test_pruned_and_failed_runs_say_which_in_their_description(sweep: Sweep) -> None:
    for trial in sweep.study.trials:
        tags = sweep.children[trial.number].data.tags
        note = tags.get("mlflow.note.content")
        if trial.state == optuna.trial.TrialState.COMPLETE:
            assert note is None
            continue
        assert trial.user_attrs["state_reason"] in note
        if trial.state == optuna.trial.TrialState.PRUNED:  # at the evaluation that logged a NaN
            run_id = sweep.children[trial.number].info.run_id
            step = sweep.client.get_metric_history(run_id, "eval_loss")[-1].step
            assert note.startswith(f"**Pruned** at step {step} of 2 (stopped early on purpose, not a failure): ")
        else:  # no module matches its targets: it never trained
            assert note.startswith("**Failed** before training: ")


def test_an_evaluation_writes_metrics_only_when_stale_and_the_end_writes_the_rest_with_its_tags(tmp_path: Path) -> None:
    """A run's metrics wait in the buffer until the oldest is stale; ending the run writes them with its tags."""
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "stale", tmp_path / "artifacts")
    run_id = tracker.start_run("trial-0")
    uri = tracker.artifact_uri(run_id, "adapter")
    tracker.log_metrics(run_id, 1, {"eval_loss": 2.5})
    tracker.flush(run_id, stale_after=3600.0)  # logged a moment ago
    assert "eval_loss" not in tracker.client.get_run(run_id).data.metrics
    tracker.flush(run_id, stale_after=1e-9)
    assert tracker.client.get_run(run_id).data.metrics["eval_loss"] == 2.5
    for step in (2, 3):
        tracker.log_metrics(run_id, step, {"train_loss": float(step)})
        tracker.flush(run_id, stale_after=3600.0)
    tracker.end_run(run_id, "KILLED", tags={"trial_state": "pruned"})
    run = tracker.client.get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags["trial_state"] == "pruned"
    assert [m.value for m in tracker.client.get_metric_history(run_id, "train_loss")] == [2.0, 3.0]
    assert uri == f"{run.info.artifact_uri}/adapter"
