"""The benchmarks: their timing arithmetic, and each script end to end on the tiny model (``--cpu-smoke``)."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.efficiency_stats import Median, median_to_target, pooled_estimate, ratio
from bench.engine_profile import kernel_kind
from bench.models import hydra_value, model_overrides
from bench.packing_parity import mean_interval
from bench.postgres import find_bindir
from bench.step_throughput import steady_tokens_per_s
from bench.sweep_results import MethodResult, best_of_first, paired_differences, paired_speedup
from bench.timing import (
    TrialTiming,
    assign_workers,
    overheads,
    steady_per_hour,
    steps_per_hour,
    time_to_target,
    trial_walls,
)

ROOT = Path(__file__).resolve().parent.parent


def timing(number: int, start: float, end: float, busy: float | None = None, state: str = "COMPLETE",
           value: float | None = None, worker: str = "") -> TrialTiming:
    return TrialTiming(number=number, start=start, end=end, state=state, value=value, busy=busy, worker=worker)


def test_overhead_charges_the_gap_before_the_next_trial_and_drops_benchmark_time() -> None:
    trials = [timing(0, 0.0, 9.0, busy=8.0), timing(1, 10.0, 18.0, busy=7.5),
              TrialTiming(2, 20.0, 26.0, "COMPLETE", busy=5.0, excluded=0.5)]
    assert trial_walls(trials) == [10.0, 10.0, 5.5]
    assert overheads(trials) == [2.0, 2.5, 0.5]


def test_steady_rate_leaves_out_the_first_trial_and_counts_complete_ones() -> None:
    trials = [timing(0, 0.0, 100.0), timing(1, 100.0, 136.0), timing(2, 136.0, 172.0, state="FAIL"),
              timing(3, 172.0, 208.0)]
    assert steady_per_hour(trials) == pytest.approx(2 / 108 * 3600)
    assert steady_per_hour(trials[:1]) is None


def test_workers_are_told_apart_by_label_else_by_timing() -> None:
    labelled = [timing(0, 0, 5, worker="a"), timing(1, 0, 6, worker="b"), timing(2, 5, 9, worker="a")]
    assert [[t.number for t in lane] for lane in assign_workers(labelled, 2)] == [[0, 2], [1]]
    unlabelled = [timing(0, 0, 5), timing(1, 0.1, 6), timing(2, 5.01, 9), timing(3, 6.02, 11), timing(4, 9.01, 12)]
    assert [[t.number for t in lane] for lane in assign_workers(unlabelled, 2)] == [[0, 2, 4], [1, 3]]


def test_steps_per_hour_counts_the_part_of_each_trial_inside_the_window() -> None:
    trials = [TrialTiming(0, 0.0, 10.0, "COMPLETE", steps=20), TrialTiming(1, 5.0, 25.0, "PRUNED", steps=10),
              TrialTiming(2, 30.0, 40.0, "COMPLETE", steps=20), TrialTiming(3, 1.0, 2.0, "FAIL")]
    # all of trial 0 (20 steps), half of trial 1 (5), none of trial 2, trial 3 reported no step
    assert steps_per_hour(trials, 0.0, 15.0) == pytest.approx(25 / 15 * 3600)
    assert steps_per_hour(trials[3:], 0.0, 15.0) is None


def test_time_to_target_sums_trial_times_in_order_until_a_complete_trial_reaches_it() -> None:
    trials = [timing(0, 0, 10, value=2.0), timing(1, 10, 13, state="PRUNED", value=1.0),
              timing(2, 13, 23, value=1.005)]
    assert time_to_target(trials, 1.01) == 23
    assert time_to_target(trials, 0.5) is None


@pytest.mark.parametrize(("to_target", "spent", "expected"), [
    ([10.0, None, 30.0], [50.0, 60.0, 70.0], Median(30.0, True)),  # one never reached: counted as longest
    ([10.0, None, None], [50.0, 60.0, 70.0], Median(60.0, False)),  # median never reached: what it spent bounds it
    ([None, None, None], [50.0, 40.0, 70.0], Median(50.0, False)),
    ([], [], None),
])
def test_median_to_target_is_exact_or_a_lower_bound(to_target: list[float | None], spent: list[float],
                                                    expected: Median | None) -> None:
    assert median_to_target(to_target, spent) == expected


def test_ratio_to_a_baseline_that_never_reached_the_target_is_an_upper_bound() -> None:
    assert ratio(Median(10.0, True), Median(40.0, True)) == "0.25"
    assert ratio(Median(10.0, True), Median(50.0, False)).startswith("< 0.20 ")
    assert ratio(Median(10.0, False), Median(40.0, True)).startswith("n/a")
    assert str(Median(12.34, True)) == "12.3" and str(Median(500.0, False)) == "not reached (> 500.0)"


def test_pooled_random_search_estimate_is_geometric_with_an_exact_interval() -> None:
    trials = [timing(i, 0, 2, value=1.0 if i % 10 == 0 else 3.0) for i in range(100)]  # p = 0.1, 2 s each
    est = pooled_estimate(trials, 1.5)
    assert est is not None and (est.hits, est.trials) == (10, 100)
    assert est.median_s == pytest.approx(2 * math.log(2) / -math.log(0.9))  # 6.6 trials
    assert est.low_s < est.median_s < est.high_s
    none = pooled_estimate(trials, 0.5)
    assert none is not None and none.hits == 0 and math.isinf(none.high_s)
    upper_p = 1 - 0.025 ** (1 / 100)  # Clopper-Pearson with no hit in 100
    assert none.low_s == pytest.approx(2 * math.log(2) / -math.log1p(-upper_p))
    assert pooled_estimate([], 1.0) is None


def test_best_loss_at_equal_trials_and_differences_at_equal_parameters() -> None:
    def trial(number: int, value: float, state: str = "COMPLETE", **params: object) -> TrialTiming:
        return TrialTiming(number, 0.0, 1.0, state, value=value, params=params)

    ours = [trial(2, 1.0, r=8), trial(0, 3.0, r=4), trial(1, 2.0, r=16), trial(3, 0.5, "PRUNED", r=32)]
    theirs = [trial(0, 3.5, r=4), trial(1, 1.5, r=16), trial(2, 9.0, "FAIL", r=8)]
    assert best_of_first(ours, 2) == 2.0 and best_of_first(ours, 4) == 1.0 and best_of_first(theirs, 1) == 3.5
    assert sorted(paired_differences(ours, theirs)) == [-0.5, 0.5]  # r=8 failed in theirs, r=32 pruned in ours


def sweep(key: str, *trials: tuple[int, float, float, str]) -> MethodResult:
    """A method's trials back to back: (rank, wall, train+eval, state) each, the first one the warm-up."""
    timings, start = [], 0.0
    for number, (r, wall, busy, state) in enumerate(trials):
        timings.append(TrialTiming(number, start, start + wall, state, busy=busy, params={"lora.r": r}))
        start += wall
    return MethodResult(key, timings, 0.0, start)


