"""Run a test function on N ranks under torchrun (gloo on CPU) and collect what each rank returns.

A worker is a plain module-level function. It receives the keyword arguments given here and
returns something JSON-serialisable (or None). A failing rank's traceback is reported by
rank; a run that exceeds its time limit is killed as a whole process group, never left hanging.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import psutil

from flowrl_megatron.runtime.distributed import free_port

REPO = Path(__file__).resolve().parent.parent


class DistributedFailure(AssertionError):
    pass


def run_distributed(target: str, nproc: int, timeout: float = 300, **kwargs: Any) -> list[Any]:
    """Run ``target`` ("package.module:function") on ``nproc`` ranks; return the per-rank results."""
    with tempfile.TemporaryDirectory(prefix="flowrl-dist-") as result_dir:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={nproc}",
            "--master-addr=127.0.0.1",
            f"--master-port={free_port()}",
            "-m",
            "tests.dist_entry",
            target,
            json.dumps(kwargs),
            result_dir,
        ]
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            output, _ = proc.communicate(timeout=30)
            raise DistributedFailure(
                f"{target} on {nproc} ranks timed out after {timeout:.0f}s and was killed.\n"
                + _rank_errors(Path(result_dir), nproc)
                + _tail(output)
            ) from None
        if proc.returncode != 0:
            raise DistributedFailure(
                f"{target} on {nproc} ranks failed (torchrun exit {proc.returncode}).\n"
                + _rank_errors(Path(result_dir), nproc)
                + _tail(output)
            )
        return [json.loads((Path(result_dir) / f"rank{r}.json").read_text()) for r in range(nproc)]


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun starts workers in their own sessions)."""
    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    psutil.wait_procs(procs, timeout=10)


def _rank_errors(result_dir: Path, nproc: int) -> str:
    """Each rank's traceback, earliest first: later ones are often consequences (a peer vanished)."""
    errors = sorted((result_dir / f"rank{r}.error" for r in range(nproc)), key=_mtime)
    parts = []
    for i, err in enumerate(e for e in errors if e.exists()):
        rank = err.stem.removeprefix("rank")
        label = "first failure" if i == 0 else "later, possibly a consequence"
        parts.append(f"--- rank {rank} raised ({label}) ---\n{err.read_text()}")
    for r in range(nproc):
        if not (result_dir / f"rank{r}.error").exists() and not (result_dir / f"rank{r}.json").exists():
            parts.append(f"--- rank {r}: no result (killed, hung or stopped by another rank's failure) ---")
    return "\n".join(parts) + "\n"


def _mtime(path: Path) -> float:
    return path.stat().st_mtime_ns if path.exists() else float("inf")


def _tail(output: str, lines: int = 40) -> str:
    return "--- last output ---\n" + "\n".join(output.splitlines()[-lines:])
