"""Benchmark: predicted peak memory (``objectives.memory``) against the measured peak of real QLoRA steps.

For 24 configurations over three model shapes with random weights (SmolLM2-135M, Llama-3.2-1B,
Llama-3-8B), varying rank, target modules, sequence length, micro-batch, dropout, optimizer, padding and
gradient checkpointing, each configuration trains a fresh adapter for a few steps through the project's
own path (``objectives.base.ResidentBase`` with an NF4 base, ``objectives.training.train_adapter``) on
synthetic token rows of exactly the given length, and ``torch.cuda.max_memory_allocated`` over those
steps is compared with ``objectives.memory.estimate(...).allocated``. Each shape's base is loaded once and
shared by its configurations; gradient checkpointing is switched on the loaded base.

The goal: median absolute error under 10%, and no configuration under-predicted by more than 15%.

    PYTHONPATH=$PWD python bench/memory_accuracy.py --out $R/memory_accuracy.md   # ~2 min on one H200
    PYTHONPATH=$PWD python bench/memory_accuracy.py --out $R/m.md --dry           # predictions only
    PYTHONPATH=$PWD python bench/memory_accuracy.py --out $R/m.md --cpu-smoke     # 2 tiny configs, CPU

Without ``--model-source`` the shapes are built on a generated Llama config and a three-token tokenizer
(the rows are synthetic), so nothing has to be downloaded or converted, and the script imports no more
than torch, transformers, tokenizers, peft, bitsandbytes and omegaconf (no Hydra, Optuna or MLflow).
Writing the random 8B weights once (16 GB) and loading them in NF4 takes ~20 s on the H200.

``--explain`` records the CUDA allocator's history for the first configuration of each shape and lists
the largest blocks alive at the peak, with the Python line that allocated each.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence

from bench.common import base_parser, command_line, environment, make_workdir, quiet_logs
from bench.gpu import free_accelerator
from bench.memory_cases import CASES, SMOKE_CASES, STEPS, Case, Result, predict
from bench.memory_measure import load_base, measure, write_source
from bench.models import SHAPE_NAMES
from bench.report import markdown_table, num, render_report, say, write_report

GOAL_MEDIAN, GOAL_WORST_UNDER = 10.0, -15.0


# ---------------------------------------------------------------------------------------------------------------
# Measurement (torch inside)


def run_cases(cases: Sequence[Case], args: argparse.Namespace, device_name: str) -> tuple[list[Result], list[str]]:
    import torch

    device = torch.device(device_name)
    workdir = make_workdir(args, "memory")
    source = args.model_source or str(write_source(workdir / "source"))
    results, notes = [], []
    for shape in dict.fromkeys(c.shape for c in cases):
        start = time.perf_counter()
        base = load_base(shape, source, workdir / "cache", device)
        say(f"{shape}: base loaded in {time.perf_counter() - start:.1f}s")
        for i, case in enumerate(c for c in cases if c.shape == shape):
            res = predict(case, "cuda" if device.type == "cuda" else "cpu")
            start = time.perf_counter()
            text = ""
            try:
                res.measured, res.reserved, res.step_s, text = measure(base, case, args.explain and i == 0)
            except torch.cuda.OutOfMemoryError as e:
                res.note = f"out of memory: {str(e).splitlines()[0][:120]}"
            if text:
                notes.append(f"{case.label()}:\n{text}")
            results.append(res)
            say(f"  {case.label():<60} predicted {gib(res.predicted)} measured {gib(res.measured)} "
                f"error {fmt_pct(res.error_pct)} ({time.perf_counter() - start:.1f}s)")
        base.release_adapter()
        del base
        free_accelerator()
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        outside = total - free - torch.cuda.memory_reserved(device)
        notes.append(f"device memory used outside torch's allocator (CUDA context, cuBLAS/bitsandbytes "
                     f"libraries) at the end: {outside / 2**20:.0f} MiB")
    return results, notes


# ---------------------------------------------------------------------------------------------------------------
# Report (pure)


def gib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f}"


def fmt_pct(p: float | None) -> str:
    return "n/a" if p is None else f"{p:+.1f}%"


def summary(results: Sequence[Result]) -> list[str]:
    errors = [r.error_pct for r in results if r.error_pct is not None]
    if not errors:
        return ["no configuration was measured (no CUDA device): predictions only"]
    median_abs = statistics.median(abs(e) for e in errors)
    worst = min(results, key=lambda r: r.error_pct if r.error_pct is not None else float("inf"))
    assert worst.error_pct is not None
    ok = median_abs < GOAL_MEDIAN and worst.error_pct >= GOAL_WORST_UNDER
    return [f"median absolute error: {median_abs:.1f}% (goal < {GOAL_MEDIAN:g}%)",
            f"worst under-prediction: {fmt_pct(worst.error_pct)} ({worst.case.label()}; goal no worse than "
            f"{GOAL_WORST_UNDER:g}%)" if worst.error_pct < 0 else "no configuration is under-predicted",
            f"largest over-prediction: {fmt_pct(max(errors))}",
            f"goal {'met' if ok else 'NOT met'} over {len(errors)} configurations"]


def table(results: Sequence[Result]) -> str:
    rows = [(r.case.label(), gib(r.predicted), gib(r.measured), fmt_pct(r.error_pct), r.peak_at, gib(r.reserved),
             num(r.step_s, 3), num(r.predicted_step_s, 3), r.note)
            for r in results]
    return markdown_table(["config", "predicted GiB", "measured GiB", "error %", "predicted peak at",
                           "reserved GiB", "s/step", "predicted s/step", "note"], rows)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = base_parser(__doc__ or "")
    p.add_argument("--dry", action="store_true", help="predictions only: load nothing, train nothing")
    p.add_argument("--shapes", default="135m,1b,8b", help="comma-separated subset of 135m, 1b, 8b")
    p.add_argument("--explain", action="store_true",
                   help="list the largest blocks alive at the peak for the first configuration of each shape")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_logs()
    shapes = {s.strip() for s in args.shapes.split(",")}
    cases = SMOKE_CASES if args.cpu_smoke else tuple(c for c in CASES if c.shape in shapes)
    notes: list[str] = []
    if args.dry:
        results = [predict(c) for c in cases]
    else:
        import torch

        if not args.cpu_smoke and not torch.cuda.is_available():
            say("no CUDA device: use --dry for predictions or --cpu-smoke to check the wiring")
            return 2
        results, notes = run_cases(cases, args, "cpu" if args.cpu_smoke else "cuda")
    if args.cpu_smoke:
        notes.insert(0, "CPU smoke run: the CPU has no max_memory_allocated, so nothing is compared; it only "
                        "checks that bases load, adapters train and the report is written")
    shapes_text = ", ".join(f"{s} = {SHAPE_NAMES.get(s, s)}" for s in dict.fromkeys(c.shape for c in cases))
    sections = [("Summary", "\n".join(f"- {line}" for line in summary(results))),
                ("Configurations", f"Shapes: {shapes_text}. NF4 base with double quantization, bf16 compute, "
                 f"sdpa, random weights; {STEPS} optimizer steps per configuration on synthetic rows of exactly "
                 "the given length. Error = (predicted - measured) / measured.\n\n" + table(results))]
    if notes:
        sections.append(("Notes", "\n\n".join(f"```\n{n}\n```" if "\n" in n else f"- {n}" for n in notes)))
    write_report(args.out, render_report("Predicted vs measured peak memory", environment(), command_line(),
                                         sections))
    return 0


if __name__ == "__main__":
    sys.exit(main())
