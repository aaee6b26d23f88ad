"""The dry run: corners of the space, which of them fit a device, the time model, the pre-flight check."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from objectives.config import ConfigError
from objectives.decisions import fits, resolve_checkpointing
from objectives.memory import estimate_worst
from objectives.shape import ModelShape, TrialSettings
from objectives.sources import load_model_config as load_model_config_of
from objectives.timing import LAYER_OVERHEAD_S, cpu_device, detect_device, evaluations, step_seconds, trial_seconds
from sweeper import compose
from sweeper.config import SweepConfig
from sweeper.plan import MAX_CORNERS, combinations, corners, plan
from sweeper.slots import as_workers
from sweeper.space import parse_space
from tests.conftest import LLAMA_8B, SMOLLM2

CPU = cpu_device(2)


@pytest.fixture(scope="module")
def tiny() -> tuple[SweepConfig, list[Any], Any]:
    """The default config and space on the tiny random model, with the model's config (no weights)."""
    cfg, params = compose.load(["model=tiny_random"])
    return cfg, params, load_model_config_of(cfg.model)


def test_model_config_comes_without_weights_and_with_the_overrides(tiny: tuple[SweepConfig, list[Any], Any]) -> None:
    cfg, _, config = tiny
    shape = ModelShape.from_config(config)
    assert (shape.hidden_size, shape.num_layers, shape.head_dim) == (64, 2, 16)
    bad = replace(cfg, model=replace(cfg.model, config_overrides={"no_such_field": 1}))
    with pytest.raises(ConfigError, match="no_such_field"):
        load_model_config_of(bad.model)


def test_plan_of_the_default_space_lists_corners_and_marks_what_does_not_fit(
        tiny: tuple[SweepConfig, list[Any], Any]) -> None:
    cfg, params, config = tiny
    names, rows = corners(cfg, params, config, CPU)
    assert names == ["lora.targets", "lora.r", "optimizer.name"]  # dropout etc. change neither memory nor time
    assert len(rows) == 4 * 2 * 2
    totals = sorted(c.estimate.total for c in rows)
    memory = (totals[0] + totals[-1]) // 2
    text = plan(cfg, params, memory, model_config=config, device=CPU)
    assert "search space: 11 parameters, continuous" in text
    assert "device memory: given:" in text
    table = [ln.split() for ln in text.splitlines() if ln.strip()[:1].isdigit() and ln.strip().endswith(("yes", "NO"))]
    assert len(table) == len(rows)
    assert {row[-1] for row in table} == {"yes", "NO"}
    smallest = min(rows, key=lambda c: c.estimate.total)
    assert dict(smallest.values) == {"lora.targets": "qk", "lora.r": 4, "optimizer.name": "sgd"}
    bad = sum(c.estimate.total > memory for c in rows)
    assert f"{bad} of {len(rows)} corners do not fit" in text
    assert "largest corner" in text and "logits" in text
    n = cfg.study.n_trials
    assert re.search(rf"sweep: {n} trials of about [\d.]+ s \(the median corner\): at most about", text)
    assert "trials per pass (workers.slots=auto): 1" in text


def test_plan_shows_the_slots_and_their_memory_on_a_gpu(tiny: tuple[SweepConfig, list[Any], Any]) -> None:
    from objectives.timing import Device

    cfg, params, config = tiny
    gpu = Device("cuda", "H100-class GPU", 989e12, 67e12)
    cfg = replace(cfg, workers=replace(cfg.workers, engines=1))
    text = plan(replace(cfg, workers=replace(cfg.workers, slots=8)), params, 80 * 2**30, model_config=config,
                device=gpu)
    assert re.search(r"trials per pass \(workers.slots=8\): 8 \(workers.slots=8\); each slot rank \d+", text)
    assert "engine in a process of its own" in text  # auto on CUDA
    assert ", 8 at a time:" in text
    thread = plan(replace(cfg, workers=replace(cfg.workers, slots=8, engine_process=False)), params, 80 * 2**30,
                  model_config=config, device=gpu)
    assert "engine in the worker process" in thread
    two = plan(replace(cfg, workers=replace(cfg.workers, slots=8, engines=2)), params, 80 * 2**30,
               model_config=config, device=gpu)
    assert "; 2 engines, each in its own process with a copy of the base and 1/2 of the memory" in two
    assert ", 16 at a time:" in two


@pytest.fixture(scope="module")
def default() -> tuple[SweepConfig, list[Any]]:
    """The default config and space (no model loaded)."""
    return compose.load([])


