"""FlowRL matches a multimodal target on an enumerable toy; GRPO collapses (bench/toy_distribution_matching.py).

The run is seeded and single-threaded: its table must equal the one kept in docs/, which also keeps the
docs honest.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.distributed import REPO

DOC = REPO / "docs" / "toy_distribution_matching.md"


@pytest.mark.slow
def test_flowrl_matches_the_target_and_grpo_collapses():
    result = subprocess.run([sys.executable, "bench/toy_distribution_matching.py", "--check"],
                            cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    table = [line for line in result.stdout.splitlines() if line.startswith("|")]
    kept = [line for line in DOC.read_text().splitlines() if line.startswith("|")]
    assert table == kept, "the run no longer reproduces docs/toy_distribution_matching.md"
