"""Benchmark 2: step throughput of one trial, our training loop against a plain Trainer + peft run.

For each model shape (random weights in the shape of SmolLM2-135M, Llama-3.2-1B, Llama-3-8B; NF4 base,
LoRA r=16 on all linear layers, gradient checkpointing, AdamW, cosine), the same adapter initialisation
and the same batches in the same order go through:

- ours: ``objectives.training.train_adapter`` (pads each micro-batch to its longest row);
- ours-packed: the same with ``train.packing=true`` (a step's examples share rows of data.max_length
  tokens, at most micro-batch rows per pass: the same examples per step in fewer passes);
- trainer: ``transformers.Trainer`` (its default fused AdamW) on the same peft model, computing like our
  loop (no autocast);
- trainer-bf16: the same with ``bf16=True`` (autocast), as the usual QLoRA recipe sets it;
- ours-bf16, ours-bf16-packed: our loop on a base loaded with ``model.upcast_unquantized=false``
  (embeddings, head and norms stay bf16, so activations are bf16), padded and packed (not in the
  default --methods).

Tokens/s counts real (non-padding) tokens over the steps after the warm-up steps; peak memory is the
most allocated CUDA memory during training (base weights included).

    PYTHONPATH=$PWD python bench/step_throughput.py --out $R/step_throughput.md \\
        --model-source $M
    PYTHONPATH=$PWD python bench/step_throughput.py --out $R/step_throughput_smoke.md --cpu-smoke
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from bench.common import base_parser, command_line, environment, make_workdir, quiet_logs
from bench.gpu import free_accelerator
from bench.models import SHAPE_NAMES, model_overrides
from bench.report import markdown_table, num, ratio, render_report, say, write_report
from bench.trainer import loop_rows, trainer_arguments, trainer_fixed_arguments

METHODS = ("ours", "ours-packed", "trainer", "trainer-bf16", "ours-bf16", "ours-bf16-packed")
LABELS = {"ours": "ours (padded per batch)", "ours-packed": "ours, train.packing=true",
          "trainer": "Trainer + peft", "trainer-bf16": "Trainer + peft, bf16 autocast",
          "ours-bf16": "ours, upcast_unquantized=false",
          "ours-bf16-packed": "ours, upcast_unquantized=false + packing"}
# micro-batch, steps per shape: the steps keep the 8B shape's share of the run affordable
SIZES = {"tiny": (2, 4), "135m": (16, 10), "1b": (16, 10), "8b": (16, 6)}
DEFAULT_METHODS = ("ours", "ours-packed", "trainer", "trainer-bf16")
# tokens/s, peak GiB, median step seconds, mean train loss
Measured = tuple[float | None, float | None, float | None, float | None]


@dataclass
class Run:
    """One method's run on one shape."""

    shape: str
    method: str
    tokens_per_s: float | None
    peak_gib: float | None
    step_s: float | None
    mean_loss: float | None
    note: str = ""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = base_parser(__doc__ or "")
    p.add_argument("--shapes", default="135m,1b,8b", help="comma-separated: 135m, 1b, 8b")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated subset of {', '.join(METHODS)}")
    p.add_argument("--steps", type=int, default=None, help="steps per run (default per shape: 10, 10, 6)")
    p.add_argument("--warmup-steps", type=int, default=2, help="first steps left out of tokens/s")
    p.add_argument("--batch", type=int, default=None, help="micro-batch size (default 16)")
    p.add_argument("--grad-accum", type=int, default=4, help="micro-batches per optimizer step")
    p.add_argument("--max-length", type=int, default=512, help="data.max_length: tokens per example at most")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default="all-linear")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.shapes, args.steps, args.warmup_steps, args.batch, args.max_length = "tiny", 4, 1, 2, 64
        args.methods = ",".join(METHODS)
    return args


def shape_overrides(args: argparse.Namespace, shape: str) -> list[str]:
    batch, steps = SIZES[shape]
    batch, steps = args.batch or batch, args.steps or steps
    out = [*model_overrides(shape, args.model_source, True), "search_space=none", f"train.max_steps={steps}",
           f"train.eval_every={steps}", f"train.micro_batch_size={batch}",
           f"train.grad_accum={args.grad_accum}", f"data.max_length={args.max_length}",
           f"lora.r={args.rank}", f"lora.targets={args.targets}", "optimizer.name=adamw", "optimizer.scheduler=cosine",
           "model.gradient_checkpointing=true"]  # Trainer + peft's recipe checkpoints: the identical configuration
    return out + (["data.max_eval_examples=8"] if shape == "tiny" else [])


def steady_tokens_per_s(stamps: Sequence[float], tokens: Sequence[int], warmup: int) -> float | None:
    """Tokens of the steps after ``warmup`` over the time from the end of step ``warmup`` to the last step's end.

    ``stamps[i]`` is when step i (0-based) ended.
    """
    warmup = max(1, warmup)
    if len(stamps) <= warmup:
        return None
    span = stamps[-1] - stamps[warmup - 1]
    return sum(tokens[warmup:len(stamps)]) / span if span > 0 else None


