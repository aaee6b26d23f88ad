"""model.bf16_attention: an fp32 stream's attention on bf16 copies of its inputs, as autocast runs it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from objectives import attention, data
from objectives.attention import NAME, SDPA, use_bf16_attention
from sweeper import compose
from sweeper.launch import Resources
from tests.conftest import SOURCE, TINY


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    cfg, _ = compose.load([*TINY, *SOURCE, "search_space=none", "train.device=cpu",
                           f"output_dir={tmp_path_factory.mktemp('attention')}"])
    res = Resources.load(cfg)
    assert not res.base.bf16_attention  # CUDA only: the CPU keeps fp32 attention
    yield res.base
    use_bf16_attention(res.base.model, on=False)


def _logits(model: Any, examples: list[dict[str, list[int]]]) -> torch.Tensor:
    (batch,) = data.pack(examples, 0, 64, 1)
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0].float()


def _example(first: int, n: int) -> dict[str, list[int]]:
    ids = [(first + 7 * i) % 500 + 1 for i in range(n)]
    return {"input_ids": ids, "labels": ids}


def test_bf16_attention_is_routed_on_and_off_and_keeps_other_implementations(base: Any) -> None:
    assert use_bf16_attention(base.model, on=True) and base.model.config._attn_implementation == NAME
    assert not use_bf16_attention(base.model, on=False) and base.model.config._attn_implementation == SDPA
    def model(implementation: str, backend: bool) -> Any:
        config = type("Config", (), {"_attn_implementation": implementation})()
        return type("Model", (), {"config": config, "_supports_attention_backend": backend})()

    for other in (model("eager", True), model(SDPA, False)):  # another kernel; a model testing for "sdpa" itself
        before = other.config._attn_implementation
        assert not use_bf16_attention(other, on=True) and other.config._attn_implementation == before


def test_bf16_attention_keeps_packed_examples_apart_and_rounds_as_bf16_does(base: Any) -> None:
    """The packed row's block-diagonal mask holds (the first example's logits do not depend on the second's
    tokens), and the logits differ from fp32 attention's by bf16 rounding only."""
    first = _example(3, 20)
    use_bf16_attention(base.model, on=False)
    fp32 = _logits(base.model, [first, _example(11, 30)])
    use_bf16_attention(base.model, on=True)
    try:
        ours = _logits(base.model, [first, _example(11, 30)])
        other = _logits(base.model, [first, _example(29, 30)])
    finally:
        use_bf16_attention(base.model, on=False)
    assert ours.dtype == torch.float32
    # first fit by decreasing length: the longer (second) example comes first in the row
    assert torch.equal(ours[30:], other[30:])
    assert not torch.equal(ours, fp32)
    torch.testing.assert_close(ours, fp32, rtol=2e-2, atol=2e-2)


def test_bf16_attention_keeps_the_padding_mask(base: Any) -> None:
    """A padded batch: a row's real tokens do not see the padding, whatever its ids."""
    rows = [_example(3, 20), _example(11, 12)]
    batch = data.collate(rows, 0)
    use_bf16_attention(base.model, on=True)
    try:
        with torch.no_grad():
            ours = base.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            batch["input_ids"][1, 12:] = 77
            other = base.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    finally:
        use_bf16_attention(base.model, on=False)
    assert torch.equal(ours[1, :12], other[1, :12]) and torch.equal(ours[0], other[0])


def test_the_memory_and_time_models_count_bf16_attention_on_cuda_with_fp32_activations() -> None:
    from objectives.memory import attention_kernel
    from objectives.shape import ModelShape, TrialSettings
    from objectives.timing import step_flops
    from tests.conftest import SMOLLM2

    shape = ModelShape.from_config(SMOLLM2)
    plain = TrialSettings(micro_batch_size=1, seq_len=512)
    routed = TrialSettings(micro_batch_size=1, seq_len=512, bf16_attention=True)
    assert (plain.attention_bytes, routed.attention_bytes) == (4, 2)
    assert attention_kernel(shape, plain) == "math" and attention_kernel(shape, routed) == "fused"
    for kept_as_is in (TrialSettings(bf16_attention=True, device="cpu"),
                       TrialSettings(bf16_attention=True, upcast=False)):
        assert kept_as_is.attention_bytes == kept_as_is.act_bytes
    (bf16, fp32), (bf16_routed, fp32_routed) = step_flops(SMOLLM2, plain), step_flops(SMOLLM2, routed)
    assert bf16_routed > bf16 and fp32_routed < fp32 and bf16_routed + fp32_routed == pytest.approx(bf16 + fp32)


