"""model.bf16_attention: an fp32 stream's attention on bf16 copies of its inputs, as autocast runs it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from objectives import data
from objectives.attention import NAME, SDPA, use_bf16_attention
from sweeper import compose
from sweeper.launch import Resources
from tests.conftest import TINY


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    cfg, _ = compose.load([*TINY, "search_space=none", f"output_dir={tmp_path_factory.mktemp('attention')}"])
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
