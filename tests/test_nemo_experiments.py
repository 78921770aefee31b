"""nemo-run: a real LocalExecutor (torchrun) run of the tiny recipe, and the 32B SlurmExecutor dry run rendered
into an sbatch script equal to the checked-in golden file (paths and experiment ids normalised)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flowrl_megatron.metrics import read_metrics
from tests.distributed import REPO

GOLDEN = REPO / "tests" / "golden" / "qwen32b_nemo_sbatch.sh"


def normalised(script: str, job_dir: str) -> str:
    script = script.replace(job_dir, "<job_dir>").replace(str(REPO), "<repo>")
    return re.sub(r"flowrl_\d+", "flowrl_<id>", script)


def dry_run(job_dir: str) -> str:
    done = subprocess.run([sys.executable, "-m", "flowrl_megatron", "launch", "recipes/qwen2.5_32b_math.yaml",
                           "train.steps=400", "--executor", "slurm", "--dryrun", "--job-dir", job_dir], cwd=REPO,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return normalised(done.stdout[done.stdout.index("#!/bin/bash"):], job_dir)


def test_slurm_dry_run_matches_the_golden_script(tmp_path):
    assert dry_run(str(tmp_path / "jobs")) == GOLDEN.read_text()


@pytest.mark.slow
def test_local_executor_runs_the_tiny_recipe(tmp_path):
    subprocess.run([sys.executable, "-m", "flowrl_megatron", "make-tiny", str(tmp_path / "tiny")], check=True,
                   cwd=REPO, capture_output=True)
    run_dir = tmp_path / "run"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # torchrun, as when activated
    done = subprocess.run([sys.executable, "-m", "flowrl_megatron", "launch", str(REPO / "recipes/tiny_cpu.yaml"),
                           f"run_dir={run_dir}", f"model.path={tmp_path / 'tiny/model'}",
                           f"data.train_files=[{tmp_path / 'tiny/train.jsonl'}]", "train.steps=2", "--executor",
                           "local"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000002"
