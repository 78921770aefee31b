"""Trainer side of the weight sync: send HF-named tensors to every engine through vLLM's weight-transfer routes.

Lifecycle per sync: ``start_weight_update`` on every engine, then per bucket an
``update_weights`` call to every engine (each blocks in its workers until the bucket's
broadcast arrives) while the sender broadcasts the packed bucket, then ``finish_weight_update``
with the new weight version. The group (sender = rank 0, then every engine's workers) is
formed once by ``connect``. Backend "gloo" on CPU (``gloo_transfer``); the same routes drive
vLLM's NCCL backend on GPU.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterable, Sequence

import httpx
import torch

from flowrl_megatron.rollout.gloo_group import broadcast, join_group
from flowrl_megatron.rollout.weight_buckets import DEFAULT_BUCKET_BYTES, bucket_meta, buckets, pack


class WeightSyncError(RuntimeError):
    pass


class WeightSender:
    def __init__(self, engine_urls: Sequence[str], engine_tp_sizes: Sequence[int], api_key: str, *,
                 address: str = "127.0.0.1", port: int, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 timeout_s: float = 600.0) -> None:
        self.urls = list(engine_urls)
        self.tp = list(engine_tp_sizes)
        self.address, self.port = address, port
        self.bucket_bytes = bucket_bytes
        self.timeout_s = timeout_s
        self.http = httpx.Client(headers={"Authorization": f"Bearer {api_key}"}, timeout=timeout_s)
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(len(self.urls), 1))
        self.group = None
        self.version = 0

    def _post_all(self, route: str, bodies: Sequence[dict]) -> list[concurrent.futures.Future]:
        return [self.pool.submit(self._post, url, route, body) for url, body in zip(self.urls, bodies, strict=True)]

    def _post(self, url: str, route: str, body: dict) -> None:
        r = self.http.post(f"{url}/{route}", json=body)
        if r.status_code != 200:
            raise WeightSyncError(f"{url}/{route} answered HTTP {r.status_code}: {r.text[:500]}")

    @staticmethod
    def _wait(futures: list[concurrent.futures.Future]) -> None:
        for f in futures:
            f.result()

    def connect(self) -> None:
        world = 1 + sum(self.tp)
        offsets = [1 + sum(self.tp[:i]) for i in range(len(self.tp))]
        inits = self._post_all("init_weight_transfer_engine", [
            {"init_info": {"master_address": self.address, "master_port": self.port, "world_size": world,
                           "rank_offset": off, "timeout_s": self.timeout_s}} for off in offsets])
        self.group = join_group(self.address, self.port, 0, world, self.timeout_s)
        self._wait(inits)

    def reconnect(self, port: int) -> None:
        """Form a new group (after an engine restart): every engine releases the old one, all join a new one.

        A restarted engine has no group and vLLM's gloo ranks cannot be replaced in place; the caller then
        sends the current weights again, so the new engine serves the same version as the others.
        """
        for url in self.urls:
            try:
                self._post(url, "shutdown_weight_transfer_engine", {})
            except (WeightSyncError, httpx.HTTPError):
                pass  # an engine that never joined (the restarted one) has nothing to release
        self.group = None
        self.port = port
        self.connect()

    def send(self, named: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Send one full set of weights; returns the new weight version."""
        if self.group is None:
            raise WeightSyncError("call connect() before send()")
        self._wait(self._post_all("start_weight_update", [{}] * len(self.urls)))
        for bucket in buckets(named, self.bucket_bytes):
            meta = bucket_meta(bucket)
            updates = self._post_all("update_weights", [{"update_info": meta}] * len(self.urls))
            broadcast(self.group, pack(bucket))
            self._wait(updates)
        self.version += 1
        self._wait(self._post_all("finish_weight_update", [{"weight_version": str(self.version)}] * len(self.urls)))
        return self.version

    def close(self) -> None:
        self.pool.shutdown(wait=False)
        self.http.close()
        self.group = None


def sync_from_megatron(model: torch.nn.Module, arch, sender: WeightSender | None) -> int | None:
    """Every trainer rank calls this after an optimizer step. Rank 0 (the one with the sender) streams the
    HF-named weights to the engines bucket by bucket as they arrive; the others feed that stream (TP all-gathers,
    sends from their pipeline stage). Returns the new weight version on rank 0. The Z head is never sent."""
    from flowrl_megatron.conversion.gather import iter_hf_tensors

    stream = iter_hf_tensors(model, arch)
    if sender is None:
        for _ in stream:
            pass
        return None
    return sender.send(stream)
