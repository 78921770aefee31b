"""The torchrun harness itself and Megatron's parallel state on gloo at world sizes 1, 2 and 4."""

from __future__ import annotations

import time

import pytest

from tests.distributed import DistributedFailure, run_distributed

pytestmark = pytest.mark.distributed


LAYOUTS = {  # id: (world, tp, pp, every rank's (tp_rank, pp_rank, dp_rank))
    "world1": (1, 1, 1, {(0, 0, 0)}),
    "tp2": (2, 2, 1, {(0, 0, 0), (1, 0, 0)}),
    "pp2": (2, 1, 2, {(0, 0, 0), (0, 1, 0)}),
    "dp2": (2, 1, 1, {(0, 0, 0), (0, 0, 1)}),
    "tp2xpp2": (4, 2, 2, {(0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0)}),
}


@pytest.fixture(scope="module")
def launched():
    """Each world size launched once, its layouts initialised one after the other: every rank's report by id."""
    reports: dict[str, list[dict]] = {}

    def get(layout_id: str) -> list[dict]:
        if layout_id not in reports:
            world = LAYOUTS[layout_id][0]
            ids = [i for i, (w, *_) in LAYOUTS.items() if w == world]
            per_rank = run_distributed("tests.runtime.workers:parallel_ranks", world,
                                       layouts=[list(LAYOUTS[i][1:3]) for i in ids])
            reports.update({i: [rank[k] for rank in per_rank] for k, i in enumerate(ids)})
        return reports[layout_id]

    return get


@pytest.mark.parametrize("layout_id", list(LAYOUTS))
def test_layouts_on_gloo(layout_id, launched):
    world, tp, pp, expected = LAYOUTS[layout_id]
    results = launched(layout_id)
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
