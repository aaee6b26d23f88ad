"""Every sampler and pruner runs a short study on the tiny random 4-bit model; seeds reproduce samplers; each
takes only its own options.

The base and the data load once for the module; each study calls the QLoRA objective directly
(no MLflow), as ``sweeper launch`` does, with trials of two steps.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import optuna
import pytest
from optuna.trial import FixedTrial, TrialState

from objectives.config import ConfigError
from sweeper import compose
from sweeper.config import to_schema
from sweeper.launch import Resources, summary
from sweeper.objective import QLoRAObjective
from sweeper.pruning import PeerPercentilePruner
from sweeper.samplers import (
    PRUNERS,
    SAMPLERS,
    HyperbandPrunerConfig,
    NopPrunerConfig,
    RandomSamplerConfig,
    SamplerConfig,
    TpeSamplerConfig,
    for_worker,
    make_pruner,
    make_sampler,
    pruner_schema,
    sampler_schema,
)
from sweeper.space import parse_space
from sweeper.values import sample
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
    "asha": ["study/pruner=asha", "study.pruner.min_resource=1", "study.pruner.reduction_factor=2"],
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


def sampler(name: str, **options: Any) -> SamplerConfig:
    """The named sampler's config with those of ``options`` it takes."""
    schema = SAMPLERS[name].schema
    takes = {f.name for f in dataclasses.fields(schema)}
    return schema(name=name, **{k: v for k, v in options.items() if k in takes})


def suggestions(name: str, seed: int, n_trials: int = 8) -> list[dict[str, Any]]:
    study = optuna.create_study(sampler=make_sampler(sampler(name, seed=seed, n_startup_trials=3,
                                                             population_size=4), SEED_SPACE))

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


# --- one schema per sampler and pruner (no model) --------------------------------------------------

SAMPLER_CLASSES = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
                   "grid": optuna.samplers.GridSampler, "cmaes": optuna.samplers.CmaEsSampler,
                   "gp": optuna.samplers.GPSampler, "qmc": optuna.samplers.QMCSampler,
                   "nsga2": optuna.samplers.NSGAIISampler}
PRUNER_CLASSES = {"median": PeerPercentilePruner, "percentile": PeerPercentilePruner,
                  "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
                  "asha": optuna.pruners.SuccessiveHalvingPruner, "hyperband": optuna.pruners.HyperbandPruner,
                  "none": optuna.pruners.NopPruner}


def test_every_registered_name_has_a_tested_class() -> None:
    assert sorted(SAMPLER_CLASSES) == sorted(SAMPLERS) and sorted(PRUNER_CLASSES) == sorted(PRUNERS)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_each_sampler_builds_from_its_name(name: str) -> None:
    cfg = to_schema({"study": {"sampler": {"name": name}}}).study.sampler
    assert type(cfg) is SAMPLERS[name].schema and cfg.name == name
    assert isinstance(make_sampler(cfg, SEED_SPACE), SAMPLER_CLASSES[name])


@pytest.mark.parametrize("name", sorted(PRUNERS))
def test_each_pruner_builds_from_its_name(name: str) -> None:
    cfg = to_schema({"study": {"pruner": {"name": name}}})
    assert type(cfg.study.pruner) is PRUNERS[name].schema and cfg.study.pruner.name == name
    assert isinstance(make_pruner(cfg.study.pruner, cfg.train), PRUNER_CLASSES[name])