def test_bf16_attention_is_a_model_setting(tmp_path: Path) -> None:
    cfg, _ = compose.load([*TINY, "model.bf16_attention=false", f"output_dir={tmp_path}"])
    assert cfg.model.bf16_attention is False


@pytest.mark.parametrize(("positions", "offsets", "longest"), [
    ([[0, 1, 2, 3]], [0, 4], 4),  # one example
    ([[0, 1, 0, 1, 2, 0]], [0, 2, 5, 6], 3),  # three packed examples
    ([[0, 1, 2], [0, 0, 1]], [0, 3, 4, 6], 3),  # every row starts an example
    ([[5, 6, 7], [5, 6, 7]], [0, 3, 6], 3),  # offset positions still count on by one
])
def test_example_bounds_split_packed_rows_where_the_positions_restart(
        positions: list[list[int]], offsets: list[int], longest: int) -> None:
    bounds, most = attention.example_bounds(torch.tensor(positions), len(positions))
    assert bounds.dtype == torch.int32 and bounds.tolist() == offsets and most == longest


def test_position_ids_broadcast_over_rows_as_transformers_passes_them() -> None:
    bounds, most = attention.example_bounds(torch.arange(4).unsqueeze(0), 3)
    assert bounds.tolist() == [0, 4, 8, 12] and most == 4


@pytest.mark.parametrize("model_type", attention.PLAIN_CAUSAL)
def test_plain_causal_models_hand_their_attention_the_position_ids(model_type: str) -> None:
    """The variable-length kernel reads each example's bounds from the position ids: every model type that may
    take it must pass them to its attention function."""
    from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    seen: list[Any] = []

    def spy(module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("position_ids"))
        return sdpa_attention_forward(module, *args, **kwargs)

    AttentionInterface.register("spy", spy)
    config = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                  sliding_window=None)
    assert attention.plain_causal(config)
    config._attn_implementation = "spy"
    model = AutoModelForCausalLM.from_config(config)
    positions = torch.tensor([[0, 1, 2, 0, 1, 2]])
    with torch.no_grad():
        model(input_ids=torch.arange(6).unsqueeze(0), position_ids=positions)
    assert len(seen) == 2 and all(p is not None and torch.equal(p, positions) for p in seen)


def test_the_mask_stays_sdpa_s_off_cuda(base: Any) -> None:
    """The CPU never takes the variable-length kernel: packed rows keep their block-diagonal mask."""
    from transformers.masking_utils import sdpa_mask

    kwargs = dict(batch_size=1, q_length=6, kv_length=6, q_offset=0, kv_offset=0, attention_mask=None,
                  device=torch.device("cpu"), config=base.model.config, allow_is_causal_skip=False)
    assert torch.equal(attention.packed_mask(**kwargs), sdpa_mask(**kwargs))
    assert not attention.plain_causal(type("Config", (), {"model_type": "llama", "sliding_window": 4096})())
    use_bf16_attention(base.model, on=True)
    try:
        (batch,) = data.pack([_example(3, 20), _example(11, 30)], 0, 64, 1)
        assert attention.on_device(base.model, batch, torch.device("cpu")).keys() == batch.keys()
        assert not attention.routed(base.model, torch.device("cpu"))
    finally:
        use_bf16_attention(base.model, on=False)


def _flash_by_segments(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor, longest: int,
                       scale: float | None) -> torch.Tensor:
    """The variable-length kernel's arithmetic, segment by segment, with sdpa: where flash does not run."""
    out = []
    for start, end in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True):
        assert end - start <= longest
        segment = [t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v)]
        out.append(torch.nn.functional.scaled_dot_product_attention(
            *segment, is_causal=True, scale=scale, enable_gqa=True)[0].transpose(0, 1))
    return torch.cat(out)


def _packed_passes() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Two rows of 40 tokens: 30 + 10 tokens, and 20 (first fit by decreasing length); and the same with the
    10-token example's tokens changed."""
    examples = [_example(3, 20), _example(11, 30), _example(17, 10)]
    (batch,) = data.pack(examples, 0, 40, 2)
    (other,) = data.pack([*examples[:2], _example(29, 10)], 0, 40, 2)
    assert batch["input_ids"].shape == (2, 40) and not torch.equal(batch["input_ids"], other["input_ids"])
    return batch, other


