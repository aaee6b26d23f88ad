"""Benchmark: predicted peak memory (``objectives.memory``) against the measured peak of real QLoRA steps.

For 24 configurations over three model shapes with random weights (SmolLM2-135M, Llama-3.2-1B,
Llama-3-8B), varying rank, target modules, sequence length, micro-batch, dropout, optimizer, padding and
gradient checkpointing, each configuration trains a fresh adapter for a few steps through the project's
own path (``objectives.base.ResidentBase`` with an NF4 base, ``objectives.training.train_adapter``) on
synthetic token rows of exactly the given length, and ``torch.cuda.max_memory_allocated`` over those
steps is compared with ``objectives.memory.estimate(...).allocated``. Each shape's base is loaded once and
shared by its configurations; gradient checkpointing is switched on the loaded base.

The goal: median absolute error under 10%, and no configuration under-predicted by more than 15%.

    PYTHONPATH=$PWD python bench/memory_accuracy.py --out results/memory_accuracy.md   # ~2 min on one H200
    PYTHONPATH=$PWD python bench/memory_accuracy.py --out /tmp/m.md --dry              # predictions only
    PYTHONPATH=$PWD python bench/memory_accuracy.py --out /tmp/m.md --cpu-smoke        # 2 tiny configs, CPU

Without ``--model-source`` the shapes are built on a generated Llama config and a three-token tokenizer
(the rows are synthetic), so nothing has to be downloaded or converted, and the script imports no more
than torch, transformers, tokenizers, peft, bitsandbytes and omegaconf (no Hydra, Optuna or MLflow).
Writing the random 8B weights once (16 GB) and loading them in NF4 takes ~20 s on the H200.

``--explain`` records the CUDA allocator's history for the first configuration of each shape and lists
the largest blocks alive at the peak, with the Python line that allocated each.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench.common import (
    SHAPE_NAMES,
    SHAPES,
    base_parser,
    command_line,
    environment,
    free_accelerator,
    make_workdir,
    markdown_table,
    num,
    quiet_logs,
    render_report,
    say,
    write_report,
)

# Complete Llama configs (the generated source is a default LlamaConfig, not SmolLM2's).
FULL_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 1024, "tie_word_embeddings": True},
    "135m": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
             "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152, "tie_word_embeddings": True},
    "1b": SHAPES["1b"],
    "8b": SHAPES["8b"],
}
STEPS = 3
"""Optimizer steps per configuration: the first creates the optimizer state, the later ones carry it."""
GOAL_MEDIAN, GOAL_WORST_UNDER = 10.0, -15.0


@dataclass(frozen=True)
class Case:
    """One measured configuration."""

    shape: str
    r: int
    targets: str
    seq: int
    batch: int
    checkpointing: bool
    dropout: float = 0.05
    optimizer: str = "adamw"
    padded: bool = False
    """Rows of two lengths in every batch, so the model gets an attention mask (and sdpa a float bias)."""

    def label(self) -> str:
        extras = [f"dropout {self.dropout:g}" if self.dropout != 0.05 else "",
                  self.optimizer if self.optimizer != "adamw" else "", "padded" if self.padded else ""]
        extra = ", ".join(e for e in extras if e)
        return (f"{self.shape} r{self.r} {self.targets} {self.batch}x{self.seq} "
                f"ckpt {'on' if self.checkpointing else 'off'}" + (f" ({extra})" if extra else ""))


CASES: tuple[Case, ...] = (
    Case("135m", 8, "qkvo", 512, 8, True),
    Case("135m", 8, "qkvo", 512, 8, False),
    Case("135m", 64, "all-linear", 512, 8, True),
    Case("135m", 64, "all-linear", 512, 8, False),
    Case("135m", 16, "qk", 2048, 4, True, padded=True),
    Case("135m", 16, "all-linear", 1024, 16, True, dropout=0.0),
    Case("135m", 16, "mlp", 256, 32, False, optimizer="sgd"),
    Case("135m", 4, "qv", 128, 1, False),
    Case("1b", 16, "all-linear", 512, 16, True),
    Case("1b", 16, "all-linear", 512, 8, False),
    Case("1b", 8, "qkvo", 2048, 4, True, padded=True),
    Case("1b", 64, "qkvo", 1024, 4, False),
    Case("1b", 32, "mlp", 256, 16, True, dropout=0.0),
    Case("1b", 8, "qk", 4096, 2, True),
    Case("1b", 16, "all-linear", 1024, 2, False, optimizer="sgd", padded=True),
    Case("1b", 4, "qv", 512, 1, False),
    Case("8b", 16, "all-linear", 1024, 4, True),
    Case("8b", 16, "all-linear", 1024, 4, False),
    Case("8b", 8, "qkvo", 2048, 2, True, padded=True),
    Case("8b", 64, "all-linear", 512, 8, True),
    Case("8b", 8, "qv", 256, 16, False, dropout=0.0),
    Case("8b", 32, "mlp", 4096, 1, True),
    Case("8b", 16, "qkvo", 512, 2, False, optimizer="sgd"),
    Case("8b", 4, "qk", 128, 1, False),
)
SMOKE_CASES: tuple[Case, ...] = (
    Case("tiny", 4, "qkvo", 32, 2, True),
    Case("tiny", 8, "all-linear", 48, 2, False, padded=True),
)


@dataclass
class Result:
    case: Case
    predicted: int
    peak_at: str
    measured: int | None = None
    reserved: int | None = None
    step_s: float | None = None
    predicted_step_s: float | None = None
    note: str = ""

    @property
    def error_pct(self) -> float | None:
        return None if self.measured is None else 100.0 * (self.predicted - self.measured) / self.measured


# ---------------------------------------------------------------------------------------------------------------
# Predictions (pure)


def settings_for(case: Case, device: str = "cuda") -> Any:
    from objectives.shape import TrialSettings

    return TrialSettings(quant_type="nf4", double_quant=True, r=case.r, targets=case.targets, dropout=case.dropout,
                         optimizer=case.optimizer, micro_batch_size=case.batch, seq_len=case.seq,
                         gradient_checkpointing=case.checkpointing, padded=case.padded, device=device)


def predict(case: Case, device: str = "cuda") -> Result:
    from objectives.memory import estimate
    from objectives.timing import step_seconds

    settings = settings_for(case, device)
    est = estimate(FULL_SHAPES[case.shape], settings)
    return Result(case, est.allocated, est.peak_at, predicted_step_s=step_seconds(FULL_SHAPES[case.shape], settings,
                                                                                  device))


def rows_for(case: Case, vocab: int, seed: int) -> list[dict[str, list[int]]]:
    """``batch`` rows, so every step's micro-batch holds all of them; padded cases mix two lengths."""
    import random

    rng = random.Random(seed)
    lengths = [case.seq - (8 if case.padded and i % 2 else 0) for i in range(case.batch)]
    rows = []
    for n in lengths:
        ids = [rng.randrange(3, vocab) for _ in range(n)]
        rows.append({"input_ids": ids, "labels": list(ids)})
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Measurement (torch inside)


