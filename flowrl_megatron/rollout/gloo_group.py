"""The trainer<->engines gloo group, outside torch.distributed's default group (each side already has one)."""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist


def join_group(address: str, port: int, rank: int, world_size: int, timeout_s: float) -> dist.ProcessGroup:
    """Rank 0 (the trainer's sender) hosts the rendezvous store; the constructor returns once all ranks joined."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(address, port, world_size, is_master=rank == 0, timeout=timeout, wait_for_workers=False)
    return dist.ProcessGroupGloo(store, rank, world_size, timeout)


def broadcast(group: dist.ProcessGroup, tensor: torch.Tensor, root: int = 0) -> None:
    """Broadcast ``tensor`` in place from ``root`` over a group made by ``join_group``."""
    opts = dist.BroadcastOptions()
    opts.rootRank = root
    group.broadcast([tensor], opts).wait()
