"""Where a slot engine's step goes: step time and tokens/s at K slots, against one trial on the peft path.

Trials vary as the default space varies them (rank, targets, optimizer, dropout); every slot stays busy
(a finished trial's slot is refilled at once). Step times are the median over ``--steps`` steps after
``--warmup``; nvidia-smi's busy fraction over each K's steps says how much of the step the GPU works.

    PYTHONPATH=$PWD python bench/engine_profile.py --model-source $M --slots 1,8,16,32 --out $R/engine.md
    PYTHONPATH=$PWD python bench/engine_profile.py --cpu-smoke --out $R/engine_smoke.md
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from bench.common import base_parser, command_line, environment
from bench.gpu import GpuSampler
from bench.models import model_overrides
from bench.report import markdown_table, num, percent, render_report, say, write_report

VARIANTS = [
    {"r": 8, "targets": "qk", "name": "adamw", "lr": 1e-3},
    {"r": 32, "targets": "all-linear", "name": "sgd", "lr": 3e-2},
    {"r": 16, "targets": "qkvo", "name": "adamw", "lr": 5e-4},
    {"r": 64, "targets": "qkv", "name": "sgd", "lr": 1e-2},
]


def trial_config(cfg: Any, i: int, steps: int, eval_every: int = 0) -> Any:
    """Trial ``i``'s config: the ``i``-th variant, ``steps`` long, evaluated every ``eval_every`` steps (0: at the
    end alone)."""
    v = VARIANTS[i % len(VARIANTS)]
    return dataclasses.replace(
        cfg, lora=dataclasses.replace(cfg.lora, r=v["r"], targets=v["targets"], dropout=0.05),
        optimizer=dataclasses.replace(cfg.optimizer, name=v["name"], lr=v["lr"]),
        train=dataclasses.replace(cfg.train, seed=i, max_steps=steps, eval_every=eval_every or steps))


class Timer:
    """Records when each step of any slot ends (the engine calls every slot's hook in the same tick)."""

    def __init__(self) -> None:
        self.ticks: list[float] = []
        self.tokens: list[float] = []

    def hooks(self) -> Any:
        from objectives.objective import RunHooks

        timer = self

        class Hooks(RunHooks):
            def on_step(self, step: int, metrics: dict[str, float]) -> None:
                now = time.perf_counter()
                if not timer.ticks or now - timer.ticks[-1] > 1e-3:
                    timer.ticks.append(now)
                    timer.tokens.append(0.0)
                timer.tokens[-1] += metrics["tokens_per_s"]

        return Hooks()


def measure_engine(base: Any, data: Any, cfg: Any, slots: int, steps: int, warmup: int, gpu: GpuSampler,
                   profile_steps: int = 0, top: int = 15, eval_every: int = 0) -> dict[str, Any]:
    """The engine runs in this thread (``start=False``), so that torch.profiler, which records the thread that
    started it, sees its passes; with ``profile_steps``, that many steps after the timed ones are profiled."""
    import torch

    from objectives.engine import SlotEngine

    engine = SlotEngine(base, data, slots=slots, r_max=64, eval_batch_size=cfg.train.micro_batch_size,
                        fused_loss=cfg.train.fused_loss, start=False)
    timer = Timer()
    futures = [engine.submit(trial_config(cfg, i, warmup + steps + profile_steps + 2, eval_every), timer.hooks())
               for i in range(slots)]
    profiled: dict[str, Any] = {}
    try:
        while len(timer.ticks) < warmup + steps + 1 and not all(f.done() for f in futures):
            engine.advance()
        timed, timed_end = list(timer.ticks), time.time()
        if profile_steps:
            profiled = profile_ticks(engine, profile_steps, top)
        while not all(f.done() for f in futures):
            engine.advance()
        for f in futures:
            f.result()
    finally:
        engine.close()
    gaps = [b - a for a, b in zip(timed[warmup:], timed[warmup + 1:], strict=False)]
    step = statistics.median(gaps) if gaps else float("nan")
    mean = (timed[-1] - timed[warmup]) / len(gaps) if gaps else float("nan")  # evaluating steps included
    tokens = statistics.median(timer.tokens[warmup:len(timed)]) if timer.tokens[warmup:] else float("nan")
    busy = gpu.busy_fraction(timed_end - (timed[-1] - timed[warmup]), timed_end) if len(timed) > warmup else None
    return {"slots": slots, "step": step, "mean_step": mean, "tokens_per_s": tokens, "busy": busy, **profiled,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None}


KINDS = [  # (kind, fragments of the kernel's name, fragments of the name of the operator that launched it)
    ("adapter A products (Triton: product, gradients of input and A)", ("_dropped_",), ("DroppedProduct",)),
    ("optimizer (Triton)", ("_step_kernel",), ()),
    ("attention", ("flash",), ("flash", "attention")),
    ("adapter B products (bmm, TF32)", (), ("bmm",)),
    ("dense products (the base's in bf16, the head's in TF32)", (), ("mm", "linear", "matmul")),
    ("multi-tensor operations (gradient norms, zeroing)", (), ("_foreach",)),
    ("casts and copies", (), ("copy", "clone")),
    ("loss", (), ("softmax", "nll", "cross_entropy")),
    ("reductions (norms, sums)", (), ("sum", "mean", "norm", "amax")),
    ("gathers, scatters, concatenations", (), ("index", "gather", "scatter", "embedding", "cat", "stack", "where")),
    ("element-wise arithmetic", (), ("aten::",)),
]


def kernel_kind(kernel: str, op: str) -> str:
    """What a kernel does, from its name and the name of the operator that launched it ("" where none did)."""
    for kind, in_kernel, in_op in KINDS:
        if any(f in kernel for f in in_kernel) or any(f in op for f in in_op):
            return kind
    return "other"


def time_by_kind(events: Any) -> dict[str, float]:
    """Kernel microseconds per :func:`kernel_kind` over torch.profiler's ``events()``: each kernel counted once,
    under the innermost operator that launched it, or by its name alone where no operator did (Triton's)."""
    from collections import Counter

    from torch.autograd import DeviceType

    by_name: Counter[str] = Counter()
    for e in events:
        if e.device_type == DeviceType.CUDA:
            by_name[e.name] += e.time_range.end - e.time_range.start
    kinds: Counter[str] = Counter()
    for e in events:
        if e.device_type == DeviceType.CPU:
            for k in e.kernels:
                kinds[kernel_kind(k.name, e.name)] += k.duration
                by_name[k.name] -= k.duration
    for name, left in by_name.items():
        if left > 0:
            kinds[kernel_kind(name, "")] += left
    return dict(kinds)


def profile_ticks(engine: Any, steps: int, top: int) -> dict[str, Any]:
    """``steps`` engine steps under torch.profiler: the GPU's kernel time per step, the top kernels and host
    operators (as bench/step_profile.py lists them for one trial)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from bench.step_profile import top_rows

    cuda = engine.base.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            engine.advance()
        if cuda:
            torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / steps
    events = prof.key_averages()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    host = [e for e in events if e.device_type == DeviceType.CPU]
    kernel_s = sum(e.self_device_time_total for e in kernels) / 1e6 / steps if cuda else None
    kinds = sorted(time_by_kind(prof.events()).items(), key=lambda kv: -kv[1]) if kernel_s else []
    per_step = [(kind, us / 1e6 / steps) for kind, us in kinds]
    return {"profiled_wall": wall, "kernel_s": kernel_s,
            "kinds": [[kind, num(s * 1e3, 2), percent(s / (kernel_s or 1))] for kind, s in per_step],
            "kernels": top_rows(kernels, "self_device_time_total", steps, top) if cuda else [],
            "host": top_rows(host, "self_cpu_time_total", steps, top)}


def measure_peft(base: Any, data: Any, cfg: Any, steps: int, warmup: int) -> dict[str, Any]:
    from objectives.objective import run_recipe

    timer = Timer()
    run_recipe(trial_config(cfg, 0, warmup + steps + 2), base, data, 2**62, timer.hooks())
    base.release_adapter()
    gaps = [b - a for a, b in zip(timer.ticks[warmup:], timer.ticks[warmup + 1:], strict=False)]
    return {"slots": "peft, one trial", "step": statistics.median(gaps), "mean_step": statistics.mean(gaps),
            "tokens_per_s": statistics.median(timer.tokens[warmup:]), "peak_gib": None}


def width(result: dict[str, Any]) -> int:
    """The trials a measured step carries: its slots, or 1 for one trial on peft."""
    return result["slots"] if isinstance(result["slots"], int) else 1


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = base_parser(__doc__ or "")
    p.add_argument("--shape", default="135m", choices=["135m", "1b", "8b"])
    p.add_argument("--weights", choices=["real", "random"], default="real")
    p.add_argument("--slots", default="1,8,16,32")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--checkpointing", choices=["true", "false"], default="false")
    p.add_argument("--profile", type=int, default=0,
                   help="steps profiled at each slot count after the timed ones (0: none)")
    p.add_argument("--eval-every", type=int, default=0,
                   help="trials evaluate every this many steps, as a sweep's do (0: at their end alone)")
    p.add_argument("--top", type=int, default=15, help="kernels and host operators listed per profile")
    p.add_argument("--extra", default="", help="more Hydra overrides, space-separated "
                                               "(e.g. model.upcast_unquantized=false)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from objectives.base import ResidentBase, pick_device
    from objectives.data import prepare
    from sweeper import compose

    if args.cpu_smoke:
        overrides = [*model_overrides("tiny", None, True), "data.max_length=64", "data.max_eval_examples=8"]
        args.slots, args.steps, args.warmup = "1,2", 2, 1
    else:
        overrides = model_overrides(args.shape, args.model_source, args.weights == "random")
    cfg, _ = compose.load([*overrides, "search_space=none", "output_dir=/dev/null", *args.extra.split()])
    base = ResidentBase(cfg.model, pick_device(cfg.train.device))
    base.use_checkpointing(args.checkpointing == "true")
    data = prepare(cfg.data, base.tokenizer, cfg.model.cache_path)
    with GpuSampler() as gpu:
        results = [measure_peft(base, data, cfg, args.steps, args.warmup)]
        for k in [int(k) for k in args.slots.split(",")]:
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            results.append(measure_engine(base, data, cfg, k, args.steps, args.warmup, gpu, args.profile, args.top,
                                          args.eval_every))
            say(f"slots={k}: step {results[-1]['step']:.3f} s, {results[-1]['tokens_per_s']:.0f} tokens/s")
    one = results[0]["step"]
    rows = [[str(r["slots"]), num(r["step"], 3), num(r["mean_step"], 3), num(width(r) / r["mean_step"], 1),
             num(r["tokens_per_s"], 0), percent(r.get("busy")), num(r.get("peak_gib"), 1),
             num(one * width(r) / r["step"], 1)] for r in results]
    body = markdown_table(["slots", "step s", "mean step s (evaluations in)", "trial-steps/s (evaluations in)",
                           "tokens/s", "GPU busy", "peak GiB", "trial-steps/s vs peft"], rows)
    sections = [("Step time by slots", body)]
    for r in results:
        if "host" in r:
            head = ["name", "ms per step", "calls per step"]
            kernels = f"GPU kernels: {num(r['kernel_s'], 3)} s per step\n\n" + markdown_table(
                ["kind", "ms per step", "share"], r["kinds"]) + "\n\n" + markdown_table(head, r["kernels"]) + \
                "\n\n" if r["kernels"] else ""
            sections.append((f"{r['slots']} slots under torch.profiler: {num(r['profiled_wall'], 3)} s per step",
                             kernels + "Host operators (self time)\n\n" + markdown_table(head, r["host"])))
    write_report(args.out, render_report("Slot engine step profile", environment(), command_line(argv), sections))
    return 0


if __name__ == "__main__":
    sys.exit(main())
