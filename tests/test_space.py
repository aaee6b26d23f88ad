"""The search space: grammar and mappings to Optuna distributions, conditions, overrides, bad input.

The translation is pure and table-tested; the grammar table is the one Hydra's Optuna sweeper plugin
tests itself with, so its configs mean the same here. Bad input is also checked through the command
line, which must exit 2 before any model loads and write nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import FixedTrial

from objectives.config import ConfigError
from sweeper import compose
from sweeper.config import CONF_DIR
from sweeper.grammar import as_mapping, distribution_from_grammar, distribution_from_mapping
from sweeper.overrides import fix_params, merge_sweeps, split_fixed, split_overrides
from sweeper.space import Param, parse_space
from sweeper.values import apply_values, grid_values, sample, volume
from tests.conftest import SECRET, run_cli

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

DEFAULT_SPACE: dict[str, Any] = yaml.safe_load((CONF_DIR / "search_space" / "default.yaml").read_text())


def same(expected: BaseDistribution, actual: BaseDistribution) -> bool:
    # shuffle() orders a categorical's choices at random, so those compare as sets.
    if isinstance(expected, CategoricalDistribution) and isinstance(actual, CategoricalDistribution):
        return set(expected.choices) == set(actual.choices) and len(expected.choices) == len(actual.choices)
    return expected == actual


# --- grammar: the examples Hydra's Optuna sweeper plugin documents and tests ---------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("choice(1,2)", CategoricalDistribution([1, 2])),
    ("choice(true, false)", CategoricalDistribution([True, False])),
    ("choice('hello', 'world')", CategoricalDistribution(["hello", "world"])),
    ("shuffle(range(1,3))", CategoricalDistribution((1, 2))),
    ("range(1,3)", IntDistribution(1, 3)),
    ("interval(1, 5)", FloatDistribution(1, 5)),
    ("int(interval(1, 5))", IntDistribution(1, 5)),
    ("tag(log, interval(1, 5))", FloatDistribution(1, 5, log=True)),
    ("tag(log, int(interval(1, 5)))", IntDistribution(1, 5, log=True)),
    ("range(0.5, 5.5, step=1)", FloatDistribution(0.5, 5.5, step=1)),
    # Beyond the plugin's table: forms the shipped spaces use.
    ("int(tag(log, interval(4, 64)))", IntDistribution(4, 64, log=True)),
    ("range(4, 64, step=4)", IntDistribution(4, 64, step=4)),
    ("range(0.0, 0.1, step=0.05)", FloatDistribution(0.0, 0.1, step=0.05)),
    # As in the plugin, a step that misses stop ends at the last step below it (Optuna trims high so).
    ("range(1,10,step=2)", IntDistribution(1, 9, step=2)),
    ("range(start=1, stop=10, step=2)", IntDistribution(1, 9, step=2)),
    ("range(4, 64, step=7)", IntDistribution(4, 60, step=7)),
    ("range(0.0, 0.1, step=0.03)", FloatDistribution(0.0, 0.09, step=0.03)),
    ("range(0.0, 0.3, step=0.1)", FloatDistribution(0.0, 0.3, step=0.1)),
    ("choice(qk, qkv, 'q_proj,v_proj')", CategoricalDistribution(["qk", "qkv", "q_proj,v_proj"])),
    ("qk,qkv", CategoricalDistribution(["qk", "qkv"])),  # Hydra's short form of choice
])
def test_grammar_gives_the_plugins_distribution(text: str, expected: BaseDistribution) -> None:
    actual = distribution_from_grammar("key", text)
    assert type(actual) is type(expected)
    assert same(expected, actual), actual


@pytest.mark.parametrize(("spec", "expected"), [
    ({"type": "int", "low": 4, "high": 64}, IntDistribution(4, 64)),
    ({"type": "int", "low": 4, "high": 64, "step": 4}, IntDistribution(4, 64, step=4)),
    ({"type": "int", "low": 4, "high": 64, "log": True}, IntDistribution(4, 64, log=True)),
    ({"type": "int", "low": 4, "high": 64, "log": True, "step": 1}, IntDistribution(4, 64, log=True)),
    ({"type": "float", "low": 1e-5, "high": 1e-3, "log": True}, FloatDistribution(1e-5, 1e-3, log=True)),
    ({"type": "float", "low": 0.0, "high": 0.2, "step": 0.05}, FloatDistribution(0.0, 0.2, step=0.05)),
    ({"type": "float", "low": 0, "high": 1}, FloatDistribution(0.0, 1.0)),
    ({"type": "categorical", "choices": ["qk", "qkvo"]}, CategoricalDistribution(["qk", "qkvo"])),
    ({"choices": [True, False]}, CategoricalDistribution([True, False])),  # type inferred from choices
    ({"path": "optimizer.lr", "type": "float", "low": 0.1, "high": 1, "when": {"optimizer.name": "sgd"}},
     FloatDistribution(0.1, 1.0)),
])
def test_mapping_gives_distribution(spec: dict[str, Any], expected: BaseDistribution) -> None:
    assert distribution_from_mapping("key", spec) == expected


@pytest.mark.parametrize("text", ["choice(4, 8)", "tag(log, interval(1e-5, 1e-3))", "range(0.0, 0.2, step=0.05)",
                                  "int(tag(log, interval(4, 64)))", "range(2, 10, step=2)"])
def test_mapping_form_round_trips(text: str) -> None:
    d = distribution_from_grammar("key", text)
    assert distribution_from_mapping("key", as_mapping(d)) == d


# --- bad entries: each names the entry, the problem and what is allowed ---------------------------

@pytest.mark.parametrize(("value", "message"), [
    ("int(interval(64, 4))", "search_space.key: low (64) must be < high (4)"),
    ("interval(1, 1)", "low (1.0) must be < high (1.0)"),
    ({"type": "int", "low": 8, "high": 8}, "low (8) must be < high (8)"),
    ("tag(log, interval(0, 1))", "log scale needs low > 0, got 0.0"),
    ({"type": "float", "low": -1, "high": 1, "log": True}, "log scale needs low > 0, got -1"),
    ({"choices": []}, "choices are empty"),
    ({"type": "categorical"}, "categorical needs choices"),
    ("choice(4, 8, 4)", "duplicate choice 4"),
    ("choice(1, true)", "duplicate choice True"),  # Optuna would map both to one choice
    ({"choices": [["q_proj", "v_proj"], "qk"]}, "write module lists as 'q_proj,v_proj'"),
    ({"type": "int", "low": 4, "high": 64, "step": 7},
     "step 7 does not divide the range [4, 64]; high = 60 or 67 would"),
    ({"type": "float", "low": 0.0, "high": 0.1, "step": 0.03},
     "step 0.03 does not divide the range [0.0, 0.1]; high = 0.09 or 0.12 would"),
    ("range(1, 2, step=5)", "step 5 is wider than the range [1, 2]"),
    ("range(0, 10, step=0)", "step must be > 0, got 0"),
    ("interval(0, inf)", "high must be a finite number, got inf"),
    ({"type": "float", "low": 1e-4, "high": 1e-2, "log": True, "step": 1e-4}, "log scale and step cannot"),
    ({"type": "int", "low": 1.5, "high": 4}, "int bounds and step must be whole numbers"),
    ({"type": "float", "low": "a", "high": 1}, "low must be a number, got 'a'"),
    ({"type": "float", "low": 0}, "float needs low and high"),
    ({"type": "uniform", "low": 0, "high": 1}, "type 'uniform' is not allowed; choose one of float, int, categorical"),
    ({"type": "float", "low": 0, "high": 1, "grid": True}, "unknown key(s) ['grid']; allowed: path, type, low"),
    ({"choices": [1, 2], "when": "sgd"}, "when must map a parameter to a value"),
    ({"choices": [1, 2], "when": {"x": [[1]]}}, "when: x must map to a value or a list of values, got [[1]]"),
    ({"choices": "qk"}, "choices must be a list of values, got 'qk'"),  # not the choices 'q' and 'k'
    ("choice(4, 8", "search_space.key: cannot parse 'choice(4, 8'"),
    ("interval(4, x)", "cannot parse"),
    ("chioce(4, 8)", "sweeps are written choice(a, b, ...), range(start, stop, step=s), interval(low, high)"),
    ("8", "'8' is not a sweep"),
    (8, "expected a grammar string"),
])
def test_bad_entry_is_named_with_the_problem(value: Any, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_space({"key": value})
    assert str(e.value).startswith("search_space.key: ")
    assert message in str(e.value)


@pytest.mark.parametrize(("entries", "message"), [
    ({"lora.rank": "choice(4, 8)"},
     "search_space.lora.rank: unknown config path 'lora.rank'; searchable paths under lora: lora.alpha, "
     "lora.alpha_ratio, lora.dropout, lora.r, lora.targets, lora.use_rslora"),
    ({"x": {"path": "optimizer.learning_rate", "type": "float", "low": 0.1, "high": 1}},
     "search_space.x: unknown config path 'optimizer.learning_rate'; searchable paths under optimizer: "
     "optimizer.betas"),
    ({"model.quant_type": "choice(nf4, fp4)"}, "model.* is loaded once per sweep and cannot be searched"),
    ({"lr": "interval(0.1, 1)"}, "unknown config path 'lr'; searchable paths: lora.alpha"),
    ({"sgd.momentum": {"path": "optimizer.momentum", "type": "float", "low": 0.8, "high": 0.9,
                       "when": {"optimizer.name": "sgd"}}},
     "search_space.sgd.momentum: condition on 'optimizer.name', which is not a parameter of the space; "
     "parameters: sgd.momentum"),
    ({"optimizer.name": "choice(adamw, sgd)",
      "x": {"path": "optimizer.momentum", "choices": [0.9], "when": {"optimizer.name": "rmsprop"}}},
     "search_space.x: condition value(s) ['rmsprop'] are not choices of optimizer.name: ['adamw', 'sgd']"),
    ({"optimizer.name": "choice(adamw, sgd)",
      "a": {"path": "optimizer.lr", "type": "float", "low": 0.1, "high": 1, "when": {"optimizer.name": "sgd"}},
      "b": {"path": "optimizer.lr", "type": "float", "low": 0.1, "high": 1}},
     "search_space.b: sets 'optimizer.lr' like 'a' under a condition that can hold at the same time"),
    ({"a": {"path": "lora.r", "choices": [4], "when": {"b": 1}},
      "b": {"path": "lora.dropout", "choices": [1], "when": {"a": 4}}}, "conditions form a cycle"),
])
def test_bad_space_is_named_with_the_problem(entries: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match="^search_space") as e:
        parse_space(entries, compose.SEARCHABLE_PATHS)
    assert message in str(e.value)


# --- conditions: sampled only on their branch, parents first --------------------------------------

def default_params() -> list[Param]:
    return parse_space(DEFAULT_SPACE, compose.SEARCHABLE_PATHS)


def test_a_condition_is_sampled_after_its_parameter() -> None:
    entries = dict(reversed(list(DEFAULT_SPACE.items())))  # children written before their parent
    names = [p.name for p in parse_space(entries)]
    for child in ("adamw.lr", "sgd.lr", "sgd.momentum", "sgd.nesterov"):
        assert names.index("optimizer.name") < names.index(child)


def test_sgd_branch_samples_momentum_and_nesterov_only_for_sgd() -> None:
    # FixedTrial raises for a parameter it was not given: AdamW's are never asked for.
    trial = FixedTrial({"lora.r": 8, "lora.alpha_ratio": 2.0, "lora.targets": "qk", "lora.dropout": 0.05,
                        "optimizer.name": "sgd", "optimizer.warmup_ratio": 0.1,
                        "sgd.lr": 0.05, "sgd.momentum": 0.9, "sgd.nesterov": True})
    values = sample(trial, default_params())
    assert values["optimizer.lr"] == 0.05
    assert values["optimizer.momentum"] == 0.9 and values["optimizer.nesterov"] is True
    assert "optimizer.weight_decay" not in values


def test_adamw_branch_samples_weight_decay_only_for_adamw() -> None:
    trial = FixedTrial({"lora.r": 8, "lora.alpha_ratio": 2.0, "lora.targets": "qk", "lora.dropout": 0.05,
                        "optimizer.name": "adamw", "optimizer.warmup_ratio": 0.1,
                        "adamw.lr": 2e-4, "adamw.weight_decay": 0.01})
    values = sample(trial, default_params())
    assert values["optimizer.lr"] == 2e-4 and values["optimizer.weight_decay"] == 0.01
    assert "optimizer.momentum" not in values and "optimizer.nesterov" not in values


def test_each_optimizer_gets_its_own_learning_rate_range() -> None:
    params = {p.name: p for p in default_params()}
    assert params["adamw.lr"].distribution == FloatDistribution(5e-5, 2e-3, log=True)
    assert params["sgd.lr"].distribution == FloatDistribution(1e-3, 1e-1, log=True)
    assert params["adamw.lr"].path == params["sgd.lr"].path == "optimizer.lr"


def test_betas_can_be_conditional_on_adamw() -> None:
    entries = {"optimizer.name": "choice(adamw, sgd)",
               "adamw.beta2": {"path": "optimizer.betas", "choices": ["0.9,0.95", "0.9,0.999"],
                               "when": {"optimizer.name": "adamw"}}}
    params = parse_space(entries, compose.SEARCHABLE_PATHS)
    assert sample(FixedTrial({"optimizer.name": "sgd"}), params) == {"optimizer.name": "sgd"}
    assert "optimizer.betas" in sample(FixedTrial({"optimizer.name": "adamw", "adamw.beta2": "0.9,0.95"}), params)


def test_real_trials_keep_to_their_branch() -> None:
    params = default_params()
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0, multivariate=True, group=True,
                                                                   n_startup_trials=4))
    study.optimize(lambda t: sum(float(v) for v in sample(t, params).values() if isinstance(v, (int, float))),
                   n_trials=16)
    assert {t.params["optimizer.name"] for t in study.trials} == {"adamw", "sgd"}
    for t in study.trials:
        branch = t.params["optimizer.name"]
        other = "sgd" if branch == "adamw" else "adamw"
        assert f"{branch}.lr" in t.params and not any(k.startswith(f"{other}.") for k in t.params)
        lr = params[[p.name for p in params].index(f"{branch}.lr")].distribution
        assert lr.low <= t.params[f"{branch}.lr"] <= lr.high  # type: ignore[attr-defined]


def test_describe() -> None:
    params = {p.name: p for p in default_params()}
    assert params["lora.r"].describe() == "int [4, 64] log"
    assert params["sgd.lr"].describe() == "float [0.001, 0.1] log"
    assert params["sgd.lr"].describe_condition() == "optimizer.name == 'sgd'"
    assert params["lora.r"].describe_condition() == ""
    stepped = parse_space({"x": "range(0.0, 0.2, step=0.1)", "y": "range(2, 8, step=2)"})
    assert [p.describe() for p in stepped] == ["float [0.0, 0.2] step 0.1", "int [2, 8] step 2"]
    both = Param("x", "x", CategoricalDistribution([1]), (("a", ("p", "q")),))
    assert both.describe_condition() == "a in ['p', 'q']"


# --- fixing, overriding and applying values -------------------------------------------------------

def test_fixing_the_optimizer_keeps_its_branch_unconditionally() -> None:
    out = fix_params(DEFAULT_SPACE, {"optimizer.name": "sgd"})
    assert "optimizer.name" not in out
    assert not any(k.startswith("adamw.") for k in out)
    assert {"sgd.lr", "sgd.momentum", "sgd.nesterov"} <= set(out)
    assert all(out[k]["when"] is None for k in ("sgd.lr", "sgd.momentum", "sgd.nesterov"))
    parse_space(out, compose.SEARCHABLE_PATHS)  # still a valid space


def test_fixing_a_path_drops_every_entry_that_sets_it() -> None:
    out = fix_params(DEFAULT_SPACE, {"optimizer.lr": 1e-3, "lora.r": 16})
    assert not {"adamw.lr", "sgd.lr", "lora.r"} & set(out)
    assert {"adamw.weight_decay", "sgd.momentum", "optimizer.name"} <= set(out)
    assert out["sgd.momentum"]["when"] == {"optimizer.name": "sgd"}  # untouched


def test_fixing_nothing_changes_nothing() -> None:
    assert fix_params(DEFAULT_SPACE, {}) == DEFAULT_SPACE
    assert fix_params(DEFAULT_SPACE, {"train.seed": 3}) == DEFAULT_SPACE


def test_split_overrides_separates_sweeps() -> None:
    sweeps, plain = split_overrides([
        "lora.r=choice(4,8)", "optimizer.lr=tag(log, interval(1e-5, 1e-3))", "lora.targets=qk,qkv",
        "train.max_steps=4", "lora.targets='q_proj,v_proj'", "model=tiny_random", "optimizer.betas=[0.9,0.99]",
        "+study.timeout_s=60"])
    assert sweeps == {"lora.r": "choice(4,8)", "optimizer.lr": "tag(log, interval(1e-5, 1e-3))",
                      "lora.targets": "qk,qkv"}
    assert plain == ["train.max_steps=4", "lora.targets='q_proj,v_proj'", "model=tiny_random",
                     "optimizer.betas=[0.9,0.99]", "+study.timeout_s=60"]


def test_split_overrides_names_an_override_that_does_not_parse() -> None:
    with pytest.raises(ConfigError, match=r"^override 'lora.r=\[4': cannot parse"):
        split_overrides(["lora.r=[4"])



@pytest.mark.parametrize("url", [
    f"postgresql://u:Pa={SECRET}@db-host/optuna",
    f"postgresql://u@db-host/optuna?password={SECRET}&sslmode=require",
    f"postgresql://u:it's={SECRET}@db-host/optuna",
])
def test_a_storage_url_with_an_equals_sign_is_one_value(url: str) -> None:
    sweeps, plain = split_overrides([f"study.storage={url}"])
    assert sweeps == {} and len(plain) == 1
    cfg, _ = compose.load([f"study.storage={url}", "search_space=none"])
    assert cfg.study.storage == url


@pytest.mark.parametrize("args", [
    [f"study.storage=postgresql://u:Pa={SECRET}@db-host/optuna x("],  # not one URL: Hydra's error, quoting it
    [f"study.storage=[postgresql://u:{SECRET}@db-host/optuna"],
    [f"study.storage=postgresql://u@db-host/optuna?password={SECRET} (x"],
    [f"tracking.token={SECRET}=("],
    [f"study.n_trials=postgresql://u:Pa={SECRET}@db-host/optuna"],  # a schema error quoting the value
    [f"study/sampler=postgresql://u:{SECRET}@db-host"],  # a group option Hydra cannot find
])
def test_a_secret_never_shows_in_an_override_error(args: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        compose.load([*args, "search_space=none"])
    assert SECRET not in str(e.value) and "***" in str(e.value), str(e.value)


@pytest.mark.parametrize(("args", "message"), [
    (["lora.rnk=8"], "lora.rnk: not a field of lora; did you mean lora.r? it has: r, alpha, alpha_ratio, dropout"),
    (["lora.alpah=8"], "lora.alpah: not a field of lora; did you mean lora.alpha? it has: r, alpha"),
    (["trian.max_steps=3"], "trian: not a field of the config; did you mean train"),
    (["lora.xyz=1"], "lora.xyz: not a field of lora; it has: r, alpha"),
    (["model=tiny"], "model=tiny: could not find 'model/tiny'; did you mean model=tiny_random? "
                     "available options in 'model': hub, smollm2_135m, tiny_random"),
    (["model=nope"], "model=nope: could not find 'model/nope'; available options in 'model': hub, smollm2_135m, "
                     "tiny_random"),
    (["search_space=optimzer"], "did you mean search_space=optimizer? available options in 'search_space': "),
])
def test_an_unknown_key_or_option_names_the_closest(args: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        compose.load(args)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_split_fixed_reads_plain_entries_as_fixed_values() -> None:
    sampled, fixed = split_fixed({"lora.r": "choice(4, 8)", "lora.targets": "qkv", "train.max_steps": "12",
                                  "lora.dropout": 0.1, "optimizer.betas": [0.9, 0.99],
                                  "adamw.lr": {"path": "optimizer.lr", "type": "float", "low": 0.1, "high": 1}})
    assert set(sampled) == {"lora.r", "adamw.lr"}
    assert fixed == {"lora.targets": "qkv", "train.max_steps": 12, "lora.dropout": 0.1,
                     "optimizer.betas": [0.9, 0.99]}


def test_a_sweep_named_like_an_entry_keeps_its_path_and_condition() -> None:
    out = merge_sweeps(DEFAULT_SPACE, {"adamw.lr": "tag(log, interval(1e-5, 1e-3))"})
    assert out["adamw.lr"] == {"path": "optimizer.lr", "when": {"optimizer.name": "adamw"}, "type": "float",
                               "low": 1e-5, "high": 1e-3, "log": True}
    assert out["sgd.lr"] == DEFAULT_SPACE["sgd.lr"]


def test_a_sweep_on_a_path_replaces_every_entry_that_sets_it() -> None:
    out = merge_sweeps(DEFAULT_SPACE, {"optimizer.lr": "tag(log, interval(1e-5, 1e-1))", "lora.r": "choice(4)"})
    assert "adamw.lr" not in out and "sgd.lr" not in out
    assert out["optimizer.lr"] == "tag(log, interval(1e-5, 1e-1))" and out["lora.r"] == "choice(4)"
    parse_space(out, compose.SEARCHABLE_PATHS)


def test_apply_values_sets_nested_paths_on_a_copy() -> None:
    config: dict[str, Any] = {"lora": {"r": 8, "alpha": None}, "optimizer": {"lr": 1e-4}}
    out = apply_values(config, {"lora.r": 16, "optimizer.lr": 1e-3, "train.seed": 1})
    assert out == {"lora": {"r": 16, "alpha": None}, "optimizer": {"lr": 1e-3}, "train": {"seed": 1}}
    assert config["lora"]["r"] == 8  # the input is untouched


def test_grid_values_and_volume() -> None:
    params = parse_space({"a": "choice(qk, qkv)", "b": "range(4, 12, step=4)", "c": "range(0.0, 0.3, step=0.1)"})
    assert [grid_values(p) for p in params] == [["qk", "qkv"], [4, 8, 12], [0.0, 0.1, 0.2, 0.3]]
    assert volume(params) == 24
    continuous = parse_space({"d": "interval(0, 1)"})
    assert volume(continuous) == float("inf")
    with pytest.raises(ConfigError, match="search_space.d: grid sampling needs categorical or stepped"):
        grid_values(continuous[0])


# --- the whole command line -> config path (compose.load), in process -----------------------------

def test_cli_fix_keeps_one_branch() -> None:
    _, params = compose.load(["optimizer.name=sgd"])
    names = {p.name for p in params}
    assert {"sgd.lr", "sgd.momentum", "sgd.nesterov"} <= names
    assert not any(n.startswith("adamw.") for n in names) and "optimizer.name" not in names
    assert not any(p.when for p in params)


def test_cli_sweep_on_a_path_replaces_the_per_optimizer_rates() -> None:
    _, params = compose.load(["optimizer.lr=tag(log, interval(1e-4, 1e-2))"])
    lr = [p for p in params if p.path == "optimizer.lr"]
    assert [(p.name, p.when) for p in lr] == [("optimizer.lr", ())]


def test_alpha_absolute_ratio_and_rslora_are_searchable() -> None:
    _, params = compose.load(["search_space=none", "lora.alpha=choice(8, 16, 32)",
                              "lora.use_rslora=choice(true,false)"])
    assert {p.path: p.distribution for p in params} == {
        "lora.alpha": CategoricalDistribution([8, 16, 32]), "lora.use_rslora": CategoricalDistribution([True, False])}
    cfg, params = compose.load(["search_space=rank_alpha"])
    assert {p.path for p in params} == {"lora.r", "lora.alpha_ratio", "lora.use_rslora"}
    assert cfg.lora.alpha is None  # the ratio decides
    _, params = compose.load(["search_space=rank_alpha", "lora.alpha=choice(8, 16)", "lora.alpha_ratio=2"])
    assert {p.path for p in params} == {"lora.r", "lora.alpha", "lora.use_rslora"}


@pytest.mark.parametrize(("args", "message"), [
    (["search_space=rank_alpha", "lora.alpha=16"],
     "search_space.lora.alpha_ratio: lora.alpha_ratio has no effect while lora.alpha is fixed at 16.0; "
     "fix the ratio too (lora.alpha_ratio=2.0) or set lora.alpha=null"),
    (["search_space=rank_alpha", "lora.alpha=choice(8, 16)"],
     "search_space.lora.alpha_ratio: searched together with lora.alpha, which overrides it"),
])
def test_alpha_and_its_ratio_are_not_searched_together(args: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        compose.load(args)
    assert message in str(e.value)


def test_explicit_module_lists_are_choices() -> None:
    cfg, params = compose.load(["search_space=none", "lora.targets=choice('q_proj,v_proj', qk, 'gate_proj,up_proj')"])
    assert params[0].distribution == CategoricalDistribution(["q_proj,v_proj", "qk", "gate_proj,up_proj"])
    cfg, params = compose.load(["search_space=none", "lora.targets='q_proj,v_proj'"])
    assert params == [] and cfg.lora.targets == "q_proj,v_proj"


def write_space(root: Path, name: str, entries: dict[str, Any]) -> list[str]:
    """A search-space file in its own config directory; the overrides that select it."""
    (root / "search_space").mkdir(parents=True, exist_ok=True)
    (root / "search_space" / f"{name}.yaml").write_text(yaml.safe_dump(entries))
    return [f"hydra.searchpath=[file://{root}]", f"search_space={name}"]


def test_a_space_file_may_fix_values_like_the_plugins_params(tmp_path: Path) -> None:
    # Hydra's Optuna sweeper params mix sweeps and plain values; the plain ones are fixed.
    select = write_space(tmp_path, "moved", {"lora.r": 16, "lora.targets": "qkv", "optimizer.betas": [0.9, 0.99],
                                             "lora.dropout": "interval(0, 0.1)"})
    cfg, params = compose.load(select)
    assert (cfg.lora.r, cfg.lora.targets, cfg.optimizer.betas) == (16, "qkv", [0.9, 0.99])
    assert [p.path for p in params] == ["lora.dropout"]
    cfg, _ = compose.load([*select, "lora.r=4"])
    assert cfg.lora.r == 4  # the command line wins


def test_a_value_fixed_in_a_space_file_keeps_its_branch(tmp_path: Path) -> None:
    entries = {k: v for k, v in DEFAULT_SPACE.items() if k.startswith(("optimizer.", "adamw.", "sgd."))}
    cfg, params = compose.load(write_space(tmp_path, "sgd_only", {**entries, "optimizer.name": "sgd"}))
    assert cfg.optimizer.name == "sgd"
    assert {p.name for p in params} == {"optimizer.warmup_ratio", "sgd.lr", "sgd.momentum", "sgd.nesterov"}
    assert not any(p.when for p in params)


def test_a_space_file_with_mappings_and_module_lists(tmp_path: Path) -> None:
    select = write_space(tmp_path, "mine", {
        "lora.targets": {"choices": ["q_proj,v_proj", "qkv"]},
        "lora.r": {"type": "int", "low": 4, "high": 16, "step": 4}})
    _, params = compose.load(select)
    assert {p.name: p.distribution for p in params} == {
        "lora.targets": CategoricalDistribution(["q_proj,v_proj", "qkv"]), "lora.r": IntDistribution(4, 16, step=4)}


# --- bad input through the command line: exit 2, the entry named, nothing written -----------------

BAD_FILES: dict[str, dict[str, Any]] = {
    "empty_choices": {"lora.targets": {"choices": []}},
    "missing_parent": {"lora.r": "choice(4, 8)",
                       "sgd.momentum": {"path": "optimizer.momentum", "type": "float", "low": 0.8, "high": 0.99,
                                        "when": {"optimizer.name": "sgd"}}},
    "unknown_type": {"lora.dropout": {"type": "uniform", "low": 0, "high": 0.1}},
    "unparsable": {"lora.r": "int(interval(4, 64)"},
    "unknown_fixed": {"lora.rank": 8},
    "uneven_step": {"lora.r": {"type": "int", "low": 4, "high": 64, "step": 7}},
}


BAD_INPUT: list[tuple[list[str], list[str]]] = [
    (["lora.rank=choice(4,8)"],
     ["search_space.lora.rank: unknown config path 'lora.rank'", "lora.alpha_ratio", "lora.use_rslora"]),
    (["lora.r=int(interval(64, 4))"], ["search_space.lora.r: low (64) must be < high (4)"]),
    (["optimizer.lr=tag(log, interval(0, 0.1))"], ["search_space.optimizer.lr: log scale needs low > 0"]),
    (["file:empty_choices"], ["search_space.lora.targets: choices are empty"]),
    (["lora.targets=choice()"], ["override 'lora.targets=choice()': cannot parse", "empty choice is not legal"]),
    (["lora.r=choice(4,8,4)"], ["search_space.lora.r: duplicate choice 4"]),
    (["file:missing_parent"], ["search_space.sgd.momentum: condition on 'optimizer.name', which is not a parameter",
                               "parameters: lora.r, sgd.momentum"]),
    (["lora.targets=choice(qk,qz)"],
     ["search_space.lora.targets: value 'qz' is invalid", "presets: qk, qv, qkv, qkvo, mlp, all-linear"]),
    (["search_space=none", "lora.targets=qz"], ["lora.targets: unknown preset 'qz'; presets: qk, qv"]),
    (["optimizer.name=choice(adamw,adam)"],
     ["search_space.optimizer.name: value 'adam' is invalid", "choose one of adamw, sgd"]),
    (["optimizer.name=adam"], ["optimizer.name: 'adam' is not allowed; choose one of adamw, sgd"]),
    (["file:uneven_step"], ["search_space.lora.r: step 7 does not divide the range [4, 64]"]),
    (["lora.r=choice(4,8"], ["lora.r", "cannot parse 'choice(4,8'", "choice(a, b, ...)"]),
    (["file:unparsable"], ["search_space.lora.r: cannot parse 'int(interval(4, 64)'"]),
    (["file:unknown_type"], ["search_space.lora.dropout: type 'uniform' is not allowed; choose one of float"]),
    (["file:unknown_fixed"], ["search_space.lora.rank: unknown config path 'lora.rank'"]),
    (["search_space=nope"], ["search_space/nope", "available options in 'search_space': default, none"]),
    (["study/sampler=grid"], ["grid cannot sample conditional parameters (adamw.lr"]),
    (["study/sampler=grid", "search_space=none", "lora.dropout=interval(0, 0.1)"],
     ["search_space.lora.dropout: grid sampling needs categorical or stepped parameters"]),
]


@pytest.mark.parametrize(("args", "expected"), BAD_INPUT, ids=[" ".join(args) for args, _ in BAD_INPUT])
def test_bad_input_fails_before_anything_runs(tmp_path: Path, args: list[str], expected: list[str]) -> None:
    overrides = []
    for arg in args:
        if arg.startswith("file:"):
            name = arg.removeprefix("file:")
            overrides += write_space(tmp_path / "conf", name, BAD_FILES[name])
        else:
            overrides.append(arg)
    out = tmp_path / "out"
    result = run_cli("launch", "model=tiny_random", f"output_dir={out}", *overrides, "--no-progress", timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    for text in expected:
        assert text in result.stderr, result.stderr
    # Nothing written: no study, no MLflow store, not even the output directory.
    assert not (out / "optuna.db").exists() and not (out / "mlflow.db").exists()
    assert not out.exists()


# --- the space verb --------------------------------------------------------------------------------

def test_space_verb_prints_parameters_conditions_and_fixed_values(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_cli("space", "search_space=optimizer", "optimizer.warmup_ratio=0.05", "lora.r=choice(4, 8)",
                     f"output_dir={out}", timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    rows = {line.split()[0]: line for line in lines if line.startswith("  ")}
    assert "categorical ['adamw', 'sgd']" in rows["optimizer.name"]
    assert "categorical [4, 8]" in rows["lora.r"]
    assert "optimizer.lr" in rows["sgd.lr"] and "float [0.001, 0.1] log" in rows["sgd.lr"]
    assert rows["sgd.lr"].endswith("when optimizer.name == 'sgd'")
    assert rows["adamw.lr"].endswith("when optimizer.name == 'adamw'")
    assert "when" not in rows["optimizer.name"]
    fixed = lines[lines.index("fixed values:") + 1:]
    fixed_rows = {line.split()[0]: line.split(None, 1)[1] for line in fixed if line.startswith("  ")}
    assert fixed_rows["optimizer.warmup_ratio"] == "0.05"
    assert fixed_rows["lora.targets"] == "'qkvo'"
    assert "lora.r" not in fixed_rows and "optimizer.lr" not in fixed_rows  # searched, so not fixed
    assert not out.exists()  # prints only


def test_space_verb_counts_a_discrete_space() -> None:
    result = run_cli("space", "search_space=targets", "study/sampler=grid", timeout=120)
    assert result.returncode == 0, result.stderr
    assert "search space (1 parameters, 4 configurations)" in result.stdout
    assert "sampler grid" in result.stdout
