"""FlowRL matches a multimodal target on an enumerable toy; GRPO collapses (bench/toy_distribution_matching.py).

Each run is seeded and single-threaded, but the table kept in docs/ is one CPU model's: on another, kernels round
differently, which moves the computed rows (target, reference) by at most 0.01 (seen: 0.005) and sends the trained
rows down another sampling trajectory altogether (seen: FlowRL's KL 0.016 on one machine, 0.354 on another, same
seed). So this test reproduces only the computed rows; the claims about training are ``--check``'s, over 3 seeds.
Seed 2's 300-step warm-up itself ends elsewhere on some CPUs: the table's (AMD EPYC) reference has 0.209 of its mass
on unrewarded responses, an Intel Xeon's 0.320 (KL to the target 2.900 against 4.415; seeds 0 and 1 within 0.005
of the table there), so the computed rows are compared for seeds 0 and 1; ``--check`` still runs all three.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.distributed import REPO

DOC = REPO / "docs" / "toy_distribution_matching.md"
COMPUTED = ("target pi*", "reference pi_ref")
REPRODUCED_SEEDS = ("0", "1")  # whose warm-up ends at the table's reference on every CPU seen


@pytest.mark.slow
def test_flowrl_matches_the_target_and_grpo_collapses():
    result = subprocess.run([sys.executable, "bench/toy_distribution_matching.py", "--check"],
                            cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    table, kept = rows(result.stdout), rows(DOC.read_text())
    assert {key[1] for key in table} == {*COMPUTED, "FlowRL", "GRPO"}
    assert {key[0] for key in table} == {"0", "1", "2"}
    for key, values in table.items():
        if key[1] in COMPUTED and key[0] in REPRODUCED_SEEDS:
            assert values == pytest.approx(kept[key], abs=0.01), f"{key}: the run no longer reproduces {DOC.name}"


def rows(markdown: str) -> dict[tuple[str, str], list[float]]:
    """The numbers of each row of the markdown table, by (seed, policy)."""
    out = {}
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("|") and cells[2:] and cells[2][:1].isdigit():
            out[cells[0], cells[1]] = [float(c) for c in cells[2:]]
    return out


ORDER_INDEPENDENCE = """
import json, sys
sys.path.insert(0, "bench")
from toy_distribution_matching import run_seed
kw = dict(steps=5, samples=8, lr=5e-4, flowrl_normalization=None, z_lr_mult=1.0, warm_up_steps=5)
print(json.dumps([run_seed(0, ["grpo", "ppo", "flowrl"], **kw)["rows"], run_seed(0, ["ppo", "flowrl"], **kw)["rows"],
                  run_seed(0, ["flowrl"], **kw)["rows"]]))
"""


def test_a_seeds_algorithms_train_in_one_process_as_each_would_alone():
    """One process warms a seed's reference up once and trains its algorithms in turn; training draws nothing from
    the global generators, so every row is the same whatever ran before it in that process."""
    result = subprocess.run([sys.executable, "-c", ORDER_INDEPENDENCE], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    three, two, one = json.loads(result.stdout.splitlines()[-1])
    assert three["flowrl"] == two["flowrl"] == one["flowrl"] and three["ppo"] == two["ppo"]
    assert three["reference"] == two["reference"] == one["reference"]
    assert three["flowrl"] != three["grpo"] and three["grpo"]["kl"] != three["reference"]["kl"]  # they trained