@pytest.mark.parametrize(("model", "workers", "device_kind", "engines"), [
    ("135m", {}, "cuda", 3),                        # host-bound: engines launch while the others' kernels run
    ("1b", {}, "cuda", 1),                          # the device bounds a pass of 32 slots
    ("8b", {}, "cuda", 1),
    ("135m", {"count": 2, "per_gpu": 2}, "cuda", 1),  # workers already share the GPU
    ("135m", {"slots": 1}, "cuda", 1),              # one trial at a time: no engine
    ("135m", {"engine_process": False}, "cuda", 1),  # one engine in the launch's process
    ("135m", {}, "cpu", 1),                         # one trial at a time on the CPU
])
def test_auto_engines_multiply_where_one_engines_passes_are_host_bound(
        default: tuple[SweepConfig, list[Any]], model: str, workers: dict[str, Any], device_kind: str,
        engines: int, tmp_path: Path) -> None:
    from transformers import LlamaConfig

    from bench.models import SHAPES
    from sweeper.slots import plan_slots

    cfg, params = default
    assert cfg.workers.engines == "auto"
    cfg = replace(cfg, output_dir=str(tmp_path), workers=replace(cfg.workers, **workers))
    model_config = LlamaConfig(**{**SMOLLM2, **SHAPES[model]})
    got = plan_slots(cfg, params, device_kind, model_config, 139 * 2**30)
    assert got.engines == engines
    assert ("workers.engines=auto: the time model finds a pass of 32 slots bound by" in got.reason) == (engines > 1)
    # A launch in its own process runs the engines as worker processes on its GPU, each planning one engine alike.
    workers = as_workers(cfg, got)
    assert (workers is not None) == (engines > 1)
    if workers is not None:
        assert f"a launch runs them as {engines} worker processes on its GPU" in got.reason
        w = workers.workers
        assert (w.count, w.per_gpu, w.engines, w.slots) == (engines, engines, 1, cfg.workers.slots)
        assert workers.storage_url.startswith("journal:")  # workers share a journal file
        each = plan_slots(workers, params, device_kind, model_config, w.memory_share(139 * 2**30))
        assert (each.engines, each.slots, each.checkpointing) == (1, got.slots, got.checkpointing)


@pytest.mark.parametrize(("change", "sqlite_study", "as_workers_too"), [
    ({}, False, True),
    ({}, True, False),                                         # a study begun in one process's SQLite stays there
    ({"study.storage": "postgresql://db/optuna"}, False, False),  # the user's store: the launch does not move it
    ({"train.device": "cuda:1"}, False, False),                # a worker sees its GPU alone, as its cuda:0
    ({"workers.engines": 2}, False, False),                    # a number keeps the engines under the launch
    ({"workers.count": 1}, False, False),                      # workers already
])
def test_a_launch_runs_autos_engines_as_workers_only_where_it_may(
        default: tuple[SweepConfig, list[Any]], tmp_path: Path, change: dict[str, Any], sqlite_study: bool,
        as_workers_too: bool) -> None:
    from transformers import LlamaConfig

    from sweeper.slots import launches_as_workers, plan_slots

    cfg, params = default
    cfg = replace(cfg, output_dir=str(tmp_path))
    for key, value in change.items():
        section, name = key.split(".")
        cfg = replace(cfg, **{section: replace(getattr(cfg, section), **{name: value})})
    if sqlite_study:
        (tmp_path / "optuna.db").touch()
    got = plan_slots(cfg, params, "cuda", LlamaConfig(**SMOLLM2), 139 * 2**30)
    assert launches_as_workers(cfg) == as_workers_too
    assert (as_workers(cfg, got) is not None) == as_workers_too
    assert ("a launch runs them as 3 worker processes" in got.reason) == as_workers_too


