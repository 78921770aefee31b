"""The trainer<->engines gloo group, outside torch.distributed's default group (each side already has one)."""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist


def rendezvous_store(address: str, port: int, rank: int, world_size: int, timeout_s: float) -> dist.TCPStore:
    """Rank 0 hosts the store. The host passes ``port=0`` and reads the port the OS chose from ``store.port``:
    a port picked in advance can be taken meanwhile (gloo itself binds ephemeral ports for its pairs)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    return dist.TCPStore(address, port, world_size, is_master=rank == 0, timeout=timeout, wait_for_workers=False)


def gloo_group(store: dist.Store, rank: int, world_size: int, timeout_s: float) -> dist.ProcessGroup:
    """Returns once every rank has joined through ``store``."""
    return dist.ProcessGroupGloo(store, rank, world_size, datetime.timedelta(seconds=timeout_s))


def join_group(address: str, port: int, rank: int, world_size: int, timeout_s: float) -> dist.ProcessGroup:
    """Join the group whose store rank 0 hosts at ``address:port``."""
    return gloo_group(rendezvous_store(address, port, rank, world_size, timeout_s), rank, world_size, timeout_s)


def broadcast(group: dist.ProcessGroup, tensor: torch.Tensor, root: int = 0) -> None:
    """Broadcast ``tensor`` in place from ``root`` over a group made by ``join_group``."""
    opts = dist.BroadcastOptions()
    opts.rootRank = root
    group.broadcast([tensor], opts).wait()