@pytest.mark.parametrize(("ours", "theirs", "trial_s", "expected"), [
    # One pair (r=4): 2 s of wall against 4 s. The warm-ups (r=8) and unpaired trials (r=16, r=32) do not count.
    ([(8, 9, 8, "COMPLETE"), (4, 2, 1.5, "COMPLETE"), (16, 1, 1, "COMPLETE")],
     [(8, 9, 8, "COMPLETE"), (4, 4, 2, "COMPLETE"), (32, 1, 1, "COMPLETE")], None, (1, 2.0)),
    # Scaled so theirs trains 6 s (x3): ours 1.5 * 3 + 0.5 of overhead = 5 s against 6 + 2 = 8 s.
    ([(8, 9, 8, "COMPLETE"), (4, 2, 1.5, "COMPLETE")], [(8, 9, 8, "COMPLETE"), (4, 4, 2, "COMPLETE")], 6.0, (1, 1.6)),
    # Sums over pairs, not a mean of ratios: (4 + 6) / (2 + 3).
    ([(8, 1, 1, "COMPLETE"), (4, 2, 2, "COMPLETE"), (16, 3, 3, "COMPLETE")],
     [(8, 1, 1, "COMPLETE"), (16, 6, 6, "COMPLETE"), (4, 4, 4, "COMPLETE")], None, (2, 2.0)),
    # A pruned trial is not the same work; no pair left.
    ([(8, 1, 1, "COMPLETE"), (4, 2, 2, "PRUNED")], [(8, 1, 1, "COMPLETE"), (4, 4, 4, "COMPLETE")], None, None),
])
def test_paired_speedup_compares_only_the_same_trials_after_warm_up(
        ours: list[tuple[int, float, float, str]], theirs: list[tuple[int, float, float, str]],
        trial_s: float | None, expected: tuple[int, float] | None) -> None:
    got = paired_speedup(sweep("ours", *ours), sweep("trainer", *theirs), trial_s)
    assert got == (pytest.approx(expected) if expected else None)


