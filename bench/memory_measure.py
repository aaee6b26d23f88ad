"""One configuration of ``bench/memory_accuracy.py`` trained for real: its peak memory, step time and, when
asked, the blocks alive at the peak. torch and the project are imported inside."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.memory_cases import FULL_SHAPES, STEPS, Case, rows_for


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
