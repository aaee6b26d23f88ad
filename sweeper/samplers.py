"""Optuna samplers and pruners: one typed schema per kind, and one registry per kind naming them all.

``study.sampler`` and ``study.pruner`` are mappings whose ``name`` picks an entry of ``SAMPLERS`` or ``PRUNERS``;
the rest of the mapping is checked against that entry's schema alone, so an option the chosen sampler would
ignore is an error rather than a silent no-op. Each ``conf/study/sampler/<name>.yaml`` (and pruner) selects one.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import optuna

from objectives.config import ConfigError, TrainConfig, check_choice
from sweeper.pruning import PeerPercentilePruner
from sweeper.space import Param
from sweeper.values import grid_values

# group=True, QMC and friends are stable in use; the per-call notice is noise in every sweep's output.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def name_of(schema: type[Any]) -> str:
    """The default of a schema's ``name`` field: the name it is registered under, written once."""
    default = {f.name: f.default for f in dataclasses.fields(schema)}["name"]
    assert isinstance(default, str), schema
    return default


# --- samplers ---------------------------------------------------------------------------------------------------


@dataclass
class SamplerConfig:
    """What every sampler takes; each sampler's schema below adds its own options."""

    name: str
    """Which sampler: a key of ``SAMPLERS`` (and a file under conf/study/sampler/)."""
    seed: int | None = 0
    """Seeds the sampler: same seed, same suggestions; None draws a fresh seed every run."""


@dataclass
class TpeSamplerConfig(SamplerConfig):
    """Tree-structured Parzen estimator: models where good and bad trials' parameters lie."""

    name: str = "tpe"
    n_startup_trials: int = 4
    """Random trials before TPE models the space: fewer start modelling sooner, on less evidence."""
    multivariate: bool = True
    """Model the parameters jointly, so interactions (rank with learning rate) are seen."""
    group: bool = True
    """Model conditional parameters per branch (SGD's momentum, AdamW's weight decay) separately;
    needs ``multivariate``."""
    constant_liar: bool = False
    """Count running trials as bad so workers sharing the study are not sent to the same point; joining
    workers turn it on themselves."""


@dataclass
class RandomSamplerConfig(SamplerConfig):
    """Independent uniform (or log-uniform) draws: the baseline any model-based sampler should beat."""

    name: str = "random"


@dataclass
class GridSamplerConfig(SamplerConfig):
    """Every point of a discrete, unconditional space once, in a seeded order; stops when all are done."""

    name: str = "grid"


@dataclass
class CmaEsSamplerConfig(SamplerConfig):
    """CMA-ES on the numeric parameters (categoricals are drawn at random): good on smooth, continuous spaces."""

    name: str = "cmaes"
    n_startup_trials: int = 4
    """Random trials before CMA-ES adapts its search distribution."""


@dataclass
class GpSamplerConfig(SamplerConfig):
    """Gaussian-process Bayesian optimization: the most sample-efficient on a few numeric parameters, slower
    to suggest as trials accumulate."""

    name: str = "gp"
    n_startup_trials: int = 4
    """Random trials before the Gaussian process is fitted."""


@dataclass
class QmcSamplerConfig(SamplerConfig):
    """A scrambled low-discrepancy sequence: covers the space more evenly than random draws, learns nothing."""

    name: str = "qmc"
    qmc_type: str = "sobol"
    """The sequence: sobol or halton."""


@dataclass
class Nsga2SamplerConfig(SamplerConfig):
    """NSGA-II, a genetic algorithm for several objectives (``study.objectives``): evolves a Pareto front."""

    name: str = "nsga2"
    population_size: int = 8
    """Trials per generation: larger is more diverse, but the first generation is random and each one waits
    for this many trials."""


SamplerFactory = Callable[[Any, Sequence[Param]], optuna.samplers.BaseSampler]


class Sampler(NamedTuple):
    """A sampler's schema (its options) and what builds it from them and the space."""

    schema: type[SamplerConfig]
    build: SamplerFactory


