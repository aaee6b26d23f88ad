"""Every sampler and pruner runs a short study on the tiny random 4-bit model; seeds reproduce samplers.

The base and the data load once for the module; each study calls the QLoRA objective directly
(no MLflow), as ``sweeper launch`` does, with trials of two steps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import optuna
import pytest
from optuna.trial import FixedTrial, TrialState

from objectives.config import ConfigError
from sweeper import compose
from sweeper.config import SamplerConfig
from sweeper.launch import Resources, summary
from sweeper.objective import QLoRAObjective
from sweeper.space import parse_space, sample
from sweeper.study import SAMPLERS, make_pruner, make_sampler
from tests.conftest import TINY

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

# No warmup: with it, the first of these two steps would train at a learning rate of 0 for every trial.
BASE = [*TINY, "search_space=none", "data.max_train_examples=32", "data.max_eval_examples=4", "study/pruner=none",
        "optimizer.warmup_ratio=0"]
# Samplers need only the final evaluation; pruners get one at each of the two steps.
FINAL_EVAL = "train.eval_every=2"
SPACE = ["lora.r=choice(4, 8)", "optimizer.lr=tag(log, interval(1e-4, 1e-1))"]
GRID_SPACE = ["lora.r=choice(4, 8)", "optimizer.lr=range(0.01, 0.02, step=0.01)"]
# A learning rate that lowers the loss within a step, and one that barely moves it: a pruner's target.
GOOD, BAD = {"lora.r": 4, "optimizer.lr": 1e-2}, {"lora.r": 4, "optimizer.lr": 1e-4}


@pytest.fixture(scope="module")
def resources() -> Resources:
    cfg, _ = compose.load(BASE)
    return Resources.load(cfg)


def run_study(resources: Resources, overrides: Sequence[str], n_trials: int = 2,
              enqueue: Sequence[dict[str, Any]] = ()) -> optuna.Study:
    cfg, params = compose.load([*BASE, *overrides])
    study = optuna.create_study(directions=cfg.study.directions, sampler=make_sampler(cfg.study.sampler, params),
                                pruner=make_pruner(cfg.study.pruner, cfg.train))
    for values in enqueue:
        study.enqueue_trial(values)
    objective = QLoRAObjective(cfg, params, resources.base, resources.data, None, show_progress=False)
    study.optimize(objective, n_trials=n_trials)  # no catch: a failing trial fails the test
    return study


# --- samplers --------------------------------------------------------------------------------------

SAMPLER_CASES = {
    "tpe": ["study/sampler=tpe", "study.sampler.n_startup_trials=1"],
    "tpe-independent": ["study/sampler=tpe", "study.sampler.n_startup_trials=1", "study.sampler.multivariate=false",
                        "study.sampler.group=false"],
    "tpe-constant-liar": ["study/sampler=tpe", "study.sampler.n_startup_trials=1", "study.sampler.constant_liar=true"],
    "random": ["study/sampler=random"],
    "cmaes": ["study/sampler=cmaes", "study.sampler.n_startup_trials=1"],
    "gp": ["study/sampler=gp", "study.sampler.n_startup_trials=1"],
    "qmc": ["study/sampler=qmc"],
    "nsga2": ["study/sampler=nsga2", "study.sampler.population_size=2"],
}


@pytest.mark.parametrize("case", sorted(SAMPLER_CASES))
def test_sampler_runs_a_study(resources: Resources, case: str) -> None:
    study = run_study(resources, [*SPACE, *SAMPLER_CASES[case], FINAL_EVAL])
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    for t in study.trials:
        assert t.params["lora.r"] in (4, 8) and 1e-4 <= t.params["optimizer.lr"] <= 1e-1
        assert math.isfinite(t.value) and list(t.intermediate_values) == [2]  # type: ignore[arg-type]


def test_grid_visits_every_point_once_then_stops(resources: Resources) -> None:
    study = run_study(resources, [*GRID_SPACE, "study/sampler=grid", FINAL_EVAL], n_trials=6)
    points = [(t.params["lora.r"], t.params["optimizer.lr"]) for t in study.trials]
    assert sorted(points) == [(r, lr) for r in (4, 8) for lr in (0.01, 0.02)]
    assert all(t.state == TrialState.COMPLETE for t in study.trials)


def test_multi_objective_nsga2_has_a_pareto_front(resources: Resources) -> None:
    objectives = ["study.objectives=[eval_loss,trainable_params]", "study.directions=[minimize,minimize]"]
    study = run_study(resources, [*SPACE, "study/sampler=nsga2", "study.sampler.population_size=2", *objectives,
                                  FINAL_EVAL],
                      n_trials=3, enqueue=[{"lora.r": 4, "optimizer.lr": 1e-3}, {"lora.r": 8, "optimizer.lr": 1e-3}])
    assert all(t.state == TrialState.COMPLETE and len(t.values) == 2 for t in study.trials)
    params_by_r = {t.params["lora.r"]: t.values[1] for t in study.trials}
    assert params_by_r[8] == 2 * params_by_r[4]  # trainable parameters grow with the rank
    front = study.best_trials
    assert front
    assert "pareto front: #" in summary(study)


# --- pruners ---------------------------------------------------------------------------------------

PRUNER_CASES = {
    "median": ["study/pruner=median", "study.pruner.n_startup_trials=1"],
    "percentile": ["study/pruner=percentile", "study.pruner.n_startup_trials=1"],
    "successive_halving": ["study/pruner=successive_halving", "study.pruner.min_resource=1",
                           "study.pruner.reduction_factor=2"],
    "asha": ["study.pruner.name=asha", "study.pruner.min_resource=1", "study.pruner.reduction_factor=2"],
    "hyperband": ["study/pruner=hyperband", "study.pruner.min_resource=1", "study.pruner.reduction_factor=2"],
    "none": ["study/pruner=none"],
}
# Pruners that compare a trial with finished ones at the same step prune the bad rate at step 1.
PRUNES_BAD = {"median", "percentile", "successive_halving", "asha"}


@pytest.mark.parametrize("case", sorted(PRUNER_CASES))
def test_pruner_runs_a_study(resources: Resources, case: str) -> None:
    study = run_study(resources, [*SPACE, "study/sampler=random", *PRUNER_CASES[case]], enqueue=[GOOD, BAD])
    good, bad = study.trials
    assert good.state == TrialState.COMPLETE and sorted(good.intermediate_values) == [1, 2]
    assert good.intermediate_values[1] < bad.intermediate_values[1]
    if case in PRUNES_BAD:
        assert bad.state == TrialState.PRUNED and sorted(bad.intermediate_values) == [1]
    elif case == "none":
        assert bad.state == TrialState.COMPLETE
    else:
        assert bad.state in (TrialState.COMPLETE, TrialState.PRUNED)


def test_successive_halving_rungs_fall_on_evaluations() -> None:
    # Evaluations at steps 4, 8 and 12: the first rung is step 4 (keep a third), the next step 12, the last.
    cfg, _ = compose.load([*BASE, "study/pruner=successive_halving", "train.max_steps=12", "train.eval_every=4"])
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0),
                                pruner=make_pruner(cfg.study.pruner, cfg.train))

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0, 1)
        for step in (4, 8, 12):
            trial.report(x, step)
            if step < 12 and trial.should_prune():
                raise optuna.TrialPruned()
        return x

    study.optimize(objective, n_trials=60)
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert {t.last_step for t in pruned} == {4}
    # One rung at step 4 keeps about a third; Optuna's own "auto" (a rung every few steps from step 1) keeps a ninth.
    assert 0.5 < len(pruned) / len(study.trials) < 0.75


def test_warmup_steps_hold_pruning_back(resources: Resources) -> None:
    # Optuna's warm-up: no pruning before step n_warmup_steps, so the bad rate goes on to step 2.
    study = run_study(resources, [*SPACE, "study/sampler=random", "study/pruner=median", "train.max_steps=3",
                                  "study.pruner.n_startup_trials=1", "study.pruner.n_warmup_steps=2"],
                      enqueue=[GOOD, BAD])
    good, bad = study.trials
    assert good.state == TrialState.COMPLETE
    assert bad.state == TrialState.PRUNED and sorted(bad.intermediate_values) == [1, 2]


@pytest.mark.parametrize("case", sorted(PRUNES_BAD))
def test_a_finished_trial_is_never_pruned(resources: Resources, case: str) -> None:
    # Only the final evaluation: the pruner still hears of it, but the trained trial keeps its result.
    study = run_study(resources, [*SPACE, "study/sampler=random", *PRUNER_CASES[case], FINAL_EVAL],
                      enqueue=[GOOD, BAD])
    good, bad = study.trials
    assert [good.state, bad.state] == [TrialState.COMPLETE] * 2
    assert list(bad.intermediate_values) == [2] and bad.value > good.value  # type: ignore[operator]


# --- search paths end to end: alpha, its ratio, rsLoRA, module lists -------------------------------

def adapted(model: Any) -> dict[str, float]:
    """Short module name -> LoRA scaling of every adapted layer."""
    return {name.rsplit(".", 1)[-1]: m.scaling["default"] for name, m in model.named_modules()
            if isinstance(getattr(m, "scaling", None), dict) and "default" in m.scaling}


def test_absolute_alpha_rslora_and_module_list_reach_the_adapter(resources: Resources) -> None:
    cfg, params = compose.load([*BASE, "lora.r=4", "lora.alpha=choice(2, 16)", "lora.use_rslora=choice(true,false)",
                                "lora.targets=choice('q_proj,v_proj', qk)"])
    objective = QLoRAObjective(cfg, params, resources.base, resources.data, None, show_progress=False)
    trial = FixedTrial({"lora.alpha": 16, "lora.use_rslora": True, "lora.targets": "q_proj,v_proj"})
    trial_cfg, _ = objective.trial_config(trial)
    with resources.base.adapter(trial_cfg.lora, trial_cfg.train.seed) as model:
        scaling = adapted(model)
    assert set(scaling) == {"q_proj", "v_proj"}
    assert all(s == pytest.approx(16 / math.sqrt(4)) for s in scaling.values())  # rsLoRA: alpha / sqrt(r)
    assert math.isfinite(objective(trial))  # type: ignore[arg-type]


def test_alpha_ratio_scales_with_the_rank(resources: Resources) -> None:
    cfg, params = compose.load([*BASE, "lora.targets=qk", "lora.r=choice(4, 8)", "lora.alpha_ratio=choice(0.5, 4)"])
    objective = QLoRAObjective(cfg, params, resources.base, resources.data, None, show_progress=False)
    trial_cfg, _ = objective.trial_config(FixedTrial({"lora.r": 8, "lora.alpha_ratio": 4.0}))
    assert trial_cfg.lora.effective_alpha == 32
    with resources.base.adapter(trial_cfg.lora, trial_cfg.train.seed) as model:
        scaling = adapted(model)
    assert set(scaling) == {"q_proj", "k_proj"}
    assert all(s == pytest.approx(32 / 8) for s in scaling.values())  # plain LoRA: alpha / r


# --- seeds and the sampler checks (no model) -------------------------------------------------------

SEED_SPACE = parse_space({"lora.r": "range(4, 16, step=4)", "optimizer.lr": "range(0.01, 0.05, step=0.01)",
                          "lora.targets": "choice(qk, qkv)"})


def suggestions(name: str, seed: int, n_trials: int = 8) -> list[dict[str, Any]]:
    cfg = SamplerConfig(name=name, seed=seed, n_startup_trials=3, population_size=4)
    study = optuna.create_study(sampler=make_sampler(cfg, SEED_SPACE))

    def objective(trial: optuna.Trial) -> float:
        values = sample(trial, SEED_SPACE)
        return (values["optimizer.lr"] - 0.03) ** 2 + values["lora.r"] / 100 + (values["lora.targets"] == "qk")

    study.optimize(objective, n_trials=n_trials)
    return [t.params for t in study.trials]


@pytest.mark.parametrize("name", SAMPLERS)
def test_same_seed_same_suggestions(name: str) -> None:
    first = suggestions(name, seed=0)
    assert len(first) == 8
    assert suggestions(name, seed=0) == first
    if name in ("tpe", "random", "grid", "qmc"):
        assert suggestions(name, seed=1) != first  # the seed is used, not ignored


def test_grid_rejects_conditional_and_continuous_spaces() -> None:
    with pytest.raises(ConfigError, match=r"study.sampler.name: grid cannot sample conditional parameters \(adamw.lr"):
        compose.load(["study/sampler=grid", "search_space=optimizer"])
    with pytest.raises(ConfigError, match="search_space.lora.dropout: grid sampling needs categorical or stepped"):
        compose.load(["study/sampler=grid", "search_space=none", "lora.dropout=interval(0.0, 0.1)"])
    # Fixing the condition leaves an unconditional, discrete space that a grid can enumerate.
    _, params = compose.load(["study/sampler=grid", "search_space=none", "optimizer.name=sgd",
                              "lora.r=choice(4, 8)", "optimizer.lr=range(0.01, 0.03, step=0.01)"])
    assert len(params) == 2


@pytest.mark.parametrize(("override", "message"), [
    ("study.sampler.group=true", "study.sampler: tpe rejects its settings: ``group`` option can only be enabled"),
    ("study/sampler=nsga2", "study.sampler: nsga2 rejects its settings: `population_size` must be greater"),
    ("study/sampler=qmc", "study.sampler: qmc rejects its settings: The `qmc_type='faure'` is invalid"),
    ("study/pruner=percentile", "study.pruner: percentile rejects its settings: Percentile must be between 0"),
    ("study/pruner=successive_halving", "study.pruner: successive_halving rejects its settings"),
    ("study/pruner=hyperband", "study.pruner.reduction_factor: must be >= 2 for hyperband, got 1"),
])
def test_settings_a_sampler_or_pruner_rejects_are_config_errors(override: str, message: str) -> None:
    bad = {"study.sampler.group=true": ["study.sampler.multivariate=false"],
           "study/sampler=nsga2": ["study.sampler.population_size=1"],
           "study/sampler=qmc": ["study.sampler.qmc_type=faure"],
           "study/pruner=percentile": ["study.pruner.percentile=150"],
           "study/pruner=successive_halving": ["study.pruner.min_resource=0"],
           "study/pruner=hyperband": ["study.pruner.reduction_factor=1"]}[override]
    with pytest.raises(ConfigError) as e:
        compose.load(["search_space=none", "lora.r=choice(4, 8)", override, *bad])
    assert message in str(e.value)
