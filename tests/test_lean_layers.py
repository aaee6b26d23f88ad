"""model.lean_layers: peft's LoRA layer as one autograd step and RMSNorm as one operation train as peft's and
transformers' own layers do.

On the CPU the operations and their order are peft's, so a step's values agree exactly except where a layer's
input gradient is summed from its several consumers in another order (float rounding, ~1e-8 on fp32
activations). With bf16 activations the adapter's products run in bf16, as peft's do under autocast: those
runs agree within bf16 rounding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from objectives.config import LoraConfig
from sweeper import compose
from sweeper.launch import Resources
from tests.conftest import TINY, step_losses


@pytest.mark.parametrize("setting, tolerance", [
    (["model.base_cache=off", "model.gradient_checkpointing=true"], 1e-6),
    (["model.base_cache=on", "model.gradient_checkpointing=false"], 1e-6),
    (["model.base_cache=on", "model.upcast_unquantized=false"], 1e-3),
])
def test_lean_layers_train_as_peft_and_transformers_layers_do(setting: list[str], tolerance: float,
                                                               tmp_path: Path) -> None:
    cfg, _ = compose.load([*TINY, "search_space=none", "lora.dropout=0.1", "lora.targets=all-linear",
                           "train.max_steps=4", "train.eval_every=2", *setting, f"output_dir={tmp_path}"])
    res = Resources.load(cfg)
    cache = cfg.model.base_cache is True
    runs, adapters = {}, {}
    for lean in (False, True):
        res.base.use_lean_layers(lean)
        runs[lean] = step_losses(res, cfg, cache=cache)
        with res.base.adapter(cfg.lora, seed=0) as model:
            assert ("forward" in model.base_model.model.model.layers[0].self_attn.q_proj.__dict__) is lean
            assert ("forward" in model.base_model.model.model.norm.__dict__) is lean
            adapters[lean] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    (plain, plain_eval), (lean_losses, lean_eval) = runs[False], runs[True]
    assert lean_losses == pytest.approx(plain, rel=tolerance) and lean_eval == pytest.approx(plain_eval, rel=tolerance)


def test_lean_layers_train_the_same_adapter_weights(tmp_path: Path) -> None:
    from objectives.training import train_adapter

    cfg, _ = compose.load([*TINY, "search_space=none", "lora.dropout=0.1", "lora.targets=all-linear",
                           "train.max_steps=3", "model.base_cache=on", f"output_dir={tmp_path}"])
    res = Resources.load(cfg)
    res.base.use_base_cache(True)
    trained = {}
    for lean in (False, True):
        res.base.use_lean_layers(lean)
        with res.base.adapter(cfg.lora, seed=0) as model:
            train_adapter(model, res.data, cfg.train, cfg.optimizer, res.base.device, res.base.tokenizer.pad_token_id)
            trained[lean] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trained[True].keys() == trained[False].keys()
    for name, weight in trained[False].items():
        torch.testing.assert_close(trained[True][name], weight, rtol=1e-5, atol=1e-7)


def test_the_lean_product_has_the_gradients_autograd_computes() -> None:
    from objectives.lean_layers import _LoraProduct, _LoraProductHalf

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(7, 6, dtype=torch.float64, generator=gen)
    a = torch.randn(3, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(7, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a, b: _LoraProduct.apply(x, weight, None, a, b, 0.5, 0.0), (x, a, b))
    assert torch.autograd.gradcheck(lambda x, a, b: _LoraProduct.apply(x, None, None, a, b, 2.0, 0.0), (x, a, b))
    # the 16-bit activations' product is the same function: in float64 its products run in float64
    for weight_or_none in (weight, None):
        torch.manual_seed(3)  # with dropout: the same noise for both
        ours = _LoraProductHalf.apply(x, weight_or_none, None, a, b, 0.5, 0.3)
        ours_grads = torch.autograd.grad(ours.square().sum(), (x, a, b))
        torch.manual_seed(3)
        theirs = _LoraProduct.apply(x, weight_or_none, None, a, b, 0.5, 0.3)
        torch.testing.assert_close(ours, theirs)
        for g, h in zip(ours_grads, torch.autograd.grad(theirs.square().sum(), (x, a, b)), strict=True):
            torch.testing.assert_close(g, h)
        assert ours._base is None  # a fresh tensor: its consumer may change it in place
    assert torch.autograd.gradcheck(lambda x, a, b: _LoraProductHalf.apply(x, weight, None, a, b, 0.5, 0.0), (x, a, b))
    assert torch.autograd.gradcheck(lambda x, a, b: _LoraProductHalf.apply(x, None, None, a, b, 2.0, 0.0), (x, a, b))


def _layer_step(layer: Any, x: torch.Tensor, grad: torch.Tensor) -> list[torch.Tensor]:
    """One forward and backward of a LoRA layer from a fixed random state: its output and the gradients of its
    input and adapter weights."""
    torch.manual_seed(7)
    x = x.detach().clone().requires_grad_(True)
    out = layer(x)
    out.backward(grad)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    grads = [out.detach(), x.grad, a.grad.clone(), b.grad.clone()]
    a.grad = b.grad = None
    return grads


def _layer_runs(tmp_path: Path, activations: torch.dtype, cache: bool, dropout: float,
                runs: dict[str, tuple[bool, bool]]) -> dict[str, list[torch.Tensor]]:
    """:func:`_layer_step` of one LoRA layer of the tiny model per named run of (lean layers, CPU autocast)."""
    from objectives.lean_layers import use_lean_layers

    cfg, _ = compose.load([*TINY, "search_space=none", f"output_dir={tmp_path}"])
    res = Resources.load(cfg)
    res.base.use_base_cache(cache)
    out = {}
    with res.base.adapter(LoraConfig(r=4, targets="qv", dropout=dropout, alpha=12), seed=0) as model:
        layer = model.base_model.model.model.layers[0].self_attn.v_proj
        torch.nn.init.normal_(layer.lora_B["default"].weight)
        model.train()
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2, 9, layer.in_features, generator=gen).to(activations)
        grad = torch.randn(2, 9, layer.out_features, generator=gen).to(activations)
        for name, (lean, autocast) in runs.items():
            use_lean_layers(model, on=lean)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out[name] = _layer_step(layer, x, grad)
    return out


@pytest.mark.parametrize("cache", [False, True])
def test_one_lean_layer_computes_peft_layers_output_and_gradients(cache: bool, tmp_path: Path) -> None:
    """A single layer sums no gradients from several consumers: on the CPU every value is peft's, bit for bit,
    with dropout on and a live adapter, with and without the base cache (fp32 activations)."""
    runs = _layer_runs(tmp_path, torch.float32, cache, 0.3, {"peft": (False, False), "lean": (True, False)})
    for name, ours, theirs in zip(("output", "input grad", "A grad", "B grad"), runs["lean"], runs["peft"],
                                  strict=True):
        assert ours.dtype == theirs.dtype and torch.equal(ours, theirs), name


@pytest.mark.parametrize("cache", [False, True])
def test_with_bf16_activations_the_adapter_products_round_no_more_than_under_autocast(cache: bool,
                                                                                      tmp_path: Path) -> None:
    """bf16 activations: the lean layer's adapter products run in bf16, as peft's do under autocast (the usual
    recipe). Against peft's fp32 adapter products, its output and gradients are off by no more than autocast's
    (or a bf16 rounding), and in the same dtypes as peft's."""
    runs = _layer_runs(tmp_path, torch.bfloat16, cache, 0.0,
                       {"peft": (False, False), "lean": (True, False), "autocast": (False, True)})
    for i, name in enumerate(("output", "input grad", "A grad", "B grad")):
        exact, ours, autocast = (runs[run][i].double() for run in ("peft", "lean", "autocast"))
        assert runs["lean"][i].dtype == runs["peft"][i].dtype, name
        error, allowed = ((t - exact).norm() / exact.norm() for t in (ours, autocast))
        assert error <= max(2 * allowed, 2**-8), name