def _fallback(seed: int | None) -> dict[str, Any]:
    # Parameters a sampler cannot model (categoricals for CMA-ES, QMC) are drawn at random, seeded too.
    return {"independent_sampler": optuna.samplers.RandomSampler(seed=seed), "warn_independent_sampling": False}


def _tpe(cfg: TpeSamplerConfig, params: Sequence[Param]) -> optuna.samplers.BaseSampler:
    return optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=cfg.n_startup_trials,
                                      multivariate=cfg.multivariate, group=cfg.group, constant_liar=cfg.constant_liar)


def _random(cfg: RandomSamplerConfig, params: Sequence[Param]) -> optuna.samplers.BaseSampler:
    return optuna.samplers.RandomSampler(seed=cfg.seed)


def _grid(cfg: GridSamplerConfig, params: Sequence[Param]) -> optuna.samplers.BaseSampler:
    # A grid fixes every parameter of every trial; a branch that is not sampled breaks its count.
    conditional = [p.name for p in params if p.when]
    if conditional:
        raise ConfigError(f"study.sampler.name: grid cannot sample conditional parameters "
                          f"({', '.join(conditional)}); fix their condition "
                          "(e.g. optimizer.name=sgd) or use tpe or random")
    return optuna.samplers.GridSampler({p.name: grid_values(p) for p in params}, seed=cfg.seed)


def _cmaes(cfg: CmaEsSamplerConfig, params: Sequence[Param]) -> optuna.samplers.BaseSampler:
    return optuna.samplers.CmaEsSampler(seed=cfg.seed, n_startup_trials=cfg.n_startup_trials, **_fallback(cfg.seed))


def _gp(cfg: GpSamplerConfig, params: Sequence[Param]) -> optuna.samplers.BaseSampler:
    return optuna.samplers.GPSampler(seed=cfg.seed, n_startup_trials=cfg.n_startup_trials, **_fallback(cfg.seed))


def _qmc(cfg: QmcSamplerConfig, params: Sequence[Param]) -> optuna.samplers.BaseSampler:
    return optuna.samplers.QMCSampler(qmc_type=cfg.qmc_type, seed=cfg.seed, scramble=True, **_fallback(cfg.seed))


def _nsga2(cfg: Nsga2SamplerConfig, params: Sequence[Param]) -> optuna.samplers.BaseSampler:
    return optuna.samplers.NSGAIISampler(population_size=cfg.population_size, seed=cfg.seed)


SAMPLERS: dict[str, Sampler] = {name_of(s.schema): s for s in (
    Sampler(TpeSamplerConfig, _tpe),
    Sampler(RandomSamplerConfig, _random),
    Sampler(GridSamplerConfig, _grid),
    Sampler(CmaEsSamplerConfig, _cmaes),
    Sampler(GpSamplerConfig, _gp),
    Sampler(QmcSamplerConfig, _qmc),
    Sampler(Nsga2SamplerConfig, _nsga2),
)}
"""Every sampler by name; ``name`` in ``study.sampler`` picks one."""


# --- pruners ----------------------------------------------------------------------------------------------------


@dataclass
class PrunerConfig:
    """What every pruner takes; each pruner's schema below adds its own options."""

    name: str
    """Which pruner: a key of ``PRUNERS`` (and a file under conf/study/pruner/)."""


@dataclass
class MedianPrunerConfig(PrunerConfig):
    """Stop a trial whose evaluation is worse than the median of its peers' at the same step: the finished trials
    and those alongside it that reported the step (``sweeper.pruning``; one trial at a time: Optuna's rule)."""

    name: str = "median"
    n_startup_trials: int = 2
    """Peers (finished trials, and trials alongside that reported the step) needed before a trial is pruned: fewer
    prune sooner, on a noisier median. A wave of slots brings its own peers, so its first evaluation prunes."""
    n_warmup_steps: int = 0
    """Steps inside a trial before it may be pruned: protects configs that start slowly (long warmups)."""
    interval_steps: int = 1
    """Check at every this many reports."""


