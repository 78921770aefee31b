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


@pytest.mark.distributed
def test_nonfinite_updates_are_skipped_on_every_rank_and_stop_the_run_when_they_repeat(tiny_untied, tmp_path):
    """A NaN or infinity in one rank's gradient shard skips the update on both ranks (they must agree, or their
    weights would part); a finite update resets the count; two non-finite ones in a row stop the run, naming the step
    and the quantity."""
    ckpt = hf_to_megatron(tiny_untied, tmp_path / "ckpt")
    ranks = run_distributed("tests.training.workers:nonfinite_updates", 2, ckpt=str(ckpt))
    for r in ranks:
        assert (r["finite"], r["gradient"], r["recovered"], r["again"]) == (True, False, True, False)
        assert r["skipped"] == 3 and r["error"] == (
            "2 updates in a row were not finite, the last at step 5 (first non-finite: loss); the run stops before "
            "they reach the weights. Lower train.lr or train.grad_clip, check this step's rewards and data, or resume "
            "from the last checkpoint.")
