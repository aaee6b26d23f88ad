"""The memory model: the worked 15.5B examples, table tests, exact adapter counts against peft, saved activations
against autograd, monotonicity, and the GPU benchmark's pure parts (its GPU run is bench/memory_accuracy.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from objectives.config import ConfigError, LoraConfig
from objectives.memory import (
    MemoryEstimate,
    activation_bytes,
    attention_kernel,
    estimate,
    estimate_worst,
    optimizer_state_bytes,
    quantized_weight_bytes,
    unquantized_weight_bytes,
)
from objectives.shape import ModelShape, TrialSettings, adapter_param_count
from sweeper import compose
from tests.conftest import LLAMA_8B, SMOLLM2

ROOT = Path(__file__).resolve().parent.parent



# --- table tests (pure) ----------------------------------------------------------------------------

@pytest.mark.parametrize(("quant", "double", "per_weight"), [
    ("nf4", True, 0.5 + 1 / 64 + 4 / (64 * 256)),
    ("nf4", False, 0.5 + 4 / 64),
    ("fp4", True, 0.5 + 1 / 64 + 4 / (64 * 256)),
    ("none", False, 2.0),
])
def test_quantized_weights_take_their_storage_bytes_per_weight(quant: str, double: bool, per_weight: float) -> None:
    shape = ModelShape.from_config(LLAMA_8B)
    got = quantized_weight_bytes(shape, TrialSettings(quant_type=quant, double_quant=double))
    assert got / shape.linear_params == pytest.approx(per_weight, rel=1e-4)


def test_int8_keeps_a_byte_per_weight_and_a_scale_per_row() -> None:
    shape = ModelShape.from_config(SMOLLM2)
    rows = shape.num_layers * sum(o for _, o in shape.linear_shapes().values())
    assert quantized_weight_bytes(shape, TrialSettings(quant_type="int8")) == shape.linear_params + 4 * rows


@pytest.mark.parametrize(("config", "quant", "expected"), [
    (SMOLLM2, "nf4", 4 * (49152 * 576 + 61 * 576)),          # tied, upcast to fp32 by the kbit preparation
    (SMOLLM2, "none", 2 * (49152 * 576 + 61 * 576)),         # bf16
    (LLAMA_8B, "nf4", 4 * (2 * 128256 * 4096 + 65 * 4096)),  # embeddings and head
])
def test_unquantized_layers(config: dict[str, Any], quant: str, expected: int) -> None:
    assert unquantized_weight_bytes(ModelShape.from_config(config), TrialSettings(quant_type=quant)) == expected


@pytest.mark.parametrize(("name", "momentum", "sizes", "expected"), [
    ("adamw", 0.9, [1000, 24], 8 * 1024),
    ("sgd", 0.9, [1000, 24], 4 * 1024),
    ("sgd", 0.0, [1000, 24], 0),
])
def test_optimizer_state(name: str, momentum: float, sizes: list[int], expected: int) -> None:
    assert optimizer_state_bytes(name, sizes, momentum) == expected


@pytest.mark.parametrize(("config", "r", "targets", "expected"), [
    (SMOLLM2, 8, "qkvo", 30 * 8 * ((576 + 576) * 2 + (576 + 192) * 2)),
    (SMOLLM2, 16, "all-linear", 4_884_480),
    (SMOLLM2, 4, "q_proj,v_proj", 30 * 4 * ((576 + 576) + (576 + 192))),
    (SMOLLM2, 8, ["gate_proj", "down_proj"], 30 * 8 * ((576 + 1536) * 2)),
    (LLAMA_8B, 16, "all-linear", 41_943_040),
    (LLAMA_8B, 64, "mlp", 32 * 64 * 3 * (4096 + 14336)),
])
def test_adapter_parameters_from_shapes(config: dict[str, Any], r: int, targets: Any, expected: int) -> None:
    assert adapter_param_count(config, r, targets) == expected


def test_targets_that_match_nothing_are_a_config_error() -> None:
    with pytest.raises(ConfigError, match="c_attn, c_proj are not linear modules"):
        adapter_param_count(SMOLLM2, 8, "c_attn,c_proj")


def test_shape_from_a_mapping_fills_llama_defaults_and_names_missing_fields() -> None:
    shape = ModelShape.from_config({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                    "num_attention_heads": 4, "vocab_size": 100})
    assert (shape.num_kv_heads, shape.head_dim, shape.tie_word_embeddings) == (4, 16, False)
    with pytest.raises(ConfigError, match="intermediate_size"):
        ModelShape.from_config({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                "vocab_size": 100})


def test_shape_from_a_transformers_config_equals_the_mapping() -> None:
    from transformers import LlamaConfig

    assert ModelShape.from_config(LlamaConfig(**SMOLLM2)) == ModelShape.from_config(SMOLLM2)


@pytest.mark.parametrize(("device", "quant", "config", "padded", "batch", "kernel"), [
    ("cuda", "nf4", SMOLLM2, False, 4, "math"),     # fp32 stream, grouped-query heads, no mask
    ("cuda", "nf4", SMOLLM2, True, 4, "fused"),     # a mask: keys repeated, memory-efficient kernel
    ("cuda", "nf4", SMOLLM2, True, 1, "math"),      # a batch of one has no padding
    ("cuda", "none", SMOLLM2, False, 4, "fused"),   # bf16: flash takes grouped-query heads
    ("cpu", "nf4", SMOLLM2, False, 4, "fused"),     # the CPU's flash kernel takes fp32 and GQA
    ("cuda", "nf4", {**SMOLLM2, "num_key_value_heads": 9}, False, 4, "fused"),  # no GQA
])
def test_attention_kernel(device: str, quant: str, config: dict[str, Any], padded: bool, batch: int,
                          kernel: str) -> None:
    s = TrialSettings(device=device, quant_type=quant, padded=padded, micro_batch_size=batch)
    assert attention_kernel(ModelShape.from_config(config), s) == kernel


def test_the_estimate_adds_up_and_formats() -> None:
    est = estimate(SMOLLM2, TrialSettings(r=16, targets="all-linear", micro_batch_size=16, seq_len=512))
    assert est.allocated == sum(v for k, v in est.components() if k != "runtime")
    assert est.total == est.allocated + est.runtime
    text = est.format()
    for name in MemoryEstimate.COMPONENTS:
        assert name in text
    assert "4,884,480 adapter parameters" in text and "peak at loss backward" in text


def test_the_logits_dominate_a_small_model_with_a_large_vocabulary() -> None:
    s = TrialSettings(r=8, micro_batch_size=8, seq_len=512)
    est = estimate(SMOLLM2, s)
    assert est.peak_at == "loss backward"
    assert est.logits == 12 * s.tokens * 49152  # fp32 logits' log-probabilities and two gradients
    assert est.logits > est.activations


def test_the_cpu_has_no_context_or_workspace() -> None:
    est = estimate(SMOLLM2, TrialSettings(device="cpu"))
    assert est.runtime == 0 and est.workspace < 2**20


# --- monotonicity -----------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [SMOLLM2, LLAMA_8B])
@pytest.mark.parametrize(("smaller", "larger"), [
    ({"gradient_checkpointing": True}, {"gradient_checkpointing": False}),
    ({"micro_batch_size": 2}, {"micro_batch_size": 8}),
    ({"seq_len": 256}, {"seq_len": 1024}),
    ({"r": 4}, {"r": 64}),
    ({"targets": "qk"}, {"targets": "all-linear"}),
    ({"optimizer": "sgd", "momentum": 0.0}, {"optimizer": "sgd", "momentum": 0.9}),
    ({"optimizer": "sgd"}, {"optimizer": "adamw"}),
    ({"dropout": 0.0, "gradient_checkpointing": False}, {"dropout": 0.1, "gradient_checkpointing": False}),
    ({"quant_type": "nf4"}, {"quant_type": "none", "gradient_checkpointing": True}),
])
def test_more_of_something_needs_more_memory(config: dict[str, Any], smaller: dict[str, Any],
                                             larger: dict[str, Any]) -> None:
    base = {"r": 16, "targets": "qkvo", "micro_batch_size": 4, "seq_len": 512}
    assert (estimate(config, TrialSettings(**{**base, **smaller})).allocated
            < estimate(config, TrialSettings(**{**base, **larger})).allocated)


def test_the_worst_case_covers_batches_with_and_without_padding() -> None:
    s = TrialSettings(micro_batch_size=4, seq_len=2048, gradient_checkpointing=False)
    worst = estimate_worst(SMOLLM2, s)
    for padded in (True, False):
        assert worst.allocated >= estimate(SMOLLM2, replace(s, padded=padded)).allocated


# --- against the real components on the tiny random model -------------------------------------------

@pytest.fixture(scope="module")
def tiny_bases() -> Iterator[dict[str, Any]]:
    """The tiny random 4-bit model with checkpointing (as configured) and without, and a bf16 one."""
    from objectives.base import ResidentBase

    bases = {}
    for name, extra in (("nf4", []), ("nf4-no-ckpt", ["model.gradient_checkpointing=false"]),
                        ("bf16-no-ckpt", ["model.gradient_checkpointing=false", "model.quant_type=none"])):
        cfg, _ = compose.load(["model=tiny_random", "search_space=none", *extra])
        bases[name] = ResidentBase(cfg.model, torch.device("cpu"))
    yield bases


@pytest.mark.parametrize(("r", "targets"), [
    (4, "qk"), (8, "qkvo"), (16, "all-linear"), (8, "mlp"), (2, "q_proj,v_proj"), (8, "down_proj"),
])
def test_adapter_count_equals_peft_on_the_tiny_model(tiny_bases: dict[str, Any], r: int, targets: str) -> None:
    base = tiny_bases["nf4"]
    with base.adapter(LoraConfig(r=r, targets=targets), seed=0) as model:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert adapter_param_count(base.config, r, targets, base.linear_names) == trainable
    assert adapter_param_count(base.config, r, targets) == trainable  # names derived from the config


@pytest.mark.parametrize(("r", "targets"), [(8, "qkvo"), (16, "all-linear"), (4, "q_proj,v_proj"), (32, "mlp")])
def test_adapter_count_equals_peft_on_the_smollm2_config(r: int, targets: str) -> None:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    from objectives.base import linear_module_names
    from objectives.targets import resolve_targets

    config = LlamaConfig(**SMOLLM2)
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = AutoModelForCausalLM.from_config(config)
        names = linear_module_names(model)
        peft_model = get_peft_model(model, PeftLoraConfig(r=r, target_modules=resolve_targets(targets, names),
                                                          task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert adapter_param_count(config, r, targets, names) == trainable == adapter_param_count(SMOLLM2, r, targets)


@pytest.mark.slow
def test_the_default_models_config_is_the_smollm2_shape() -> None:
    from objectives.sources import load_model_config

    cfg, _ = compose.load(["search_space=none"])
    assert ModelShape.from_config(load_model_config(cfg.model)) == ModelShape.from_config(SMOLLM2)


def saved_for_backward(model: Any, batch: dict[str, torch.Tensor], resident: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd keeps for backward in one forward pass (parameters and the
    ``resident`` tensors excluded)."""
    params = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *resident]}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    del loss
    return sum(kept.values())