@pytest.mark.parametrize(("memory_gib", "slots", "why"), [
    (40, "auto", "holds fewer than 32 slots"),
    (40, 32, "holds fewer than 32 slots"),
    (24, 16, "holds fewer than 16 slots"),
    (12, 8, "holds fewer than 8 slots"),
    (56, "auto", "would hold less of the base's cache"),
])
def test_auto_engines_stay_one_where_halves_of_the_memory_would_hold_fewer_slots_or_less_cache(
        default: tuple[SweepConfig, list[Any]], memory_gib: int, slots: Any, why: str) -> None:
    from transformers import LlamaConfig

    from sweeper.slots import plan_slots

    cfg, params = default
    cfg = replace(cfg, workers=replace(cfg.workers, slots=slots))
    memory = memory_gib * 2**30
    got = plan_slots(cfg, params, "cuda", LlamaConfig(**SMOLLM2), memory)
    alone = plan_slots(replace(cfg, workers=replace(cfg.workers, engines=1)), params, "cuda", LlamaConfig(**SMOLLM2),
                       memory)
    assert (got.engines, got.slots, got.checkpointing) == (1, alone.slots, alone.checkpointing)
    assert f"workers.engines=auto: one engine, though its passes are bound by the host: each half of the memory {why}" \
        in got.reason


def test_auto_engines_follow_the_memory_one_way(default: tuple[SweepConfig, list[Any]]) -> None:
    from transformers import LlamaConfig

    from sweeper.slots import plan_slots

    cfg, params = default
    model = LlamaConfig(**SMOLLM2)
    engines = [plan_slots(cfg, params, "cuda", model, gib * 2**30).engines for gib in range(16, 200, 8)]
    assert engines == sorted(engines) and set(engines) == {1, 2, 3}  # no band of memory where engines come and go


def test_auto_engines_ask_the_gpu_at_hand(default: tuple[SweepConfig, list[Any]]) -> None:
    from transformers import LlamaConfig

    from objectives.timing import Device
    from sweeper.slots import plan_slots

    cfg, params = default
    fast, slow = Device("cuda", "H200", 989e12, 67e12), Device("cuda", "small GPU", 20e12, 5e12)
    h200, small = (plan_slots(cfg, params, "cuda", LlamaConfig(**SMOLLM2), 139 * 2**30, device=d) for d in (fast, slow))
    assert (h200.engines, small.engines) == (3, 1)  # on the slower GPU the same pass is bound by the device


@pytest.mark.parametrize("memory_gib", [4, 40])
def test_each_engine_plans_its_slots_for_its_part_of_the_memory(tiny: tuple[SweepConfig, list[Any], Any],
                                                                memory_gib: int) -> None:
    from sweeper.slots import plan_slots

    cfg, params, config = tiny
    one, two = (replace(cfg, workers=replace(cfg.workers, engines=n)) for n in (1, 2))
    memory = memory_gib * 2**30
    halved, paired = plan_slots(one, params, "cuda", config, memory // 2), plan_slots(two, params, "cuda", config,
                                                                                      memory)
    assert (paired.slots, paired.engines, halved.engines) == (halved.slots, 2, 1)
    on_the_cpu = plan_slots(two, params, "cpu", config, memory)
    assert (on_the_cpu.slots, on_the_cpu.engines) == (1, 1) and "workers.engines=2 unused" in on_the_cpu.reason


def test_engines_that_would_hold_one_slot_each_leave_one_engine_all_the_memory(
        tiny: tuple[SweepConfig, list[Any], Any]) -> None:
    from objectives.decisions import slots_memory_bytes
    from sweeper.slots import plan_slots, widest_rank

    cfg, params, config = tiny
    two = replace(cfg, workers=replace(cfg.workers, engines=2))
    memory = max(slots_memory_bytes(cfg, config, 2, widest_rank(cfg, params), on) for on in (False, True))
    got = plan_slots(two, params, "cuda", config, memory)  # half of it holds one slot at most
    assert (got.slots, got.engines) == (2, 1)
    assert "workers.engines=2 unused: one trial per pass fits each engine's part of the memory" in got.reason


def test_workers_sharing_a_gpu_check_corners_against_their_share(
        tiny: tuple[SweepConfig, list[Any], Any]) -> None:
    cfg, params, config = tiny
    largest = max(c.estimate.total for c in corners(cfg, params, config, CPU)[1])
    shared = replace(cfg, workers=replace(cfg.workers, count=2, per_gpu=2))
    assert "\n0 of " in plan(cfg, params, largest, model_config=config, device=CPU)
    text = plan(shared, params, largest, model_config=config, device=CPU)
    assert "per trial (workers.per_gpu=2 share a GPU)" in text and "\n0 of " not in text


def test_without_a_device_memory_is_shown_for_reference(tiny: tuple[SweepConfig, list[Any], Any]) -> None:
    cfg, params, config = tiny
    text = plan(cfg, params, None, model_config=config, device=CPU)
    assert "no accelerator: memory shown for reference" in text
    assert "do not fit" not in text