@pytest.mark.parametrize(("values", "expected"), [
    ([2.0], (2.0, 2.0, 2.0)),
    ([1.0, 2.0, 3.0], (2.0, 2.0 - 4.3027 / math.sqrt(3), 2.0 + 4.3027 / math.sqrt(3))),  # t(0.975, 2 df)
    ([0.0] * 40, (0.0, 0.0, 0.0)),
])
def test_mean_over_seeds_has_a_t_interval(values: list[float], expected: tuple[float, float, float]) -> None:
    assert mean_interval(values) == pytest.approx(expected, abs=1e-4)


def test_tokens_per_second_is_taken_after_the_warmup_steps() -> None:
    stamps = [1.0, 2.0, 2.5, 3.0]
    assert steady_tokens_per_s(stamps, [100, 100, 50, 50], warmup=1) == pytest.approx(200 / 2.0)
    assert steady_tokens_per_s(stamps[:1], [100], warmup=1) is None


@pytest.mark.parametrize("shape", ["135m", "1b", "8b", "tiny"])
def test_model_shapes_compose_into_valid_configs(shape: str) -> None:
    from sweeper import compose

    cfg, _ = compose.load([*model_overrides(shape, "/tmp/model.gguf", True), "search_space=none"])
    assert cfg.model.random_init
    assert cfg.model.source == "/tmp/model.gguf"
    if shape == "8b":
        assert cfg.model.config_overrides["head_dim"] == 128
        assert cfg.model.config_overrides["tie_word_embeddings"] is False


def test_hydra_values_quote_only_what_the_grammar_would_misread() -> None:
    assert hydra_value(True) == "true"
    assert hydra_value(3e-4) == "0.0003"
    assert hydra_value("all-linear") == "all-linear"
    assert hydra_value("a b") == "'a b'"
    assert hydra_value({"x": 1, "y": False}) == "{x:1,y:false}"


def run_bench(script: str, tmp_path: Path, *args: str) -> str:
    """``python bench/<script> --cpu-smoke`` as the README runs it; returns the report it wrote."""
    out = tmp_path / "report.md"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, f"bench/{script}", "--cpu-smoke", "--out", str(out),
                           "--workdir", str(tmp_path / "work"), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert "Command (from the repository root):" in text and "| torch |" in text
    return text


@pytest.mark.slow
def test_sweep_throughput_smoke(tmp_path: Path) -> None:
    text = run_bench("sweep_throughput.py", tmp_path)
    for label in ("ours (one process", "ours, checkpointing always on", "ours, workers sharing the GPU",
                  "A: Trainer.hyperparameter_search", "B: fresh process per trial"):
        assert label in text.split("## Results")[1].split("## Per trial")[0]
    assert "(warm-up)" in text
    assert re.search(r"Trials both ours and A ran with the same parameters \(\d+, warm-up excluded\): ours / A "
                     r"trials per hour on that same work \d+\.\d\dx", text)


