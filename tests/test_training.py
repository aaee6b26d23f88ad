"""The training loop's stop rule: a non-finite loss or gradient norm ends the trial before the update."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from objectives.training import LossNotFinite, train_adapter
from sweeper import compose
from sweeper.config import LoraConfig
from sweeper.launch import Resources
from tests.conftest import TINY


@pytest.mark.parametrize("scale", [math.inf, math.nan])
def test_a_non_finite_gradient_stops_before_the_update(tmp_path: Path, scale: float) -> None:
    cfg, _ = compose.load([*TINY, "search_space=none", "train.max_grad_norm=0", f"output_dir={tmp_path}"])
    res = Resources.load(cfg)
    with res.base.adapter(LoraConfig(r=4, targets="qk"), seed=0) as model:
        params = [p for p in model.parameters() if p.requires_grad]
        before = [p.detach().clone() for p in params]
        handle = params[0].register_hook(lambda grad: grad * scale)
        try:
            with pytest.raises(LossNotFinite, match="gradient norm is (inf|nan) at step 1"):
                train_adapter(model, res.data, cfg.train, cfg.optimizer, res.base.device,
                              res.base.tokenizer.pad_token_id)
        finally:
            handle.remove()
        assert all(torch.equal(a, p.detach()) for a, p in zip(before, params, strict=True))