def test_a_batch_size_sweep_splits_the_corners_by_memory() -> None:
    cfg, params = compose.load(["model=tiny_random", "search_space=none", "train.micro_batch_size=choice(1,16)",
                                "lora.r=choice(4,8)"])
    config = load_model_config_of(cfg.model)
    names, rows = corners(cfg, params, config, CPU)
    assert names == ["lora.r", "train.micro_batch_size"] and len(rows) == 4
    total = {tuple(dict(c.values).values()): c.estimate.total for c in rows}
    for r in (4, 8):
        assert total[(r, 16)] > total[(r, 1)] + 10 * 2**20  # 16 rows of fp32 logits over a 49152-token vocabulary


def test_corners_stay_bounded_by_pinning_the_least_important_parameters() -> None:
    cfg, params = compose.load(["model=tiny_random", "search_space=none", "lora.r=choice(4,8,16,32,64)",
                                "lora.targets=choice(qk,qkv,qkvo,all-linear,mlp)",
                                "train.micro_batch_size=choice(1,2,4,8)", "optimizer.name=choice(adamw,sgd)"])
    config = load_model_config_of(cfg.model)
    names, rows = corners(cfg, params, config, CPU)
    assert len(rows) <= MAX_CORNERS
    assert names[:2] == ["lora.targets", "lora.r"]
    values = [dict(c.values) for c in rows]
    assert {v["optimizer.name"] for v in values} == {"adamw"}  # pinned to its most expensive value
    assert {v["train.micro_batch_size"] for v in values} == {8}


def test_a_conditional_parameter_varies_only_where_its_condition_holds() -> None:
    params = parse_space({"optimizer.name": "choice(adamw, sgd)",
                          "sgd.momentum": {"path": "optimizer.momentum", "type": "float", "low": 0.0, "high": 0.9,
                                           "when": {"optimizer.name": "sgd"}}})
    combos = combinations(params, {"optimizer.name": ["adamw", "sgd"], "sgd.momentum": [0.0, 0.9]})
    assert combos == [{"optimizer.name": "adamw"}, {"optimizer.name": "sgd", "sgd.momentum": 0.0},
                      {"optimizer.name": "sgd", "sgd.momentum": 0.9}]


def test_fits_is_the_preflight_check(tiny: tuple[SweepConfig, list[Any], Any]) -> None:
    cfg, _, config = tiny
    total = estimate_worst(config, TrialSettings.from_config(cfg)).total
    assert fits(cfg, config, 100 * 2**30) == (True, total)
    assert fits(cfg, config, total - 1) == (False, total)


@pytest.mark.parametrize(("steps", "every", "expected"), [(24, 8, 3), (10, 4, 3), (5, 10, 1), (6, 1, 6)])
def test_evaluations_are_every_n_steps_and_at_the_end(steps: int, every: int, expected: int) -> None:
    assert evaluations(steps, every) == expected


def test_time_grows_with_tokens_checkpointing_and_steps(tiny: tuple[SweepConfig, list[Any], Any]) -> None:
    base = TrialSettings(micro_batch_size=4, seq_len=256, gradient_checkpointing=False)
    for config, device in ((SMOLLM2, CPU), (LLAMA_8B, "cuda")):
        t = step_seconds(config, base, device)
        assert step_seconds(config, replace(base, micro_batch_size=64), device) > t
        assert step_seconds(config, replace(base, gradient_checkpointing=True), device) > t
        assert step_seconds(config, base, device, train=False) < t
    cfg, _, config = tiny
    longer = replace(cfg, train=replace(cfg.train, max_steps=cfg.train.max_steps * 2))
    assert trial_seconds(config, longer, CPU) > trial_seconds(config, cfg, CPU)


def test_a_small_model_on_a_gpu_is_bound_by_the_host() -> None:
    s = TrialSettings(r=8, targets="qkvo", micro_batch_size=1, seq_len=128, gradient_checkpointing=False)
    assert step_seconds(SMOLLM2, s, "cuda") > 30 * 2 * LAYER_OVERHEAD_S  # layers x passes
    assert step_seconds(SMOLLM2, replace(s, micro_batch_size=8), "cuda") == step_seconds(SMOLLM2, s, "cuda")