@dataclass
class PercentilePrunerConfig(MedianPrunerConfig):
    """The median pruner with another cut: stop a trial outside the best ``percentile`` percent."""

    name: str = "percentile"
    percentile: float = 25.0
    """Keep trials in the best this percent at each step: lower prunes harder."""


@dataclass
class SuccessiveHalvingPrunerConfig(PrunerConfig):
    """Rungs at min_resource * reduction_factor**k steps; at each, keep the best 1/reduction_factor of trials."""

    name: str = "successive_halving"
    min_resource: Any = "auto"
    """First rung in steps; auto: the first evaluation (train.eval_every), so rungs fall on evaluations."""
    reduction_factor: int = 3
    """Keep 1/reduction_factor of the trials at each rung: larger prunes harder and sooner."""

    def __post_init__(self) -> None:
        # Hyperband checks its rungs only when a trial first reports; fail here, before anything runs.
        if self.reduction_factor < 2:
            raise ConfigError(f"study.pruner.reduction_factor: must be >= 2 for {self.name}, "
                              f"got {self.reduction_factor}")


@dataclass
class AshaPrunerConfig(SuccessiveHalvingPrunerConfig):
    """Asynchronous successive halving (Optuna's successive halving is the asynchronous kind): the same rungs."""

    name: str = "asha"


@dataclass
class HyperbandPrunerConfig(SuccessiveHalvingPrunerConfig):
    """Several successive-halving brackets, from aggressive to none: less sensitive to the first rung."""

    name: str = "hyperband"


@dataclass
class NopPrunerConfig(PrunerConfig):
    """No pruning: every trial trains to the end."""

    name: str = "none"


PrunerFactory = Callable[[Any, TrainConfig], optuna.pruners.BasePruner]


class Pruner(NamedTuple):
    """A pruner's schema (its options) and what builds it from them and the training loop."""

    schema: type[PrunerConfig]
    build: PrunerFactory


def first_rung(cfg: SuccessiveHalvingPrunerConfig, train: TrainConfig) -> int:
    """The first rung in steps.

    ``auto`` puts it at the first evaluation (``train.eval_every``): Optuna's own estimate (a hundredth of a
    finished trial's steps) assumes a report every step and, with evaluations every few steps, stacks several
    rungs on the first one (keeping 1/9 of the trials there instead of 1/3).
    """
    return min(train.eval_every, train.max_steps) if cfg.min_resource == "auto" else cfg.min_resource


def _median(cfg: MedianPrunerConfig, train: TrainConfig) -> optuna.pruners.BasePruner:
    return PeerPercentilePruner(50.0, cfg.n_startup_trials, cfg.n_warmup_steps, cfg.interval_steps)


def _percentile(cfg: PercentilePrunerConfig, train: TrainConfig) -> optuna.pruners.BasePruner:
    return PeerPercentilePruner(cfg.percentile, cfg.n_startup_trials, cfg.n_warmup_steps, cfg.interval_steps)


def _successive_halving(cfg: SuccessiveHalvingPrunerConfig, train: TrainConfig) -> optuna.pruners.BasePruner:
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=first_rung(cfg, train),
                                                  reduction_factor=cfg.reduction_factor)


def _hyperband(cfg: HyperbandPrunerConfig, train: TrainConfig) -> optuna.pruners.BasePruner:
    return optuna.pruners.HyperbandPruner(min_resource=first_rung(cfg, train), max_resource=train.max_steps,
                                          reduction_factor=cfg.reduction_factor)


def _none(cfg: NopPrunerConfig, train: TrainConfig) -> optuna.pruners.BasePruner:
    return optuna.pruners.NopPruner()


PRUNERS: dict[str, Pruner] = {name_of(p.schema): p for p in (
    Pruner(MedianPrunerConfig, _median),
    Pruner(PercentilePrunerConfig, _percentile),
    Pruner(SuccessiveHalvingPrunerConfig, _successive_halving),
    Pruner(AshaPrunerConfig, _successive_halving),
    Pruner(HyperbandPrunerConfig, _hyperband),
    Pruner(NopPrunerConfig, _none),
)}
"""Every pruner by name; ``name`` in ``study.pruner`` picks one."""