def test_what_the_lean_layer_does_not_cover_goes_through_peft(tmp_path: Path) -> None:
    """Autocast (here the CPU's) and a disabled adapter take peft's own forward: the same outputs and gradients."""
    from objectives.lean_layers import use_lean_layers

    cfg, _ = compose.load([*TINY, "search_space=none", f"output_dir={tmp_path}"])
    res = Resources.load(cfg)
    res.base.use_base_cache(True)
    with res.base.adapter(LoraConfig(r=4, targets="qv"), seed=0) as model:
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        torch.nn.init.normal_(layer.lora_B["default"].weight)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2, 5, layer.in_features, generator=gen)
        grad = torch.randn(2, 5, layer.out_features, generator=gen)
        runs = {}
        for lean in (False, True):
            use_lean_layers(model, on=lean)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                runs[lean] = _layer_step(layer, x, grad)
            with model.disable_adapter(), torch.no_grad():
                runs[lean].append(layer(x))
    assert all(torch.equal(ours, theirs) for ours, theirs in zip(runs[True], runs[False], strict=True))


def test_a_copied_model_computes_with_its_own_weights(tmp_path: Path) -> None:
    import copy
    import pickle

    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from objectives.lean_layers import use_fused_norms

    cfg, _ = compose.load([*TINY, "search_space=none", f"output_dir={tmp_path}"])
    res = Resources.load(cfg)
    with res.base.adapter(LoraConfig(r=4, targets="qv"), seed=0) as model:
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        torch.nn.init.normal_(layer.lora_B["default"].weight)
        twin = copy.deepcopy(layer)
        torch.nn.init.zeros_(twin.lora_B["default"].weight)
        x = torch.randn(1, 3, layer.in_features)
        with torch.no_grad():
            assert torch.equal(twin(x), layer.base_layer(x)) and not torch.equal(layer(x), twin(x))
    norm = LlamaRMSNorm(8)
    assert use_fused_norms(norm) == 1
    restored = pickle.loads(pickle.dumps(norm))
    with torch.no_grad():
        restored.weight.mul_(2)
        x = torch.randn(2, 8)
        torch.testing.assert_close(restored(x), 2 * norm(x))