def median_step(stamps: Sequence[float], warmup: int) -> float | None:
    gaps = [b - a for a, b in zip(stamps[max(0, warmup - 1):], stamps[max(1, warmup):], strict=False)]
    return statistics.median(gaps) if gaps else None


def _peak_reset(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: Any) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def run_ours(base: Any, data: Any, cfg: Any, tokens: list[int], warmup: int, packing: bool) -> Measured:
    import dataclasses

    from objectives.training import train_adapter

    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, packing=packing))
    stamps: list[float] = []
    losses: list[float] = []

    def on_step(step: int, metrics: dict[str, float]) -> None:
        stamps.append(time.perf_counter())  # the loop has synchronised: it read the loss and grad norm
        losses.append(metrics["train_loss"])

    with base.adapter(cfg.lora, cfg.train.seed) as model:
        result = train_adapter(model, data, cfg.train, cfg.optimizer, base.device, base.tokenizer.pad_token_id,
                               on_step=on_step)
    peak = result.peak_memory_mb / 1024 if base.device.type == "cuda" else None
    return (steady_tokens_per_s(stamps, tokens, warmup), peak, median_step(stamps, warmup),
            statistics.fmean(losses))


def run_trainer(base: Any, cfg: Any, rows: list[dict[str, list[int]]], tokens: list[int], warmup: int,
                bf16: bool, workdir: Path) -> Measured:
    """A plain Trainer on the same peft model (same initialisation), reading the same rows in order."""
    import torch
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    from objectives.data import collate

    device = base.device
    stamps: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if device.type == "cuda":  # our loop synchronises every step too (it reads the loss)
                torch.cuda.synchronize(device)
            stamps.append(time.perf_counter())

    targs = TrainingArguments(**trainer_fixed_arguments(workdir / "trainer", cfg, device, bf16),
                              **trainer_arguments(cfg), logging_steps=1)
    with base.adapter(cfg.lora, cfg.train.seed) as model:
        trainer = Trainer(model=model, args=targs, train_dataset=rows,
                          data_collator=partial(collate, pad_id=base.tokenizer.pad_token_id), callbacks=[StepClock()])
        trainer.remove_callback(PrinterCallback)
        _peak_reset(device)
        trainer.train()
        peak = _peak_gib(device)
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        del trainer
    # accelerate may have wrapped the peft model's forward (autocast): start the next method from a fresh adapter
    base.release_adapter()
    return (steady_tokens_per_s(stamps, tokens, warmup), peak, median_step(stamps, warmup),
            statistics.fmean(losses) if losses else None)


def run_shape(args: argparse.Namespace, shape: str, methods: list[str], workdir: Path) -> tuple[list[Run], str]:
    """Every method on one shape; the bf16-stream methods get a second base, loaded after the first is gone."""
    from objectives.sources import weights_path
    from sweeper import compose
    from sweeper.launch import Resources

    cfg, _ = compose.load(shape_overrides(args, shape))
    start = time.perf_counter()
    weights_path(cfg.model)
    made = time.perf_counter() - start
    runs: list[Run] = []
    loaded: list[str] = []
    info = ""
    for upcast in (True, False):
        todo = [m for m in methods if m.startswith("ours-bf16") != upcast]
        if not todo:
            continue
        if not upcast:
            cfg, _ = compose.load([*shape_overrides(args, shape), "model.upcast_unquantized=false"])
        start = time.perf_counter()
        resources = Resources.load(cfg)
        loaded.append(f"{time.perf_counter() - start:.1f} s")
        base, data = resources.base, resources.data
        batches = loop_rows(data, cfg.train)
        accum = cfg.train.grad_accum
        tokens = [sum(len(r["input_ids"]) for rows in batches[i:i + accum] for r in rows)
                  for i in range(0, len(batches), accum)]
        padded = sum(len(rows) * max(len(r["input_ids"]) for r in rows) for rows in batches)
        info = (f"{SHAPE_NAMES[shape]}: random weights ready in {made:.1f} s (written once, then cached), data + "
                f"load + quantize {' and '.join(loaded)}; {cfg.train.max_steps} steps of {accum} micro-batches of "
                f"{cfg.train.micro_batch_size} examples, {statistics.fmean(tokens):.0f} real tokens per step on "
                "average, padding is "
                f"{100 * (1 - sum(tokens) / padded):.0f}% of the padded batches")
        for method in todo:
            say(f"[{time.strftime('%H:%M:%S')}] {shape} {method} ...")
            if method == "trainer-bf16" and base.device.type != "cuda":
                runs.append(Run(shape, method, None, None, None, None, "skipped: bf16 autocast is run on CUDA only"))
                continue
            if method.startswith("ours"):
                out = run_ours(base, data, cfg, tokens, args.warmup_steps, packing=method.endswith("packed"))
            else:
                rows = [r for batch in batches for r in batch]
                out = run_trainer(base, cfg, rows, tokens, args.warmup_steps, method == "trainer-bf16",
                                  workdir)
            runs.append(Run(shape, method, *out))
            free_accelerator()
        del base, data, resources
        free_accelerator()
    return runs, info


