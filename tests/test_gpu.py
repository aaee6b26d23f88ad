"""The same sweep on a CUDA device: 4-bit layers on the GPU, adapters swapped in place, memory flat."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sweeper import compose
from sweeper.launch import run_sweep
from tests.conftest import SOURCE, TINY, step_losses

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


def test_the_base_product_writes_fp32_from_its_accumulator_forward_and_backward() -> None:
    from objectives.base_cache import _WideProduct

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 37, 96, generator=generator).cuda().requires_grad_()
    weight = torch.randn(80, 96, generator=generator).cuda().to(torch.bfloat16)
    grad = torch.randn(2, 37, 80, generator=generator).cuda()
    out = _WideProduct.apply(x, weight)
    out.backward(grad)
    assert out.dtype == torch.float32 and x.grad is not None and x.grad.dtype == torch.float32
    # The same products in fp64 from the same 16-bit operands: only the fp32 accumulator's rounding is left, far
    # below bf16's unit (the rounding the product's output had before).
    wide = weight.double()
    expected = x.detach().to(torch.bfloat16).double() @ wide.t()
    expected_grad = grad.to(torch.bfloat16).double() @ wide
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), expected_grad, rtol=1e-5, atol=1e-5)
    assert not torch.equal(out, out.to(torch.bfloat16).float())  # not rounded to bf16 on the way


@pytest.mark.parametrize("cache", [False, True])
def test_lean_layers_match_peft_layers_on_cuda(tmp_path: Path, cache: bool) -> None:
    """On CUDA the dropout masks are the same (the fused dropout kernel's) and both paths are deterministic;
    cuBLAS picks other kernels for the transposed products, so the losses differ by their rounding (4e-5 on
    these 4 steps when measured)."""
    from sweeper.launch import Resources

    cfg, _ = compose.load([*TINY, *SOURCE, "search_space=none", "train.device=cuda", "train.max_steps=4",
                           "train.eval_every=2", "lora.dropout=0.1", "lora.targets=all-linear",
                           f"output_dir={tmp_path}"])
    res = Resources.load(cfg)
    runs = {}
    for lean in (False, True):
        res.base.use_lean_layers(lean)
        losses, eval_loss = step_losses(res, cfg, cache=cache)
        runs[lean] = [*losses, eval_loss]
    assert runs[True] == pytest.approx(runs[False], rel=1e-4)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_cuda_graphs_train_as_the_eager_step_does(tmp_path: Path, dropout: float) -> None:
    """The replayed passes are the eager passes widened to data.max_length: the same losses up to the products'
    rounding at the wider shape; a fresh dropout mask at every replay."""
    import dataclasses

    from objectives.training import train_adapter
    from sweeper.launch import Resources

    cfg, _ = compose.load([*TINY, *SOURCE, "search_space=none", "train.device=cuda", "train.max_steps=8",
                           "train.eval_every=4", f"lora.dropout={dropout}", "lora.targets=all-linear",
                           "model.gradient_checkpointing=false", "train.fused_loss=off", f"output_dir={tmp_path}"])
    res = Resources.load(cfg)
    runs = {}
    for graphs in (False, True):
        losses: list[float] = []
        with res.base.adapter(cfg.lora, seed=0) as model:
            result = train_adapter(model, res.data, dataclasses.replace(cfg.train, cuda_graphs=graphs), cfg.optimizer,
                                   res.base.device, res.base.tokenizer.pad_token_id,
                                   on_step=lambda s, m, losses=losses: losses.append(m["train_loss"]))
            weights = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])
        runs[graphs] = (losses, result, weights)
    (eager, eager_result, eager_weights), (replayed, result, weights) = runs[False], runs[True]
    assert result.graph_replays >= 3 and eager_result.graph_replays == 0
    tolerance = 1e-4 if dropout == 0 else 2e-2  # with dropout the masks need not be drawn in the same order
    assert replayed == pytest.approx(eager, rel=tolerance)
    assert result.eval_loss == pytest.approx(eager_result.eval_loss, rel=tolerance)
    # AdamW moves a weight by about the learning rate whatever its gradient's size: where a gradient is near zero,
    # the rounding of the wider pass's products can turn a step's direction
    steps = cfg.optimizer.lr * cfg.train.max_steps
    torch.testing.assert_close(weights, eager_weights, rtol=0, atol=max(tolerance, 2 * steps))


def test_the_slot_kernels_compute_what_the_torch_operations_compute() -> None:
    from tests.slot_kernel_checks import check_dropped_product, check_optimizer_step

    check_dropped_product("cuda")
    check_optimizer_step("cuda")


def test_the_staging_buffer_sends_each_tensor_as_it_was_given() -> None:
    from objectives.transfer import Staging

    staging, device = Staging(), torch.device("cuda")
    first, second = torch.arange(1000, dtype=torch.float32), torch.arange(3000, dtype=torch.float32) * 2
    sent = [staging.send(first, device), staging.send(second, device), staging.send(first[:10], device)]
    assert all(t.device.type == "cuda" for t in sent)
    assert [t.cpu().tolist() for t in sent] == [first.tolist(), second.tolist(), first[:10].tolist()]


@pytest.mark.parametrize("device", ["cuda", pytest.param("cuda:1", marks=pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs a second CUDA device"))])
def test_slot_runs_on_cuda_train_as_each_alone(tmp_path: Path, device: str) -> None:
    """The engine's CUDA path (the dropped product's kernels, the flash route, the head on predicted tokens):
    runs of different ranks, targets, optimizers and dropouts trained together, against each alone; on a device
    other than the current one too (Triton launches on the current device)."""
    from objectives.base import ResidentBase
    from objectives.data import prepare
    from objectives.engine import SlotEngine
    from tests.test_engine import TRIALS, run_alone, train_together, trial

    cfg, _ = compose.load([*TINY, *SOURCE, "search_space=none", f"train.device={device}", f"output_dir={tmp_path}"])
    base = ResidentBase(cfg.model, torch.device(device))
    base.use_checkpointing(False)
    data = prepare(cfg.data, base.tokenizer, cfg.model.cache_path)
    configs = [trial(cfg, **t) for t in TRIALS]
    alone = [run_alone((cfg, base, data), c) for c in configs]
    hooks, together = train_together(SlotEngine(base, data, slots=3, r_max=8), configs)
    for (ref_hooks, ref), hook, got in zip(alone, hooks, together, strict=True):
        # TF32 products round by their shapes: a merged pass's differ from a run's own
        assert [s["train_loss"] for s in hook.steps] == pytest.approx([s["train_loss"] for s in ref_hooks.steps],
                                                                     rel=2e-3)
        assert got.train.eval_loss == pytest.approx(ref.train.eval_loss, rel=2e-3)