# --- choosing and building --------------------------------------------------------------------------------------


def _schema(kind: str, registry: Mapping[str, Sampler | Pruner], options: Mapping[str, Any],
            default: str) -> type[Any]:
    path = f"study.{kind}"
    name = options.get("name", default)
    check_choice(f"{path}.name", name, tuple(registry))
    schema = registry[name].schema
    takes = [f.name for f in dataclasses.fields(schema) if f.name != "name"]
    for key in options:
        if key != "name" and key not in takes:
            accepted = f"it takes: {', '.join(takes)}" if takes else "it takes no options"
            raise ConfigError(f"{path}.{key}: not an option of the {name} {kind}; {accepted}")
    return schema


def sampler_schema(options: Mapping[str, Any], default: str = "tpe") -> type[SamplerConfig]:
    """The schema of the sampler ``options["name"]`` names (``default`` without a name).

    Raises:
        ConfigError: an unknown name (listing the known ones), or an option that sampler does not take
            (naming it and listing the ones it does).
    """
    return _schema("sampler", SAMPLERS, options, default)


def pruner_schema(options: Mapping[str, Any], default: str = "median") -> type[PrunerConfig]:
    """The schema of the pruner ``options["name"]`` names (``default`` without a name); raises as
    ``sampler_schema``."""
    return _schema("pruner", PRUNERS, options, default)


def make_sampler(cfg: SamplerConfig, params: Sequence[Param]) -> optuna.samplers.BaseSampler:
    """The sampler ``cfg`` configures, seeded by ``cfg.seed``.

    Raises:
        ConfigError: an unknown name, a setting the sampler rejects, or a grid over a space it
            cannot enumerate (continuous or conditional parameters).
    """
    sampler = SAMPLERS.get(cfg.name)
    if sampler is None or not isinstance(cfg, sampler.schema):
        sampler_schema({"name": cfg.name})  # the unknown name's error
        raise ConfigError(f"study.sampler: a {type(cfg).__name__} does not configure the {cfg.name} sampler")
    try:
        return sampler.build(cfg, params)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:  # Optuna's own checks of the settings
        raise ConfigError(f"study.sampler: {cfg.name} rejects its settings: {e}") from None


def make_pruner(cfg: PrunerConfig, train: TrainConfig) -> optuna.pruners.BasePruner:
    """The pruner ``cfg`` configures, asked at every evaluation of a trial but the last.

    Raises:
        ConfigError: an unknown name or a setting the pruner rejects.
    """
    pruner = PRUNERS.get(cfg.name)
    if pruner is None or not isinstance(cfg, pruner.schema):
        pruner_schema({"name": cfg.name})
        raise ConfigError(f"study.pruner: a {type(cfg).__name__} does not configure the {cfg.name} pruner")
    try:
        return pruner.build(cfg, train)
    except (ValueError, TypeError) as e:  # Optuna's own checks of the settings
        raise ConfigError(f"study.pruner: {cfg.name} rejects its settings: {e}") from None


def counting_running(cfg: SamplerConfig) -> SamplerConfig:
    """The sampler told to count the trials running beside its own (TPE's constant liar); others unchanged."""
    if "constant_liar" in {f.name for f in dataclasses.fields(cfg)}:
        return dataclasses.replace(cfg, **{"constant_liar": True})  # type: ignore[arg-type]
    return cfg


def for_worker(cfg: SamplerConfig, offset: int) -> SamplerConfig:
    """The sampler settings of a worker joining a shared study.

    Workers must not draw the same suggestions from the same seed, so each shifts it by its ``offset``; a
    sampler that can count the others' running trials (TPE's constant liar) is told to.
    """
    changes: dict[str, Any] = {"seed": None if cfg.seed is None else cfg.seed + offset}
    if "constant_liar" in {f.name for f in dataclasses.fields(cfg)}:
        changes["constant_liar"] = True
    return dataclasses.replace(cfg, **changes)