@pytest.mark.parametrize(("kind", "options", "message"), [
    ("sampler", {"name": "random", "population_size": 3},
     "study.sampler.population_size: not an option of the random sampler; it takes: seed"),
    ("sampler", {"name": "grid", "n_startup_trials": 3},
     "study.sampler.n_startup_trials: not an option of the grid sampler; it takes: seed"),
    ("sampler", {"name": "tpe", "qmc_type": "sobol"},
     "study.sampler.qmc_type: not an option of the tpe sampler; it takes: seed, n_startup_trials, multivariate, "
     "group, constant_liar"),
    ("sampler", {"name": "cmaes", "constant_liar": True},
     "study.sampler.constant_liar: not an option of the cmaes sampler; it takes: seed, n_startup_trials"),
    ("sampler", {"name": "qmc", "population_size": 4},
     "study.sampler.population_size: not an option of the qmc sampler; it takes: seed, qmc_type"),
    ("sampler", {"name": "nsga2", "multivariate": True},
     "study.sampler.multivariate: not an option of the nsga2 sampler; it takes: seed, population_size"),
    ("sampler", {"seed": 1, "percentile": 3}, "study.sampler.percentile: not an option of the tpe sampler"),
    ("sampler", {"name": "bayes"},
     "study.sampler.name: 'bayes' is not allowed; choose one of tpe, random, grid, cmaes, gp, qmc, nsga2"),
    ("pruner", {"name": "median", "reduction_factor": 2},
     "study.pruner.reduction_factor: not an option of the median pruner; it takes: n_startup_trials, "
     "n_warmup_steps, interval_steps"),
    ("pruner", {"name": "percentile", "min_resource": 1},
     "study.pruner.min_resource: not an option of the percentile pruner; it takes: n_startup_trials, "
     "n_warmup_steps, interval_steps, percentile"),
    ("pruner", {"name": "asha", "percentile": 10.0},
     "study.pruner.percentile: not an option of the asha pruner; it takes: min_resource, reduction_factor"),
    ("pruner", {"name": "hyperband", "n_warmup_steps": 2},
     "study.pruner.n_warmup_steps: not an option of the hyperband pruner; it takes: min_resource, reduction_factor"),
    ("pruner", {"name": "none", "n_startup_trials": 2},
     "study.pruner.n_startup_trials: not an option of the none pruner; it takes no options"),
    ("pruner", {"name": "sometimes"},
     "study.pruner.name: 'sometimes' is not allowed; choose one of median, percentile, successive_halving, asha, "
     "hyperband, none"),
])
def test_an_option_the_chosen_one_does_not_take_is_refused(kind: str, options: dict[str, Any], message: str) -> None:
    schema_of = sampler_schema if kind == "sampler" else pruner_schema
    with pytest.raises(ConfigError) as e:
        schema_of(options)
    assert str(e.value).startswith(message)
    with pytest.raises(ConfigError) as e:
        to_schema({"study": {kind: options}})
    assert str(e.value).startswith(message)


@pytest.mark.parametrize(("overrides", "expected"), [
    (["study/sampler=random", "study.sampler.seed=3"], RandomSamplerConfig(seed=3)),
    (["study.sampler.constant_liar=true"], TpeSamplerConfig(constant_liar=True)),
    (["study/pruner=hyperband", "study.pruner.reduction_factor=2"], HyperbandPrunerConfig(reduction_factor=2)),
    (["study/pruner=none"], NopPrunerConfig()),
])
def test_overrides_reach_the_chosen_schema(overrides: list[str], expected: Any) -> None:
    cfg, _ = compose.load(["search_space=targets", *overrides])
    assert expected in (cfg.study.sampler, cfg.study.pruner)


def test_a_foreign_option_on_the_command_line_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"^study.sampler.population_size: not an option of the random sampler; "
                                          r"it takes: seed$"):
        compose.load(["study/sampler=random", "study.sampler.population_size=3"])


@pytest.mark.parametrize(("cfg", "expected"), [
    (TpeSamplerConfig(seed=5), TpeSamplerConfig(seed=8, constant_liar=True)),
    (TpeSamplerConfig(seed=None), TpeSamplerConfig(seed=None, constant_liar=True)),
    (RandomSamplerConfig(seed=0), RandomSamplerConfig(seed=3)),
])
def test_a_joining_worker_shifts_the_seed_and_lies_where_it_can(cfg: SamplerConfig, expected: SamplerConfig) -> None:
    assert for_worker(cfg, 3) == expected


def test_a_config_of_another_sampler_is_refused() -> None:
    with pytest.raises(ConfigError, match="a TpeSamplerConfig does not configure the random sampler"):
        make_sampler(TpeSamplerConfig(name="random"), SEED_SPACE)
