"""Conversion streams: peak memory does not grow with the number of layers (bench/conversion_memory.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.distributed import REPO


@pytest.mark.slow
def test_peak_memory_is_flat_in_layer_count():
    # 2 -> 12 layers adds ~115 MB of weights; holding the model would add >= 1 byte per byte.
    result = subprocess.run(
        [sys.executable, "bench/conversion_memory.py", "--layers", "2", "12", "--max-growth", "0.25"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "growth of peak per byte of model added" in result.stdout
