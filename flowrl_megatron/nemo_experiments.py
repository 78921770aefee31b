"""nemo-run experiments for the recipes: ``flowrl launch RECIPE [key=value ...] --executor local|slurm``.

local: one machine, nemo-run's LocalExecutor with its torchrun launcher running the trainer on tp x pp x dp
ranks (rank 0 starts the engines, as ``flowrl train`` does). slurm: a SlurmExecutor allocation (nodes, GPUs,
retries: nemo-run requeues a failed job, which resumes from the latest checkpoint) whose one step runs the sbatch
file's body on the first node: the roles, their placement and every default live in that file
(slurm/qwen32b_flowrl.sbatch by default), so a job launched through nemo-run runs exactly what ``sbatch`` would.
The container image and mounts go to the role steps that file starts (inside a container there is no srun to
start them), through CONTAINER_IMAGE / CONTAINER_MOUNTS. ``--dryrun`` prints the sbatch script instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class SlurmSettings:
    account: str = "flowrl"
    partition: str = "batch"
    nodes: int = 4
    gpus_per_node: int = 8
    time: str = "48:00:00"
    container_image: str = "nvcr.io/nvidia/pytorch:25.09-py3"
    container_mounts: list[str] = field(
        default_factory=lambda: ["/models:/models", "/data:/data", "/checkpoints:/checkpoints"])
    sbatch_file: str = "slurm/qwen32b_flowrl.sbatch"
    retries: int = 3  # nemo-run requeues a failed job this often; each run resumes from the latest checkpoint
    job_dir: str = "nemo_experiments"


def local_job(recipe: str, overrides: list[str]):
    """The recipe's run on this machine: (task, LocalExecutor with torchrun, run_dir)."""
    import nemo_run as run

    from flowrl_megatron.config import load_config, write_run_config

    cfg = load_config(recipe, overrides)
    config = write_run_config(cfg)
    executor = run.LocalExecutor(ntasks_per_node=cfg.world_size, launcher="torchrun",
                                 env_vars={"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    task = run.Script(path="flowrl_megatron.trainer", m=True, entrypoint="python", args=[str(config)])
    return task, executor, Path(cfg.run_dir)


def slurm_job(recipe: str, overrides: list[str], settings: SlurmSettings):
    """The multi-node job for nemo-run's SlurmExecutor (see the module docstring): (task, executor)."""
    import nemo_run as run

    env = {"RECIPE": recipe, "OVERRIDES": " ".join(overrides), "PROCS_PER_NODE": str(settings.gpus_per_node),
           "CONTAINER_IMAGE": settings.container_image,
           "CONTAINER_MOUNTS": ",".join([*settings.container_mounts, f"{REPO}:{REPO}"])}
    executor = run.SlurmExecutor(
        account=settings.account, partition=settings.partition, nodes=settings.nodes, ntasks_per_node=1,
        gpus_per_node=settings.gpus_per_node, time=settings.time, exclusive=True, retries=settings.retries,
        srun_args=["--nodes=1", "--ntasks=1", "--overlap", f"--chdir={REPO}"], env_vars=env,
        job_dir=settings.job_dir, tunnel=run.LocalTunnel(job_dir=settings.job_dir), packager=run.Packager())
    return run.Script(path=str(REPO / settings.sbatch_file), entrypoint="bash"), executor


def launch(task, executor, name: str = "flowrl", dryrun: bool = False) -> str | None:
    """Run the task as a nemo-run experiment and wait for it; with ``dryrun``, return the rendered sbatch script
    (Slurm) instead of submitting anything."""
    import nemo_run as run

    with run.Experiment(name, executor=executor, log_level="WARN") as experiment:
        experiment.add(task, name="train")
        if dryrun:
            experiment.dryrun(log=False, delete_exp_dir=False)
            scripts = sorted(Path(experiment._exp_dir).glob("*_sbatch.sh"))
            return scripts[-1].read_text() if scripts else None
        experiment.run(sequential=True, detach=False)
    return None
