"""What a thread of Python bookkeeping costs an engine that launches many small kernels, with and without turns.

A stand-in for the slot engine launches ``--ops`` small tensor operations per step, then waits for the device;
beside it, ``--clerks`` threads keep books (pure Python, ``--section-ms`` per section) as a sweep's trials do
(sampling, logging, pruning decisions). Every tensor operation lets go of the interpreter's lock and takes it
back after; with a clerk running Python meanwhile, taking it back waits for the clerk's switch interval. Rows:
the engine alone, beside the clerks, and beside the clerks taking turns (:mod:`objectives.host_turns`).

    PYTHONPATH=$PWD python bench/interpreter_lock.py --out $R/interpreter_lock.md
    PYTHONPATH=$PWD python bench/interpreter_lock.py --cpu-smoke --out $R/interpreter_lock_smoke.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from collections.abc import Sequence

from bench.common import base_parser, command_line, environment
from bench.report import markdown_table, num, render_report, write_report


def busy_python(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        sum(i * i for i in range(200))


def measure(device: str, ops: int, steps: int, clerks: int, section_s: float, turns_on: bool) -> tuple[float, float]:
    """(median step seconds, bookkeeping sections per second) for one setting."""
    import torch

    from objectives.host_turns import HostTurns

    turns = HostTurns()
    turns.active = turns_on
    x = torch.zeros(256, device=device)
    stop = threading.Event()
    sections = [0]

    def clerk() -> None:
        while not stop.is_set():
            with turns.bookkeeping():
                busy_python(section_s)
            sections[0] += 1

    threads = [threading.Thread(target=clerk, daemon=True) for _ in range(clerks)]
    for t in threads:
        t.start()
    times = []
    start = time.perf_counter()
    try:
        for _ in range(steps + 1):
            began = time.perf_counter()
            with turns.engine():
                for _ in range(ops):
                    x.add_(1.0)
                with turns.waiting():
                    x.sum().item()  # the engine reads its losses: it waits for the device here
            times.append(time.perf_counter() - began)
    finally:
        stop.set()
        turns.stop()
        for t in threads:
            t.join()
    elapsed = time.perf_counter() - start
    return statistics.median(times[1:]), sections[0] / elapsed


def run(args: argparse.Namespace) -> str:
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu"
    ops, steps = (200, 3) if args.cpu_smoke else (args.ops, args.steps)
    rows = []
    settings = [("engine alone", 0, False), (f"beside {args.clerks} clerk(s)", args.clerks, False),
                (f"beside {args.clerks} clerk(s), taking turns", args.clerks, True)]
    alone = None
    for label, clerks, turns_on in settings:
        step, rate = measure(device, ops, steps, clerks, args.section_ms / 1000, turns_on)
        alone = alone or step
        rows.append([label, num(step * 1000, 1), num(step / ops * 1e6, 1), num(step / alone, 1) + "x",
                     num(rate, 0) if clerks else ""])
    table = markdown_table(["engine", "step ms", "µs per operation", "vs alone", "bookkeeping sections/s"], rows)
    note = (f"{ops} operations per step on {device}, median of {steps} steps; each clerk's section is "
            f"{args.section_ms} ms of Python; switch interval {sys.getswitchinterval() * 1000:.1f} ms.")
    return render_report("Interpreter lock: an engine beside bookkeeping threads", environment(), command_line(),
                         [("Step time", f"{note}\n\n{table}")])


def main(argv: Sequence[str] | None = None) -> int:
    p = base_parser(__doc__ or "")
    p.add_argument("--ops", type=int, default=6800, help="tensor operations per step (a 64-slot step launches ~6,800)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--clerks", type=int, default=1, help="bookkeeping threads")
    p.add_argument("--section-ms", type=float, default=2.0, help="Python work per bookkeeping section")
    args = p.parse_args(argv)
    write_report(args.out, run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
