"""The Z head trains with the policy's optimizer at its own learning-rate multiplier."""

from __future__ import annotations

import pytest

from flowrl_megatron.conversion.convert import hf_to_megatron
from tests.distributed import run_distributed


@pytest.mark.distributed
def test_z_head_learning_rate_multiplier(tiny_untied, tmp_path):
    ckpt = hf_to_megatron(tiny_untied, tmp_path / "ckpt")
    (r,) = run_distributed("tests.training.workers:z_head_learning_rates", 1, ckpt=str(ckpt), lr_mult=10.0)
    assert r == {"z_head": [1e-2], "rest": [1e-3]}