def test_a_norm_is_fused_only_where_rms_norm_reproduces_it() -> None:
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from objectives.lean_layers import use_fused_norms

    class OffsetRMSNorm(LlamaRMSNorm):
        """Scales by ``1 + weight``, as Gemma does, with Llama's attribute names: the probe must reject it."""

        def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            return super().forward(hidden_states) / self.weight * (1 + self.weight)

    llama, gemma, offset = LlamaRMSNorm(16, eps=1e-5), GemmaRMSNorm(16, eps=1e-5), OffsetRMSNorm(16, eps=1e-5)
    with torch.no_grad():
        llama.weight.normal_()
        offset.weight.normal_()
    model = torch.nn.ModuleList([llama, gemma, offset])
    x = torch.randn(3, 4, 16)
    before = [m(x) for m in model]
    assert use_fused_norms(model) == 1
    assert "forward" in llama.__dict__ and "forward" not in gemma.__dict__ and "forward" not in offset.__dict__
    assert torch.equal(llama(x), before[0])  # fp32: the same arithmetic
    assert torch.equal(gemma(x), before[1]) and torch.equal(offset(x), before[2])
    # An input in another dtype than the weight's keeps transformers' arithmetic (its output in the weight's dtype).
    half = x.to(torch.bfloat16)
    assert torch.equal(llama(half), LlamaRMSNorm.forward(llama, half))
    assert use_fused_norms(model, on=False) == 1 and "forward" not in llama.__dict__


def test_lean_layers_are_on_by_default_and_recorded_as_a_device_setting() -> None:
    from sweeper.study import PER_DEVICE

    cfg, _ = compose.load(["search_space=none"])
    assert cfg.model.lean_layers is True
    assert "model.lean_layers" in PER_DEVICE
    cfg, _ = compose.load(["search_space=none", "model.lean_layers=false"])
    assert cfg.model.lean_layers is False
