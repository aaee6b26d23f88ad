"""Shared test settings: offline, a tiny random 4-bit model, short trials."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent

# A 2-layer Llama with real NF4 layers; trials of two steps.
TINY = ["model=tiny_random", "train.max_steps=2", "train.eval_every=1", "train.micro_batch_size=2",
        "data.max_length=64", "data.max_eval_examples=8"]


@pytest.fixture
def tiny_args(tmp_path: Path) -> list[str]:
    return [*TINY, f"output_dir={tmp_path}"]


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """``python -m sweeper ARGS`` in a child process, as a user would run it."""
    return subprocess.run([sys.executable, "-m", "sweeper", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