@pytest.mark.slow
def test_step_throughput_smoke_packing_trains_on_the_same_tokens(tmp_path: Path) -> None:
    text = run_bench("step_throughput.py", tmp_path)
    lines = text.split("## Results")[1].splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.startswith("| shape |"))
    names = [c.strip() for c in lines[header].strip("|").split("|")]
    rows = [dict(zip(names, (c.strip() for c in ln.strip("|").split("|")), strict=True))
            for ln in lines[header + 2:] if ln.startswith("|")]
    losses = {r["method"]: float(r["mean train loss"]) for r in rows
              if r["method"].startswith("ours") and r["mean train loss"] != "n/a"}
    assert len(losses) == 22
    packed = losses["ours, train.packing=true"]
    assert losses["ours (padded per batch)"] == pytest.approx(packed, abs=2e-3)
    bf16 = "ours, upcast_unquantized=false"
    assert losses[bf16] == pytest.approx(losses[bf16 + " + packing"], abs=2e-2)
    # The kept dequantized base computes what bitsandbytes computes: the same losses, exactly, on the CPU.
    assert losses["ours, packing + base_cache=on"] == packed
    assert losses["ours, packing + upcast_unquantized=false + base_cache=on + fused_loss"] == losses[
        bf16 + " + packing"]
    fused = next(r for r in rows if r["method"] == "ours, packing + fused_loss=on")
    assert fused["note"] == "skipped: the fused loss: it needs CUDA"
    # --methods fastest: checkpointing decided as a trial decides it changes no number
    assert losses["ours, packing + base_cache=on + checkpointing auto"] == pytest.approx(packed, abs=2e-3)
    # TF32 is a CUDA matter: on the CPU it changes no number
    assert losses["ours, packing + base_cache=on + checkpointing auto + tf32"] == losses[
        "ours, packing + base_cache=on + checkpointing auto"]
    fast = next(r for r in rows if r["method"].startswith("ours, packing + upcast_unquantized=false + base_cache=on "
                                                          "+ checkpointing auto"))
    assert fast["note"].startswith("checkpointing auto: ")
    # --methods layers: the lean layers train as peft's and transformers' do (to float summation order)
    for method, loss in losses.items():
        if method.endswith(" + lean_layers") and method.removesuffix(" + lean_layers") in losses:
            assert loss == pytest.approx(losses[method.removesuffix(" + lean_layers")], abs=2e-4), method
    # --methods graphs: CUDA graphs are a CUDA matter; on the CPU the same loop runs
    graphed = [r for r in rows if r["method"].endswith(" + cuda_graphs")]
    assert len(graphed) == 3
    for r in graphed:
        assert r["note"].endswith("CUDA graphs not run: needs CUDA (the trial trains on the cpu)")
        assert losses[r["method"]] == losses[r["method"].removesuffix(" + cuda_graphs")]
    # --methods attention: bf16 attention is a CUDA matter too
    fp32 = "ours, packing + base_cache=on + checkpointing auto + tf32 + lean_layers"
    bf16_layers = "ours, packing + upcast_unquantized=false + base_cache=on + checkpointing auto + tf32 + lean_layers"
    for routed, plain in ((fp32 + " + bf16_attention", fp32), (fp32 + " + bf16_attention with sdpa's block mask", fp32),
                          (bf16_layers + " + bf16_attention", bf16_layers)):
        assert losses[routed] == losses[plain], routed


@pytest.mark.slow
def test_packing_parity_smoke_without_dropout_the_layouts_agree(tmp_path: Path) -> None:
    text = run_bench("packing_parity.py", tmp_path)
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.split("## Per seed")[1].splitlines()
            if line.startswith("| AdamW") or line.startswith("| SGD")]
    assert len(rows) == 6
    without_dropout = [(float(r[3]), float(r[4])) for r in rows if float(r[1]) == 0]
    assert len(without_dropout) == 2
    for packed, padded in without_dropout:
        assert packed == pytest.approx(padded, abs=2e-3)


@pytest.mark.slow
def test_sample_efficiency_smoke(tmp_path: Path) -> None:
    text = run_bench("sample_efficiency.py", tmp_path, "--jobs", "2")  # the jobs run the one-process path
    for label in ("TPE + successive halving", "random, no pruning", "TPE, no pruning"):
        assert label in text
    assert re.search(r"best eval loss any study reached \(\d", text)


