"""Device, backend and parallel-state set-up: the one place that decides CPU/gloo vs CUDA/NCCL."""

from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from flowrl_megatron.runtime import cpu_compat


@dataclass(frozen=True)
class ParallelLayout:
    """How the trainer's world is split. Data parallelism is whatever is left over."""

    tp: int = 1
    pp: int = 1

    def dp(self, world_size: int) -> int:
        model_parallel = self.tp * self.pp
        if world_size % model_parallel:
            raise ValueError(
                f"world size {world_size} is not a multiple of TP*PP={model_parallel}; "
                f"launch a multiple of {model_parallel} processes or change tp/pp."
            )
        return world_size // model_parallel


def device() -> torch.device:
    """The compute device of this process: its local CUDA GPU, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(timeout_minutes: int = 10) -> None:
    """Start torch.distributed from torchrun's environment (or a one-process world).

    On CPU this also installs the megatron-core CPU layer, before any Megatron code runs.
    """
    cpu_compat.install()
    if torch.cuda.is_available():
        torch.cuda.set_device(device())
    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    dist.init_process_group(
        backend=backend(),
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )


def init_model_parallel(layout: ParallelLayout, seed: int = 1234) -> None:
    """Initialise Megatron's parallel state for ``layout`` and seed every RNG."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    init_distributed()
    layout.dp(dist.get_world_size())
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
    )
    seed_everything(seed)
    model_parallel_cuda_manual_seed(seed)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now (another process may take it before it is bound: prefer port 0 where the API allows)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
