"""The torchrun harness itself and Megatron's parallel state on gloo at world sizes 1, 2 and 4."""

from __future__ import annotations

import time

import pytest

from tests.distributed import DistributedFailure, run_distributed

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize(
    ("world", "tp", "pp", "expected"),
    [
        (1, 1, 1, {(0, 0, 0)}),
        (2, 2, 1, {(0, 0, 0), (1, 0, 0)}),
        (2, 1, 2, {(0, 0, 0), (0, 1, 0)}),
        (2, 1, 1, {(0, 0, 0), (0, 0, 1)}),
        (4, 2, 2, {(0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0)}),
    ],
    ids=["world1", "tp2", "pp2", "dp2", "tp2xpp2"],
)
def test_layouts_on_gloo(world, tp, pp, expected):
    results = run_distributed("tests.runtime.workers:parallel_ranks", world, tp=tp, pp=pp)
    assert {(r["tp_rank"], r["pp_rank"], r["dp_rank"]) for r in results} == expected
    dp = world // (tp * pp)
    for r in results:
        assert r["backend"] == "gloo" and r["dist_backend"] == "gloo"
        assert r["group_sizes"] == {"world": world, "tp": tp, "pp": pp, "dp": dp}


def test_failing_rank_is_named_with_its_traceback():
    with pytest.raises(DistributedFailure) as err:
        run_distributed("tests.runtime.workers:fail_on_rank", 2, rank=1)
    message = str(err.value)
    assert "--- rank 1 raised (first failure) ---" in message
    first = message.split("--- rank 1 raised (first failure) ---")[1].split("--- rank")[0]
    assert "ValueError: deliberate failure on rank 1" in first


def test_hanging_run_times_out_instead_of_blocking():
    start = time.monotonic()
    with pytest.raises(DistributedFailure, match="timed out after 20s"):
        run_distributed("tests.runtime.workers:hang_on_rank", 2, timeout=20, rank=0)
    assert time.monotonic() - start < 60
