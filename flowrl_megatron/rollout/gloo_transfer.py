"""A gloo weight-transfer backend for vLLM, so the CPU path uses vLLM's own weight-sync lifecycle.

vLLM's built-in backends (nccl, ipc, ...) need CUDA. This engine is the same protocol over a
gloo process group: ``init_weight_transfer_engine`` joins the trainer's group,
``start_weight_update`` / ``finish_weight_update`` wrap vLLM's layerwise reload (which
re-runs vLLM's post-load processing, e.g. the CPU weight repacking), and each
``update_weights`` call receives one bucket: a single broadcast of the bucket's tensors
packed into one byte buffer, then ``model.load_weights`` on the HF-named tensors.

vLLM loads ``vllm.general_plugins`` entry points in every process it starts; this package's
entry point calls ``register``, which makes ``--weight-transfer-config '{"backend": "gloo"}'``
valid in the server.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

from flowrl_megatron.rollout.gloo_group import broadcast, join_group
from flowrl_megatron.rollout.weight_buckets import bucket_size, unpack

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

    def receive_weights(self, update_info: GlooUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("gloo weight transfer is not initialised: call init_weight_transfer_engine first")
        info = update_info
        buffer = torch.empty(bucket_size(info.dtype_names, info.shapes), dtype=torch.uint8)
        broadcast(self.group, buffer)
        self.model.load_weights(unpack(buffer, info.names, info.dtype_names, info.shapes))

    def shutdown(self) -> None:
        self.group = None


def register() -> None:
    """vLLM plugin entry point: make the "gloo" backend known in this process."""
    from vllm.distributed.weight_transfer import WeightTransferEngineFactory

    try:
        WeightTransferEngineFactory.register_engine(BACKEND, __name__, "GlooWeightTransferEngine")
    except ValueError:  # already registered in this process
        pass
