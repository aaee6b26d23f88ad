"""model.lean_layers: peft's LoRA layer as one autograd step and RMSNorm as one operation train as peft's and
transformers' own layers do.

On the CPU the operations and their order are peft's, so a step's values agree exactly except where a layer's
input gradient is summed from its several consumers in another order (float rounding, ~1e-8 on fp32
activations); bf16 activations round those sums to bf16.
"""

from __future__ import annotations

from pathlib import Path

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
    from objectives.lean_layers import _LoraProduct

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(7, 6, dtype=torch.float64, generator=gen)
    a = torch.randn(3, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(7, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a, b: _LoraProduct.apply(x, weight, None, a, b, 0.5, 0.0), (x, a, b))
    assert torch.autograd.gradcheck(lambda x, a, b: _LoraProduct.apply(x, None, None, a, b, 2.0, 0.0), (x, a, b))


def test_what_the_lean_layer_does_not_cover_goes_through_peft(tmp_path: Path) -> None:
    cfg, _ = compose.load([*TINY, "search_space=none", f"output_dir={tmp_path}"])
    res = Resources.load(cfg)
    ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with res.base.adapter(LoraConfig(r=4, targets="qv"), seed=0) as model:
        torch.nn.init.normal_(model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight)
        model.eval()
        with torch.no_grad():
            with model.disable_adapter():
                bare = model(input_ids=ids).logits
            adapted = model(input_ids=ids).logits
            res.base.use_lean_layers(False)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                peft_autocast = model(input_ids=ids).logits
            res.base.use_lean_layers(True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                lean_autocast = model(input_ids=ids).logits
    res.base.use_lean_layers(False)
    with res.base.adapter(LoraConfig(r=4, targets="qv"), seed=0) as model:
        model.eval()
        with torch.no_grad(), model.disable_adapter():
            assert torch.equal(model(input_ids=ids).logits, bare)
    assert not torch.equal(adapted, bare)
    assert torch.equal(lean_autocast, peft_autocast)


def test_a_norm_is_fused_only_where_rms_norm_reproduces_it() -> None:
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from objectives.lean_layers import use_fused_norms

    llama, gemma = LlamaRMSNorm(16, eps=1e-5), GemmaRMSNorm(16, eps=1e-5)
    with torch.no_grad():
        llama.weight.normal_()
    model = torch.nn.ModuleList([llama, gemma])
    x = torch.randn(3, 4, 16)
    before = [m(x) for m in model]
    assert use_fused_norms(model) == 1
    assert "forward" in llama.__dict__ and "forward" not in gemma.__dict__
    torch.testing.assert_close(llama(x), before[0])
    assert torch.equal(gemma(x), before[1])
    assert use_fused_norms(model, on=False) == 1 and "forward" not in llama.__dict__


def test_lean_layers_are_on_by_default_and_recorded_as_a_device_setting() -> None:
    from sweeper.study import PER_DEVICE

    cfg, _ = compose.load(["search_space=none"])
    assert cfg.model.lean_layers is True
    assert "model.lean_layers" in PER_DEVICE
    cfg, _ = compose.load(["search_space=none", "model.lean_layers=false"])
    assert cfg.model.lean_layers is False