@pytest.mark.parametrize("base_name", ["nf4-no-ckpt", "bf16-no-ckpt"])
@pytest.mark.parametrize(("targets", "dropout"), [
    ("qkvo", 0.1), ("qkvo", 0.0), ("all-linear", 0.05), ("mlp", 0.0), ("v_proj", 0.1), ("down_proj", 0.0),
])
def test_saved_activations_match_autograd_on_the_cpu(tiny_bases: dict[str, Any], base_name: str, targets: str,
                                                     dropout: float) -> None:
    base = tiny_bases[base_name]
    batch_size, seq = 2, 24
    ids = torch.randint(3, 1000, (batch_size, seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    with base.adapter(LoraConfig(r=4, targets=targets, dropout=dropout), seed=0) as model:
        model.train()
        measured = saved_for_backward(model, batch)
    settings = TrialSettings(quant_type=base.cfg.quant_type, r=4, targets=targets, dropout=dropout,
                             micro_batch_size=batch_size, seq_len=seq, gradient_checkpointing=False, padded=False,
                             device="cpu")
    # Exact to the byte with torch 2.13 / transformers 5.24 / peft 0.21; a little room for other versions.
    assert activation_bytes(ModelShape.from_config(base.config), settings, base.linear_names) == pytest.approx(
        measured, rel=1e-3)


def test_the_base_cache_keeps_nothing_more_for_backward(tiny_bases: dict[str, Any]) -> None:
    """A product with the kept copy saves only the copy itself (resident, counted in ``base_cache``)."""
    from objectives.base_cache import BUFFER

    base = tiny_bases["nf4-no-ckpt"]
    ids = torch.randint(3, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    measured = {}
    try:
        for cache in (False, True):
            base.use_base_cache(cache)
            copies = [b for name, b in base.model.named_buffers() if name.endswith(BUFFER)]
            assert len(copies) == (len(base.linear_names) if cache else 0)
            with base.adapter(LoraConfig(r=4, targets="all-linear", dropout=0.1), seed=0) as model:
                model.train()
                measured[cache] = saved_for_backward(model, batch, copies)
    finally:
        base.use_base_cache(False)
    assert measured[True] == measured[False]
    shape = ModelShape.from_config(base.config)
    assert estimate(base.config, TrialSettings(device="cpu", base_cache=True)).base_cache == 2 * shape.linear_params
    assert sum(b.nbytes for b in copies) == 2 * shape.linear_params


def test_the_base_cache_adds_its_copy_and_drops_the_per_call_dequantization() -> None:
    from objectives.memory import layer_backward_scratch

    shape = ModelShape.from_config(LLAMA_8B)
    s = TrialSettings(r=16, targets="all-linear", micro_batch_size=4, seq_len=1024, gradient_checkpointing=True)
    off, on = estimate(LLAMA_8B, s), estimate(LLAMA_8B, replace(s, base_cache=True))
    assert (off.base_cache, on.base_cache) == (0, 2 * shape.linear_params)  # 13.0 GiB for Llama-3-8B
    assert on.base_weights == off.base_weights and "base_cache" in on.format()
    assert (layer_backward_scratch(shape, s) - layer_backward_scratch(shape, replace(s, base_cache=True))
            == 2 * 4096 * 14336)  # the largest dequantized weight, gate/up/down
    assert estimate(LLAMA_8B, replace(s, quant_type="none", base_cache=False)).base_cache == 0


@pytest.mark.parametrize(("config", "tokens", "chunk"), [(LLAMA_8B, 4096, 128), (SMOLLM2, 768, 16),
                                                         (SMOLLM2, 10, 1), (LLAMA_8B, 1, 1)])
def test_the_fused_loss_chunk_is_liger_kernels(config: dict[str, Any], tokens: int, chunk: int) -> None:
    """liger-kernel: chunk = next_power_of_2(cdiv(tokens, cdiv(vocab, hidden)))."""
    from objectives.memory import fused_loss_chunk

    assert fused_loss_chunk(ModelShape.from_config(config), tokens) == chunk


@pytest.mark.parametrize("upcast", [True, False])
def test_the_fused_loss_keeps_a_hidden_state_gradient_instead_of_four_logits(upcast: bool) -> None:
    from objectives.memory import loss_bytes

    shape = ModelShape.from_config(SMOLLM2)
    s = TrialSettings(r=8, micro_batch_size=8, seq_len=512, upcast=upcast)
    plain, fused = estimate(SMOLLM2, s), estimate(SMOLLM2, replace(s, fused_loss=True))
    e = 4 if upcast else 2
    assert plain.logits == loss_bytes(shape, s) == 12 * s.tokens * 49152
    chunk = 64  # 4096 tokens / cdiv(49152, 576) = 48 -> 64
    assert loss_bytes(shape, replace(s, fused_loss=True)) == s.tokens * (e * 576 + 5) + chunk * e * (49152 + 576)
    assert fused.peak_at == "layer backward"  # the loss is no longer the largest moment
    assert fused.allocated < plain.allocated - 5 * s.tokens * 49152
    assert activation_bytes(ModelShape.from_config(SMOLLM2), replace(s, fused_loss=True)) < activation_bytes(
        ModelShape.from_config(SMOLLM2), s)


# --- the GPU benchmark's pure parts and its CPU smoke run ----------------------------------------------

def test_the_benchmark_covers_the_required_configurations() -> None:
    from bench.memory_cases import CASES

    assert len(CASES) >= 20
    assert {c.shape for c in CASES} == {"135m", "1b", "8b"}
    assert {c.checkpointing for c in CASES} == {True, False}
    assert len({c.r for c in CASES}) >= 4 and len({c.targets for c in CASES}) >= 4
    assert len({c.seq for c in CASES}) >= 4 and len({c.batch for c in CASES}) >= 4


def test_benchmark_rows_have_the_exact_length_and_padded_cases_mix_two() -> None:
    from bench.memory_cases import Case, rows_for

    plain = rows_for(Case("tiny", 4, "qk", 32, 3, True), vocab=100, seed=0)
    assert [len(r["input_ids"]) for r in plain] == [32, 32, 32]
    padded = rows_for(Case("tiny", 4, "qk", 32, 2, True, padded=True), vocab=100, seed=0)
    assert sorted(len(r["input_ids"]) for r in padded) == [24, 32]
    assert all(r["labels"] == r["input_ids"] for r in plain + padded)


def test_benchmark_summary_checks_the_goal() -> None:
    from bench.memory_accuracy import summary
    from bench.memory_cases import Case, Result

    case = Case("tiny", 4, "qk", 32, 2, True)
    good = [Result(case, 100, "loss backward", measured=m) for m in (98, 101, 104)]
    assert summary(good)[-1] == "goal met over 3 configurations"
    bad = [*good, Result(case, 80, "loss backward", measured=100)]
    assert "-20.0%" in summary(bad)[1] and summary(bad)[-1] == "goal NOT met over 4 configurations"


@pytest.mark.slow
def test_benchmark_cpu_smoke(tmp_path: Path) -> None:
    out = tmp_path / "report.md"
    proc = subprocess.run([sys.executable, "bench/memory_accuracy.py", "--cpu-smoke", "--out", str(out),
                           "--workdir", str(tmp_path / "work")], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert text.count("| tiny r") == 2 and "CPU smoke run" in text
