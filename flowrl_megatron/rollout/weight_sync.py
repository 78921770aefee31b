"""Trainer side of the weight sync, through vLLM's own trainer API.

Every trainer rank builds a ``WeightSync``; it calls ``WeightTransferTrainerFactory.trainer_init``
with a ``MegatronWeightSource`` (the one mapping's HF names, gathered across TP and PP) and an
``EnginesClient`` (vLLM's four control-plane calls fanned out to every engine). The backend is
our gloo engine on CPU and vLLM's own NCCL engine on GPU: the same code drives both. Rank 0 is the
sender; the other ranks take part in the gathers. The Z head is never sent.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import torch
import torch.distributed as dist
from vllm.distributed.weight_transfer import ParamMeta, WeightSource, WeightTransferTrainerFactory

from flowrl_megatron.conversion.gather import hf_metadata, iter_hf_tensors
from flowrl_megatron.models.arch import ModelArch
from flowrl_megatron.rollout import gloo_transfer
from flowrl_megatron.rollout.gloo_transfer import GlooTrainerInitInfo, in_background
from flowrl_megatron.rollout.weight_buckets import DEFAULT_BUCKET_BYTES
from flowrl_megatron.runtime.distributed import free_port


class WeightSyncError(RuntimeError):
    pass


def _on_any_rank(flag: bool) -> bool:
    """``flag`` of any trainer rank, on every rank (a failed sync is known to the sender only)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class MegatronWeightSource(WeightSource):
    """This rank's Megatron stage as full HF-named tensors (yielded on global rank 0 only)."""

    def __init__(self, model: torch.nn.Module, arch: ModelArch) -> None:
        self.model, self.arch = model, arch
        self.dtype = next(model.parameters()).dtype
        self.keep_on_device = torch.cuda.is_available()  # NCCL sends from the GPU

    def metadata(self) -> list[ParamMeta]:
        return [ParamMeta(name, self.dtype, tuple(shape)) for name, shape in hf_metadata(self.arch)]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter_hf_tensors(self.model, self.arch, keep_on_device=self.keep_on_device)


class EnginesClient:
    """vLLM's ``VLLMWeightSyncClient`` protocol over the HTTP routes of K engines at once.

    A trainer engine addresses "the workers" as ranks ``rank_offset..``; engine i's workers get
    ``rank_offset + sum(tp[:i])``, so one group spans every engine. Each call returns once every
    engine answered. ``finish_weight_update`` stamps ``version`` (set by ``WeightSync``) unless given one.
    """

    def __init__(self, urls: Sequence[str], tp_sizes: Sequence[int], api_key: str, timeout_s: float = 600.0) -> None:
        if len(urls) != len(tp_sizes):
            raise ValueError(f"{len(urls)} engine URLs but {len(tp_sizes)} TP sizes")
        self.urls, self.tp = list(urls), list(tp_sizes)
        self.http = httpx.Client(headers={"Authorization": f"Bearer {api_key}"}, timeout=timeout_s)
        self.version = 0

    @property
    def num_workers(self) -> int:
        return sum(self.tp)

    def _post(self, url: str, route: str, body: dict) -> None:
        r = self.http.post(f"{url}/{route}", json=body)
        if r.status_code != 200:
            raise WeightSyncError(f"{url}/{route} answered HTTP {r.status_code}: {r.text[:500]}")

    def _post_all(self, route: str, bodies: Sequence[dict], skip_unreachable: bool = False) -> None:
        def post(url: str, body: dict) -> None:
            try:
                self._post(url, route, body)
            except httpx.TransportError:
                if not skip_unreachable:
                    raise

        futures = [in_background(lambda u=url, b=body: post(u, b)) for url, body in zip(self.urls, bodies, strict=True)]
        for f in futures:
            f.result()

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        offsets = [init_info["rank_offset"] + sum(self.tp[:i]) for i in range(len(self.urls))]
        self._post_all("init_weight_transfer_engine",
                       [{"init_info": {**init_info, "rank_offset": off}} for off in offsets])

    def start_weight_update(self) -> None:
        self._post_all("start_weight_update", [{}] * len(self.urls))

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self._post_all("update_weights", [{"update_info": update_info}] * len(self.urls))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        body = {"weight_version": weight_version or str(self.version)}
        self._post_all("finish_weight_update", [body] * len(self.urls))

    def pause(self, mode: str) -> None:
        """Stop every engine's scheduler for a weight update with requests in flight: ``keep`` freezes them (they
        continue after ``resume``; the engine's KV and prefix caches are cleared, so what they compute next is
        computed with the new weights), ``wait`` returns once they have all finished. An engine that does not
        answer has nothing running to pause (the weight sync that follows finds it lost)."""
        self._post_all(f"pause?mode={mode}&clear_cache=true", [{}] * len(self.urls), skip_unreachable=True)

    def resume(self) -> None:
        self._post_all("resume", [{}] * len(self.urls), skip_unreachable=True)

    def shutdown_weight_transfer_engine(self) -> None:
        """Best effort: an engine that never joined (a restarted one) has nothing to release."""
        for url in self.urls:
            try:
                self._post(url, "shutdown_weight_transfer_engine", {})
            except (WeightSyncError, httpx.HTTPError):
                pass

    def close(self) -> None:
        self.http.close()