def test_this_machine_without_cuda_plans_time_for_the_cpu(tiny: tuple[SweepConfig, list[Any], Any]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert detect_device(tiny[0]).kind == "cpu"


def test_checkpointing_auto_is_off_where_the_trial_fits_without_it(tiny: tuple[SweepConfig, list[Any], Any]) -> None:
    cfg, _, config = tiny
    on = fits(replace(cfg, model=replace(cfg.model, gradient_checkpointing=True)), config, 0)[1]
    off = fits(replace(cfg, model=replace(cfg.model, gradient_checkpointing=False)), config, 0)[1]
    assert on < off
    for setting, memory, expected in [("auto", off, False), ("auto", off - 1, True), ("auto", 1, True),
                                      (True, 2**50, True), (False, 1, False)]:
        trial = replace(cfg, model=replace(cfg.model, gradient_checkpointing=setting))
        assert resolve_checkpointing(trial, config, memory).model.gradient_checkpointing is expected, (setting, memory)


def test_the_plan_shows_where_auto_checkpointing_is_on(tiny: tuple[SweepConfig, list[Any], Any]) -> None:
    cfg, params, config = tiny
    assert cfg.model.gradient_checkpointing == "auto"
    rows = corners(cfg, params, config, CPU, memory_bytes=2**50)[1]
    memory = sorted(c.estimate.total for c in rows)[len(rows) // 2]  # the larger corners need checkpointing
    text = plan(cfg, params, memory, model_config=config, device=CPU)
    assert "gradient checkpointing auto (per trial: on only where the trial would not fit without it)" in text
    column = next(ln.split() for ln in text.splitlines() if ln.strip().startswith("#")).index("ckpt")
    table = [ln.split() for ln in text.splitlines() if ln.strip()[:1].isdigit() and ln.strip().endswith(("yes", "NO"))]
    assert {row[column] for row in table} == {"on", "off"}  # the columns before it hold no spaces


def test_base_cache_auto_is_on_where_the_trial_still_fits_with_it(tiny: tuple[SweepConfig, list[Any], Any]) -> None:
    from objectives.decisions import resolve_base_cache, with_base_cache

    cfg, _, config = tiny
    without = fits(with_base_cache(cfg, False), config, 0)[1]
    with_copy = fits(with_base_cache(cfg, True), config, 0)[1]
    assert with_copy - without >= 2 * ModelShape.from_config(config).linear_params
    for setting, memory, expected in [("auto", with_copy, True), ("auto", with_copy - 1, False),
                                      (True, 1, True), (False, 2**50, False)]:
        trial = replace(cfg, model=replace(cfg.model, base_cache=setting))
        assert resolve_base_cache(trial, config, memory).model.base_cache is expected, (setting, memory)
    bf16 = replace(cfg, model=replace(cfg.model, quant_type="none"))
    assert resolve_base_cache(bf16, config, 2**50).model.base_cache is False  # nothing to dequantize


def test_cuda_graphs_auto_is_on_where_the_host_bounds_the_step_and_the_trial_fits(
        tiny: tuple[SweepConfig, list[Any], Any]) -> None:
    from objectives.decisions import resolve_cuda_graphs, with_checkpointing, with_cuda_graphs, with_fused_loss

    cfg, _, config = tiny
    ready = with_fused_loss(with_checkpointing(cfg, False), False)
    need = fits(ready, config, 0)[1]
    eight_b = replace(ready, data=replace(ready.data, max_length=1024),
                      lora=replace(ready.lora, r=16, targets="all-linear"))
    for trial, device, model, memory, expected in [
            (ready, "cuda", config, 2**50, True),          # a tiny model: the host bounds its step
            (ready, "cuda", config, 2 * need, True),
            (ready, "cuda", config, need, False),          # no room for the graph's pool beside an evaluation
            (ready, "cpu", config, 2**50, False),
            (with_checkpointing(ready, True), "cuda", config, 2**50, False),
            (with_fused_loss(ready, True), "cuda", config, 2**50, False),
            (replace(ready, train=replace(ready.train, packing=False, grad_accum=2)), "cuda", config, 2**50, False),
            (eight_b, "cuda", LLAMA_8B, 2**50, False)]:  # the device bounds it: a replay saves nothing
        assert resolve_cuda_graphs(trial, device, model, memory).train.cuda_graphs is expected, (device, memory)
    assert resolve_cuda_graphs(with_cuda_graphs(ready, False), "cuda", config, 2**50).train.cuda_graphs is False
    replayed = TrialSettings.from_config(with_cuda_graphs(ready, True))
    assert step_seconds(SMOLLM2, replayed) < step_seconds(SMOLLM2, replace(replayed, cuda_graphs=False)) / 10
    assert resolve_cuda_graphs(ready, "cuda").train.cuda_graphs is True  # no memory given: wherever it can run
    for trial, device, why in [(with_cuda_graphs(ready, True), "cpu", "needs CUDA"),
                               (with_cuda_graphs(with_checkpointing(ready, True), True), "cuda",
                                "needs gradient checkpointing off"),
                               (with_cuda_graphs(with_fused_loss(ready, True), True), "cuda", "train.fused_loss=off")]:
        with pytest.raises(ConfigError, match=f"train.cuda_graphs: on .*{why}"):
            resolve_cuda_graphs(trial, device, config, 2**50)


def test_the_plan_shows_the_base_cache_and_the_loss(tiny: tuple[SweepConfig, list[Any], Any]) -> None:
    from objectives.timing import Device

    cfg, params, config = tiny
    rows = corners(cfg, params, config, CPU, memory_bytes=2**50)[1]
    memory = sorted(c.estimate.total for c in rows)[len(rows) // 2]  # the larger corners go without the copy
    text = plan(cfg, params, memory, model_config=config, device=CPU)
    assert "base cache auto (per trial: a compute-dtype copy of the 4-bit weights where" in text
    assert "loss from full logits (fused loss: it needs CUDA)" in text
    assert "; CUDA graphs off (CUDA only)" in text
    column = next(ln.split() for ln in text.splitlines() if ln.strip().startswith("#")).index("cache")
    table = [ln.split() for ln in text.splitlines() if ln.strip()[:1].isdigit() and ln.strip().endswith(("yes", "NO"))]
    assert {row[column] for row in table} == {"on", "off"}
    off = plan(replace(cfg, model=replace(cfg.model, base_cache=False)), params, memory, model_config=config,
               device=CPU)
    assert "base cache off;" in off and " cache " not in next(ln for ln in off.splitlines() if "#" in ln)
    gpu = Device("cuda", "H100-class GPU", 989e12, 67e12)
    slots = plan(replace(cfg, workers=replace(cfg.workers, slots=8)), params, 80 * 2**30, model_config=config,
                 device=gpu)
    assert re.search(r"trials per pass \(workers.slots=8\): 8 .*checkpointing off, base cache on, "
                     r"loss from full logits, engine in a process of its own, predicted", slots)


def test_checkpointing_auto_in_slots_is_decided_per_pass_where_the_worst_case_needs_it(
        tiny: tuple[SweepConfig, list[Any], Any]) -> None:
    from objectives.decisions import slots_memory_bytes
    from objectives.timing import Device
    from sweeper.slots import plan_slots

    cfg, params, config = tiny
    cfg = replace(cfg, workers=replace(cfg.workers, slots=8))
    r_max, longest = 64, cfg.data.max_length
    with_it, without = (slots_memory_bytes(cfg, config, 8, r_max, on) for on in (True, False))
    memory = (with_it + without) // 2  # the worst case fits with checkpointing only
    decided = plan_slots(cfg, params, "cuda", config, memory)
    assert decided.checkpointing and decided.per_pass is not None and decided.r_max == r_max
    assert decided.per_pass(8 * cfg.train.micro_batch_size, longest)  # every slot's rows at full length
    assert not decided.per_pass(8, longest // 4)  # short examples packed into one row per slot
    # One row per slot through the variable-length kernel: no mask, so a row as wide as a slot's micro-batch end to
    # end costs what its tokens cost in rows of data.max_length.
    wide = cfg.train.micro_batch_size * longest
    assert not decided.per_pass(8, wide // 4, True)
    assert slots_memory_bytes(cfg, config, 8, r_max, False, rows=8, width=wide, routed=True) == pytest.approx(
        slots_memory_bytes(cfg, config, 8, r_max, False, rows=8 * cfg.train.micro_batch_size, width=longest,
                           routed=True), rel=1e-4)  # the rotary table grows with the width
    assert slots_memory_bytes(cfg, config, 8, r_max, False, rows=8, width=wide, routed=True) < slots_memory_bytes(
        cfg, config, 8, r_max, False, rows=8, width=wide)
    forced = replace(cfg, model=replace(cfg.model, gradient_checkpointing=True))
    assert plan_slots(forced, params, "cuda", config, memory).per_pass is None
    gpu = Device("cuda", "H100-class GPU", 989e12, 67e12)
    assert "checkpointing per pass (off for a pass whose rows fit without it)" in plan(
        cfg, params, memory, model_config=config, device=gpu)