def write_source(path: Path) -> Path:
    """A loadable model directory without weights: a default Llama config and a three-token tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    if (path / "config.json").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1, "<unk>": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                            unk_token="<unk>").save_pretrained(path)
    LlamaConfig(**FULL_SHAPES["135m"]).save_pretrained(path)
    return path


def load_base(shape: str, source: str, cache: Path, device: Any) -> Any:
    from objectives.base import ResidentBase
    from objectives.config import ModelConfig

    cfg = ModelConfig(source=source, random_init=True, config_overrides=dict(FULL_SHAPES[shape]), quant_type="nf4",
                      double_quant=True, gradient_checkpointing=True, cache_dir=str(cache))
    return ResidentBase(cfg, device)


def set_checkpointing(model: Any, on: bool) -> None:
    if on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def measure(base: Any, case: Case, explain: bool) -> tuple[int | None, int | None, float | None, str]:
    """Train ``STEPS`` steps; returns (peak allocated, peak reserved, median step seconds, explanation)."""
    import torch

    from objectives.config import LoraConfig, OptimizerConfig, TrainConfig
    from objectives.data import TokenizedSplits
    from objectives.training import train_adapter

    cuda = base.device.type == "cuda"
    set_checkpointing(base.model, case.checkpointing)
    vocab = FULL_SHAPES[case.shape]["vocab_size"]
    data = TokenizedSplits(train=rows_for(case, vocab, 0), eval=rows_for(replace(case, batch=1), vocab, 1),
                           max_length=case.seq)
    # padded micro-batches: the cases name padded and unpadded batches themselves
    train = TrainConfig(max_steps=STEPS, micro_batch_size=case.batch, eval_every=STEPS, seed=0, packing=False)
    optim = OptimizerConfig(name=case.optimizer, lr=1e-4 if case.optimizer == "adamw" else 1e-2)
    stamps: list[float] = []
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()  # so the reserved peak is this configuration's own
        if explain:
            torch.cuda.memory._record_memory_history(max_entries=200_000, stacks="python")
    with base.adapter(LoraConfig(r=case.r, targets=case.targets, dropout=case.dropout), seed=0) as model:
        result = train_adapter(model, data, train, optim, base.device, base.tokenizer.pad_token_id,
                               on_step=lambda step, metrics: stamps.append(time.perf_counter()))
    text = ""
    if cuda and explain:
        try:
            text = explain_peak(torch.cuda.memory._snapshot())
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)
    reserved = torch.cuda.max_memory_reserved(base.device) if cuda else None
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    step_s = statistics.median(gaps) if gaps else None
    measured = int(result.peak_memory_mb * 2**20) if cuda else None
    return measured, reserved, step_s, text


def explain_peak(snapshot: dict[str, Any], top: int = 14) -> str:
    """The largest traced blocks alive at the peak of the allocator's history, with where each came from."""
    events = snapshot.get("device_traces", [[]])[0]
    live: dict[int, dict[str, Any]] = {}
    cur = peak = 0
    at_peak: list[dict[str, Any]] = []
    for ev in events:
        if ev["action"] == "alloc":
            live[ev["addr"]] = ev
            cur += ev["size"]
            if cur > peak:
                peak, at_peak = cur, list(live.values())
        elif ev["action"] in ("free_requested", "free_completed") and ev["addr"] in live:
            cur -= live.pop(ev["addr"])["size"]
    at_peak.sort(key=lambda e: -e["size"])
    lines = [f"traced peak {peak / 2**30:.3f} GiB above the blocks allocated before recording; largest:"]
    for ev in at_peak[:top]:
        lines.append(f"  {ev['size'] / 2**20:10.1f} MiB  {_origin(ev.get('frames', []))}")
    return "\n".join(lines)


def _origin(frames: Sequence[dict[str, Any]]) -> str:
    """The innermost Python frames outside torch's own autograd plumbing."""
    keep = [f for f in frames if f.get("filename", "").endswith(".py")
            and "torch/autograd" not in f["filename"] and "torch/utils/_" not in f["filename"]]
    return " <- ".join(f"{Path(f['filename']).name}:{f['line']} {f['name']}" for f in keep[:3]) or "?"


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
