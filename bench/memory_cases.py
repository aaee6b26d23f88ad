"""The configurations ``bench/memory_accuracy.py`` measures, and what the memory model predicts for each.

Pure: nothing is loaded or trained here; the project's memory and timing models are imported inside ``predict``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bench.models import SHAPES

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


def settings_for(case: Case, device: str = "cuda") -> Any:
    from objectives.shape import TrialSettings

    return TrialSettings(quant_type="nf4", double_quant=True, r=case.r, targets=case.targets, dropout=case.dropout,
                         optimizer=case.optimizer, micro_batch_size=case.batch, seq_len=case.seq,
                         gradient_checkpointing=case.checkpointing, padded=case.padded, device=device,
                         bf16_attention=True)  # the default the measured runs load with


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
