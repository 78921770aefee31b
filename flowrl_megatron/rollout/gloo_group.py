"""The trainer<->engines gloo group, outside torch.distributed's default group (each side already has one)."""

from __future__ import annotations

import datetime
import socket

import torch
import torch.distributed as dist


def rendezvous_store(address: str, port: int, rank: int, world_size: int, timeout_s: float) -> dist.TCPStore:
    """Rank 0 hosts the store, listening only on ``address`` (a TCPStore on its own listens on every interface of
    the node). The host passes ``port=0`` and reads the port the OS chose from ``store.port``: a port picked in
    advance can be taken meanwhile (gloo itself binds ephemeral ports for its pairs)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if rank != 0:
        return dist.TCPStore(address, port, world_size, is_master=False, timeout=timeout)
    family = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)[0][0]
    listener = socket.create_server((address, port), family=family)
    return dist.TCPStore(address, listener.getsockname()[1], world_size, is_master=True, timeout=timeout,
                         wait_for_workers=False, master_listen_fd=listener.detach())  # the store owns the socket


def gloo_group(store: dist.Store, rank: int, world_size: int, timeout_s: float,
               bind_address: str | None = None) -> dist.ProcessGroup:
    """Returns once every rank has joined through ``store``. ``bind_address``: the address this rank's gloo pairs
    listen on (default: the node's, from its hostname or ``GLOO_SOCKET_IFNAME``)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if bind_address is None:
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
    options = dist.ProcessGroupGloo._Options()
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=bind_address)]
    options._timeout = timeout
    return dist.ProcessGroupGloo(store, rank, world_size, options)


def join_group(address: str, port: int, rank: int, world_size: int, timeout_s: float) -> dist.ProcessGroup:
    """Join the group whose store rank 0 hosts at ``address:port``."""
    return gloo_group(rendezvous_store(address, port, rank, world_size, timeout_s), rank, world_size, timeout_s)


def broadcast(group: dist.ProcessGroup, tensor: torch.Tensor, root: int = 0) -> None:
    """Broadcast ``tensor`` in place from ``root`` over a group made by ``join_group``."""
    opts = dist.BroadcastOptions()
    opts.rootRank = root
    group.broadcast([tensor], opts).wait()
