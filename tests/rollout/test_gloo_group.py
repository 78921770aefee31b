"""The trainer<->engines rendezvous listens only on the configured address: the store (which torch's TCPStore would
open on every interface) and the host rank's gloo pairs."""

from __future__ import annotations

import os
import threading

import psutil
import torch

from flowrl_megatron.rollout.gloo_group import broadcast, gloo_group, rendezvous_store


def listening() -> set[tuple[str, int]]:
    return {(c.laddr.ip, c.laddr.port) for c in psutil.Process(os.getpid()).net_connections("tcp")
            if c.status == psutil.CONN_LISTEN}


def test_the_rendezvous_listens_only_on_the_configured_address():
    before = listening()
    store = rendezvous_store("127.0.0.1", 0, 0, 2, timeout_s=30)
    assert listening() - before == {("127.0.0.1", store.port)}
    groups: dict[int, object] = {}

    def join(rank: int) -> None:
        s = store if rank == 0 else rendezvous_store("127.0.0.1", store.port, rank, 2, timeout_s=30)
        groups[rank] = gloo_group(s, rank, 2, timeout_s=30, bind_address="127.0.0.1")

    threads = [threading.Thread(target=join, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert set(groups) == {0, 1}
    opened = listening() - before
    assert len(opened) >= 2 and {ip for ip, _ in opened} == {"127.0.0.1"}  # the store and the gloo pairs
    sent, received = torch.arange(5.0), torch.zeros(5)
    done = threading.Thread(target=broadcast, args=(groups[1], received))
    done.start()
    broadcast(groups[0], sent)
    done.join(timeout=60)
    assert torch.equal(received, sent)