def _adapter_run(res: Any, cfg: Any, pass_: dict[str, torch.Tensor], device: torch.device,
                 host: bool) -> tuple[torch.Tensor, list[torch.Tensor], dict[str, Any]]:
    """Logits and adapter gradients of one pass, with the bounds handed in from the host (as the training loop
    does) or read from the position ids on the device; and what went into the model."""
    from objectives.transfer import to_device

    inputs = {k: v for k, v in pass_.items() if k != "labels"}
    with res.base.adapter(cfg.lora, seed=0) as peft:
        sent = attention.on_device(peft, inputs, device) if host else to_device(inputs, device)
        logits = peft(**sent).logits
        logits.float().square().mean().backward()
        grads = [p.grad.float().clone() for p in peft.parameters() if p.requires_grad]
    return logits.detach().float(), grads, sent


def _check_variable_length_route(res: Any, cfg: Any, device: torch.device) -> None:
    """Packed rows without a mask: examples stay apart, the host's and the device's bounds agree, and logits and
    gradients agree with sdpa's block mask to bf16 rounding; a pass with a mask of all ones keeps sdpa's kernels
    and attends across the examples, as sdpa does."""
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    batch, other = _packed_passes()
    use_bf16_attention(res.base.model, on=True)
    try:
        assert attention.routed(res.base.model, device)
        host, host_grads, sent = _adapter_run(res, cfg, batch, device, host=True)
        assert "cu_seq_lens_q" in sent
        assert sent["cu_seq_lens_q"].tolist() == [0, 30, 40, 60, 80] and sent["max_length_q"] == 30
        device_read, device_grads, _ = _adapter_run(res, cfg, batch, device, host=False)
        torch.testing.assert_close(device_read, host, rtol=0, atol=0)
        for ours, theirs in zip(device_grads, host_grads, strict=True):  # flash's backward sums in no fixed order
            torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-4 * float(theirs.abs().max()))
        changed, _, _ = _adapter_run(res, cfg, other, device, host=True)
        assert torch.equal(changed[0, :30], host[0, :30]) and torch.equal(changed[1], host[1])
        AttentionMaskInterface.register(NAME, sdpa_mask)
        try:
            masked, masked_grads, _ = _adapter_run(res, cfg, batch, device, host=False)
        finally:
            use_bf16_attention(res.base.model, on=True)
        torch.testing.assert_close(host, masked, rtol=2e-2, atol=2e-2)
        for ours, theirs in zip(host_grads, masked_grads, strict=True):
            torch.testing.assert_close(ours, theirs, rtol=5e-2, atol=5e-2 * float(theirs.abs().max()))
        ids, positions = batch["input_ids"].to(device), batch["position_ids"].to(device)
        with torch.no_grad():
            across = res.base.model(input_ids=ids, position_ids=positions,
                                    attention_mask=torch.ones_like(ids)).logits.float()
        assert not torch.allclose(across[0, 30:], host[0, 30:], rtol=2e-2, atol=2e-2)
    finally:
        use_bf16_attention(res.base.model, on=False)


def test_the_variable_length_route_where_flash_would_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The route as it runs on CUDA, on the CPU: flash's kernel replaced by its arithmetic, segment by segment."""
    monkeypatch.setattr(attention, "_flash_runs", lambda device: True)
    monkeypatch.setattr(attention, "_flash", _flash_by_segments)
    cfg, _ = compose.load([*TINY, *SOURCE, "search_space=none", "train.device=cpu", "lora.dropout=0",
                           f"output_dir={tmp_path}"])
    res = Resources.load(cfg)
    assert not attention.routed(res.base.model, torch.device("cpu"))  # bf16 attention is off on the CPU
    _check_variable_length_route(res, cfg, torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_packed_rows_take_the_variable_length_kernel_on_cuda(tmp_path: Path) -> None:
    cfg, _ = compose.load([*TINY, *SOURCE, "search_space=none", "train.device=cuda", "lora.dropout=0",
                           f"output_dir={tmp_path}"])
    res = Resources.load(cfg)
    assert res.base.bf16_attention and attention.takes_varlen(res.base.model.config, res.base.device)
    _check_variable_length_route(res, cfg, res.base.device)
