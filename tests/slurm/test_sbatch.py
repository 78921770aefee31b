"""slurm/tiny_cpu.sbatch on a real one-node Slurm cluster: the 32B job's structure (slurm/launch.sh: a vLLM
engine under srun, torchrun under srun, the trainer reaching the engine by URL) is requeued by a signal, resumes and
runs to the end, leaving its checkpoint, metrics and per-role logs; a role that fails ends the job non-zero with a
message naming it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest

from tests.distributed import REPO
from tests.slurm.cluster import SlurmCluster

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        yield c.start()
    finally:
        c.stop()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    subprocess.run([sys.executable, "-m", "flowrl_megatron", "make-tiny", str(root)], check=True, cwd=REPO,
                   capture_output=True)
    return root


def sbatch(cluster: SlurmCluster, tmp_path, **settings: str) -> tuple[int, str]:
    out = tmp_path / "job.out"
    env = {**cluster.env, "FLOWRL_PYTHON": sys.executable, **settings}
    done = subprocess.run(["sbatch", "--wait", f"--output={out}", "slurm/tiny_cpu.sbatch"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    return done.returncode, (out.read_text() if out.exists() else "") + done.stderr


def test_a_failing_role_ends_the_job_with_its_name(cluster, tiny, tmp_path):
    """Weights that pass the driver's checks (a readable safetensors file) but lack a tensor config.json needs: the
    trainer's conversion fails under srun, and the job says which role failed. (Weights that are no safetensors
    file at all are refused by `flowrl train --prepare` before any role starts: tests/test_cli.py.)"""
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "missing_tensor"
    shutil.copytree(tiny / "model", broken)
    weights = load_file(broken / "model.safetensors")
    del weights["model.norm.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    code, log = sbatch(cluster, tmp_path, RUN_DIR=str(tmp_path / "run"), MODEL=str(broken),
                       OVERRIDES=f"data.train_files=[{tiny / 'train.jsonl'}] train.steps=2")
    assert code != 0
    assert "flowrl: the trainer failed (exit" in log, log
    assert not list(tmp_path.glob("run/checkpoints/step_*"))


def test_a_signalled_job_requeues_resumes_and_finishes(cluster, tiny, tmp_path):
    """The tiny job trains asynchronously (rollout.max_staleness=1) with its engine under srun; SIGUSR1 to the batch
    script (what --signal=B:USR1@... sends before preemption or the time limit) requeues it; the second run resumes
    from the latest checkpoint and finishes every step once, every prompt of the data order trained once or still
    pending, leaving its checkpoint, metrics and per-role logs."""
    run_dir = tmp_path / "run"
    env = {**cluster.env, "FLOWRL_PYTHON": sys.executable, "RUN_DIR": str(run_dir), "MODEL": str(tiny / "model"),
           "OVERRIDES": f"data.train_files=[{tiny / 'train.jsonl'}] train.steps=6 checkpoint.every=2 "
                        "rollout.max_staleness=1"}
    job = subprocess.run(["sbatch", "--parsable", f"--output={tmp_path / 'job.out'}", "slurm/tiny_cpu.sbatch"],
                         cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout.strip()
    deadline = time.monotonic() + 600
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert time.monotonic() < deadline, (tmp_path / "job.out").read_text()
        time.sleep(0.5)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=cluster.env, check=True)
    while True:
        state = subprocess.run(["scontrol", "show", "job", job], env=cluster.env, capture_output=True,
                               text=True).stdout
        if "JobState=COMPLETED" in state or "JobState=FAILED" in state:
            break
        assert time.monotonic() < deadline, state
        time.sleep(1)
    log = (tmp_path / "job.out").read_text()
    assert "JobState=COMPLETED" in state and "Restarts=1" in state, state + log
    assert "requeueing" in log and "training finished" in log
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    assert rows[-1]["weights/version"] == 6 and max(r["rollout/staleness_max"] for r in rows) == 1
    trained = [g[0] for line in (run_dir / "rollouts.jsonl").read_text().splitlines()
               for g in json.loads(line)["trained"]]
    state = json.loads((run_dir / "checkpoints" / "step_00000006" / "trainer_state.json").read_text())
    assert len(trained) == len(set(trained)) == 6 * 8
    assert sorted(trained + state["rollout"]["pending"]) == list(range(len(trained) + len(state["rollout"]["pending"])))
    logs = {p.name.split("-")[0] for p in (run_dir / "logs").glob("job-*/*.log")}
    assert logs == {"rollout", "trainer"}
    config = (run_dir / "config.yaml").read_text()
    assert "engine_urls:\n  - http://" in config  # the trainer used the engine srun started, not its own
