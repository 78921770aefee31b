"""Process start-up: device and backend choice, parallel state, seeds, the CPU layer."""

from flowrl_megatron.runtime.distributed import (
    ParallelLayout,
    backend,
    device,
    init_distributed,
    init_model_parallel,
    seed_everything,
    shutdown,
)

__all__ = [
    "ParallelLayout",
    "backend",
    "device",
    "init_distributed",
    "init_model_parallel",
    "seed_everything",
    "shutdown",
]
