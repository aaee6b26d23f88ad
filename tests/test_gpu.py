"""The same sweep on a CUDA device: 4-bit layers on the GPU, adapters swapped in place, memory flat."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from sweeper import compose
from sweeper.launch import run_sweep
from tests.conftest import TINY, step_losses

# Where the model package is not installed, point at the GGUF file itself.
SOURCE = [f"model.source={os.environ['QLORA_SWEEP_MODEL_SOURCE']}"] if "QLORA_SWEEP_MODEL_SOURCE" in os.environ else []

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_sweep_on_cuda_keeps_memory_flat(tmp_path: Path) -> None:
    cfg, params = compose.load([*TINY, *SOURCE, "search_space=none", "lora.r=choice(4,8)",
                                "lora.targets=choice(qk,all-linear)", "study.n_trials=10", "study/sampler=random",
                                "study/pruner=none", "train.device=cuda", "workers.slots=1",  # peft's adapter swaps
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
    assert not torch.backends.cuda.cudnn_sdp_enabled()  # its per-shape plan builds stall packed passes
    assert all(p.device.type == "cuda" for p in base.model.parameters())


def test_the_faster_step_switches_match_the_plain_step_within_bf16_noise(tmp_path: Path) -> None:
    """base cache and fused loss against today's step on CUDA, 4 steps without dropout.

    The fused loss computes the same fp32 logits chunk by chunk (differences of float32 rounding). With the base
    cache the product is the one bitsandbytes runs for passes over 1,536 tokens; these passes are shorter, where
    bitsandbytes 0.50 runs its fused 4-bit kernel, whose bf16 rounding differs: per value up to 2**-8 relative,
    much less in a loss averaged over tokens. 1% per step covers that and the updates it steers."""
    import dataclasses

    from sweeper.launch import Resources

    pytest.importorskip("liger_kernel")
    cfg, _ = compose.load([*TINY, *SOURCE, "search_space=none", "train.device=cuda", "train.max_steps=4",
                           "train.eval_every=4", "lora.dropout=0", "lora.targets=all-linear",
                           "model.gradient_checkpointing=false", f"output_dir={tmp_path}"])
    res = Resources.load(cfg)
    runs = {}
    for cache, fused in ((False, False), (True, False), (False, True), (True, True)):
        losses, eval_loss = step_losses(res, cfg, dataclasses.replace(cfg.train, fused_loss=fused), cache)
        runs[cache, fused] = [*losses, eval_loss]
    for key, values in runs.items():
        assert values == pytest.approx(runs[False, False], rel=1e-2), key