class WeightSync:
    """Connect once, then ``send()`` after every optimizer step, on every trainer rank.

    ``client`` is needed on rank 0 only (the sender); pass None elsewhere (only the sender forms the group).
    ``backend`` is the one the engines were started with (``EngineConfig.weight_transfer_backend``).
    """

    def __init__(self, source: WeightSource, client: EnginesClient | None, *, backend: str,
                 address: str = "127.0.0.1", bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 timeout_s: float = 600.0, version: int = 0) -> None:
        gloo_transfer.register()
        self.source, self.client = source, client
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        if self.rank == 0 and client is None:
            raise ValueError("the sender (trainer rank 0) needs an EnginesClient")
        self.backend, self.address = backend, address
        self.bucket_bytes, self.timeout_s = bucket_bytes, timeout_s
        self.engine = None
        self.version = version  # a resumed run continues its count

    def _init_info(self):
        world = 1 + (self.client.num_workers if self.client is not None else 0)  # read by the sender only
        if self.backend == "gloo":
            return GlooTrainerInitInfo(self.address, world, self.bucket_bytes, self.timeout_s, rank=self.rank)
        if self.backend == "nccl":
            from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

            # vLLM's NCCL trainer takes the port up front (its rendezvous store is created inside).
            port = free_port(self.address) if self.rank == 0 else 0
            return NCCLTrainerInitInfo(self.address, port, world, packed_buffer_size_bytes=self.bucket_bytes,
                                       rank=self.rank)
        raise ValueError(f"unknown weight-transfer backend {self.backend!r}; use 'gloo' (CPU) or 'nccl' (GPU)")

    def connect(self) -> WeightSync:
        self.engine = WeightTransferTrainerFactory.trainer_init(self._init_info(), client=self.client,
                                                                source=self.source)
        return self

    def send(self, version: int | None = None) -> int:
        """Send the current weights to every engine; returns their weight version (on every rank): the next one,
        or ``version`` when re-sending weights that already have one (after a resume or an engine restart)."""
        if self.engine is None:
            raise WeightSyncError("call connect() before send()")
        new = self.version + 1 if version is None else version
        if self.client is not None:
            self.client.version = new  # stamped by finish_weight_update (seen at /weight_info)
        failure = None
        try:
            self.engine.send_weights()
        except Exception as e:  # an engine died or stopped answering; the sender saw the other ranks' part through
            failure = e
        if _on_any_rank(failure is not None):
            raise WeightSyncError(f"the weight sync to the engines failed: {type(failure).__name__}: {failure}"
                                  if failure is not None else "the weight sync failed on trainer rank 0") \
                from failure
        self.version = new
        return new

    def reconnect(self) -> None:
        """Form a new group (after an engine restart): every engine releases the old one, all join a new one.

        A restarted engine has no group, and a collective group's ranks cannot be replaced in place; the caller
        then sends the current weights again so the new engine serves the same version as the others.
        """
        if self.client is not None:
            self.client.shutdown_weight_transfer_engine()
        if self.engine is not None:
            self.engine.shutdown()
        self.connect()

    def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
        if self.client is not None:
            self.client.close()