@pytest.mark.slow
def test_scaling_smoke(tmp_path: Path) -> None:
    storage = "postgres" if find_bindir() else "journal"
    text = run_bench("scaling.py", tmp_path, "--storage", storage)
    assert ("PostgreSQL server on 127.0.0.1" in text) == (storage == "postgres")
    rows = [ln for ln in text.splitlines() if re.match(r"\| [12] \| \d+ complete", ln)]
    assert len(rows) == 2


@pytest.mark.slow
def test_slots_throughput_smoke(tmp_path: Path) -> None:
    text = run_bench("slots_throughput.py", tmp_path)
    # A loaded machine may finish too few trials in the short window for a rate: the rows must be there.
    assert re.search(r"\| one at a time \| \d+ \| (\d+|n/a) \| (1\.00x|n/a)", text)
    assert re.search(r"\| slots=2, engines auto \| \d+ \| (\d+|n/a) \| (\d+\.\d\dx|n/a)", text)
    assert re.search(r"Paired \(4 grid trials.*\): [1-4] pairs", text)


@pytest.mark.parametrize(("kernel", "op", "kind"), [
    ("_dropped_grad_a_kernel", "", "adapter A products"),
    ("void cutlass_kernel", "DroppedProductBackward", "adapter A products"),
    ("_step_kernel", "", "optimizer"),
    ("flash_fwd_kernel", "aten::_flash_attention_forward", "attention"),
    ("nvjet_tst_64x8", "aten::baddbmm", "adapter B products"),
    ("nvjet_tst_64x8", "aten::bmm", "adapter B products"),
    ("nvjet_tst_64x8", "aten::mm", "dense products"),
    ("multi_tensor_apply_kernel", "aten::_foreach_mul", "multi-tensor"),
    ("elementwise_kernel", "aten::_to_copy", "casts and copies"),
    ("elementwise_kernel", "aten::copy_", "casts and copies"),
    ("reduce_kernel", "aten::sum", "reductions"),
    ("index_elementwise_kernel", "aten::index", "gathers"),
    ("elementwise_kernel", "aten::add_", "element-wise"),
    ("some_kernel", "", "other"),
])
def test_kernels_are_told_apart_by_name_then_by_the_operator_that_launched_them(kernel: str, op: str,
                                                                                kind: str) -> None:
    assert kernel_kind(kernel, op).startswith(kind)


@pytest.mark.slow
def test_engine_profile_smoke(tmp_path: Path) -> None:
    text = run_bench("engine_profile.py", tmp_path)
    assert "| peft, one trial |" in text and re.search(r"\| 2 \| \d+\.\d+ \|", text)


def test_interpreter_lock_smoke_compares_the_engine_alone_beside_clerks_and_taking_turns(tmp_path: Path) -> None:
    text = run_bench("interpreter_lock.py", tmp_path)
    for label in ("| engine alone |", "| beside 1 clerk(s) |", "| beside 1 clerk(s), taking turns |"):
        assert label in text


@pytest.mark.slow
def test_step_profile_smoke_lists_host_operators_per_variant(tmp_path: Path) -> None:
    text = run_bench("step_profile.py", tmp_path)
    assert re.search(r"\| today \| (True|False) \| \d+\.\d+ \| n/a \| n/a \| n/a \|", text)
    for variant in ("today", "cache", "nockpt"):
        assert f"## {variant}\n\nHost operators (self time)" in text
    assert "aten::mm" in text


@pytest.mark.slow
def test_bf16_numerics_smoke_compares_each_run_with_today(tmp_path: Path) -> None:
    text = run_bench("bf16_numerics.py", tmp_path)
    assert re.search(r"\| today \| 0\.00% \| 0\.00% \| \d+\.\d+ \| \+0\.00% \|", text)
    assert re.search(r"\| autocast \| \d+\.\d\d% \|", text) and re.search(r"\| bf16 \| \d+\.\d\d% \|", text)
    assert re.search(r"\| attention \| 0\.00% \| 0\.00% \|", text)  # bf16 attention is a CUDA matter
    assert len(re.findall(r"^\| [123] \| ", text, flags=re.M)) == 3
