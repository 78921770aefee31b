"""Code that runs on every rank under torchrun (see tests.distributed)."""

from __future__ import annotations

import os
import time


def parallel_ranks(layouts: list[list[int]]) -> list[dict]:
    """For each (tp, pp) in turn, in the same processes: initialise the layout (replacing the previous one), run a
    gloo all-reduce on each Megatron group, report this rank's coordinates."""
    return [_layout_ranks(tp, pp) for tp, pp in layouts]


def _layout_ranks(tp: int, pp: int) -> dict:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from flowrl_megatron.runtime import ParallelLayout, backend, init_model_parallel

    init_model_parallel(ParallelLayout(tp=tp, pp=pp))
    sums = {}
    for name, group in {
        "world": None,
        "tp": ps.get_tensor_model_parallel_group(),
        "pp": ps.get_pipeline_model_parallel_group(),
        "dp": ps.get_data_parallel_group(),
    }.items():
        t = torch.ones(1)
        dist.all_reduce(t, group=group)
        sums[name] = int(t.item())
    return {
        "backend": backend(),
        "dist_backend": dist.get_backend(),
        "tp_rank": ps.get_tensor_model_parallel_rank(),
        "pp_rank": ps.get_pipeline_model_parallel_rank(),
        "dp_rank": ps.get_data_parallel_rank(),
        "group_sizes": sums,
    }


def fail_on_rank(rank: int) -> None:
    from flowrl_megatron.runtime import init_distributed

    init_distributed()
    if int(os.environ["RANK"]) == rank:
        raise ValueError(f"deliberate failure on rank {rank}")
    import torch.distributed as dist

    dist.barrier()


def hang_on_rank(rank: int) -> None:
    if int(os.environ["RANK"]) == rank:
        time.sleep(3600)


def cpu_layer_behaviour() -> dict:
    """What megatron-core's CUDA calls do once the CPU layer is installed."""
    import torch
    from megatron.core import tensor_parallel

    from flowrl_megatron.runtime import ParallelLayout, init_model_parallel
    from flowrl_megatron.runtime.cpu_compat import is_active

    init_model_parallel(ParallelLayout(), seed=7)
    x = torch.zeros(3, device="cuda")
    y = torch.empty(2, device=torch.device("cuda", 0))
    z = torch.ones(2).cuda()
    w = torch.ones(2).to("cuda:0")
    p = torch.ones(2, pin_memory=True)
    q = torch.tensor([1.0], device=torch.cuda.current_device())
    n = x.new_zeros(2, device="cuda")
    k = torch.ones(2).to(device="cuda", dtype=torch.float64)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    with tracker.fork():
        a = torch.rand(4)
    with tracker.fork():
        b = torch.rand(4)
    torch.cuda.manual_seed(3)
    c = torch.rand(2)
    torch.cuda.manual_seed(3)
    d = torch.rand(2)
    return {
        "active": is_active(),
        "devices": [str(t.device) for t in (x, y, z, w, p, q, n, k)],
        "type_name": x.type(),
        "converted": [x.type(torch.float64).dtype == torch.float64, k.dtype == torch.float64],
        "current_device": str(torch.cuda.current_device()),
        "tracker_streams_differ": not torch.equal(a, b),
        "cuda_seed_reproducible": torch.equal(c, d),
    }