def fastest_ours(by: dict[tuple[str, str], float | None], shape: str) -> float | None:
    measured = [v for (s, m), v in by.items() if s == shape and m.startswith("ours") and v]
    return max(measured, default=None)


def build_report(args: argparse.Namespace, runs: list[Run], infos: list[str], env: dict[str, str],
                 command: str) -> str:
    ours = {r.shape: r.tokens_per_s for r in runs if r.method == "ours"}
    rows = [[SHAPE_NAMES[r.shape], LABELS[r.method], num(r.tokens_per_s, 0), ratio(r.tokens_per_s, ours.get(r.shape)),
             num(r.peak_gib, 2), num(r.step_s, 3), num(r.mean_loss, 4), r.note] for r in runs]
    table = markdown_table(["shape", "method", "tokens/s (real tokens)", "vs ours", "peak GiB", "step s (median)",
                            "mean train loss", "note"], rows)
    by = {(r.shape, r.method): r.tokens_per_s for r in runs}
    shapes = list(dict.fromkeys(r.shape for r in runs))
    goals = ["- ours / Trainer + peft (goal: never below 1.00x): " + ", ".join(
        f"{SHAPE_NAMES[s]} {ratio(by.get((s, 'ours')), by.get((s, 'trainer')))} (vs bf16 autocast "
        f"{ratio(by.get((s, 'ours')), by.get((s, 'trainer-bf16')))})" for s in shapes),
        "- packing / padded, our loop (goal >= 1.3x on real data): " + ", ".join(
        f"{SHAPE_NAMES[s]} {ratio(by.get((s, 'ours-packed')), by.get((s, 'ours')))} (bf16 stream "
        f"{ratio(by.get((s, 'ours-bf16-packed')), by.get((s, 'ours-bf16')))})" for s in shapes),
        "- fastest of ours / Trainer + peft: " + ", ".join(
        f"{SHAPE_NAMES[s]} {ratio(fastest_ours(by, s), by.get((s, 'trainer')))}" for s in shapes)]
    ran = [f"- {i}" for i in infos] + [
        f"- Tokens/s leaves out the first {args.warmup_steps} steps of each run (warm-up) and counts real tokens "
        "only; every method sees the same examples in the same order (the batches our loop draws with seed 0), "
        "the same LoRA initialisation (seed 0) and the same optimizer settings (AdamW, lr 2e-4, warmup 10%, "
        "cosine, clipping at 1.0).",
        "- The data are the stdlib pairs (short: most examples are under 100 tokens), so batches are far from the "
        f"{args.max_length}-token limit; tokens/s here is lower than with full-length synthetic batches.",
        "- Packing (train.packing=true) puts a step's examples into rows of data.max_length tokens (first fit by "
        "decreasing length), at most micro_batch_size rows per forward pass, so a pass never holds more tokens "
        "than a padded micro-batch could; position ids restart per example and transformers builds a "
        "block-diagonal mask from them for sdpa. The same examples and loss per step in fewer passes: mean "
        "train loss next to ours' checks that it trains on the same thing.",
        "- Trainer logs every step (logging_steps=1), as QLoRA recipes often do; a TrainerCallback stamps each "
        "step's end after a CUDA synchronisation (our loop synchronises every step when it reads the loss).",
        "- Peak memory: torch.cuda.max_memory_allocated during training, base weights included.",
        "- Random weights: objectives.sources.random_model_dir writes each shape once (16 GB for 8B) before loading.",
    ]
    return render_report("Benchmark 2: step throughput of one trial", env, command,
                         [("What ran", "\n".join(ran)), ("Results", table + "\n\n" + "\n".join(goals))])


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_logs()
    workdir = make_workdir(args, "steps")
    env, command = environment(), command_line()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"--methods: unknown {sorted(unknown)}; choose from {', '.join(METHODS)}")
    runs: list[Run] = []
    infos: list[str] = []
    for shape in [s.strip() for s in args.shapes.split(",") if s.strip()]:
        if shape not in SIZES:
            raise SystemExit(f"--shapes: unknown {shape!r}; choose from 135m, 1b, 8b")
        shape_runs, info = run_shape(args, shape, methods, workdir)
        runs += shape_runs
        infos.append(info)
        # each shape's table is written as soon as it exists: a later shape that fails loses only itself
        write_report(args.out, build_report(args, runs, infos, env, command), final=False)
    write_report(args.out, build_report(args, runs, infos, env, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
