"""The same sweep on a CUDA device: 4-bit layers on the GPU, adapters swapped in place, memory flat."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from sweeper import compose
from sweeper.launch import run_sweep
from tests.conftest import TINY

# Where the model package is not installed, point at the GGUF file itself.
SOURCE = [f"model.source={os.environ['QLORA_SWEEP_MODEL_SOURCE']}"] if "QLORA_SWEEP_MODEL_SOURCE" in os.environ else []

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_sweep_on_cuda_keeps_memory_flat(tmp_path: Path) -> None:
    cfg, params = compose.load([*TINY, *SOURCE, "search_space=none", "lora.r=choice(4,8)",
                                "lora.targets=choice(qk,all-linear)", "study.n_trials=10", "study/sampler=random",
                                "study/pruner=none", "train.device=cuda",
                                f"output_dir={tmp_path}", "tracking.log_adapter=none"])
    study = run_sweep(cfg, params, show_progress=False)
    assert len(study.trials) == 10
    assert all(t.user_attrs["peak_memory_mb"] > 0 for t in study.trials)
    memory = [t.user_attrs["worker_memory_mb"] for t in sorted(study.trials, key=lambda t: t.number)]
    assert max(memory[2:]) - min(memory[2:]) < 8, memory  # MB of allocated CUDA memory


def test_base_is_4bit_on_the_gpu(tmp_path: Path) -> None:
    from objectives.base import ResidentBase

    cfg, _ = compose.load([*TINY, *SOURCE, "train.device=cuda", f"output_dir={tmp_path}"])
    base = ResidentBase(cfg.model, torch.device("cuda"))
    kinds = {type(m).__name__ for m in base.model.modules()}
    assert "Linear4bit" in kinds
    assert all(p.device.type == "cuda" for p in base.model.parameters())
