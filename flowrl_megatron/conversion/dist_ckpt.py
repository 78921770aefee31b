"""Stream tensors into and out of megatron-core's ``torch_dist`` checkpoint format in one process.

megatron-core's own ``dist_checkpointing.save`` needs every tensor in memory at once (64 GB
for a 32B model in bf16). The format itself is PyTorch Distributed Checkpoint plus two small
files, so the converters drive DCP directly with planners that produce each chunk only
when the writer asks for it and read only the region asked for. The files written are the
ones megatron-core writes: ``metadata.json``, ``common.pt``, ``.metadata`` and ``*.distcp``.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, create_default_global_save_plan
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    ReadItem,
    SavePlan,
    SavePlanner,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from flowrl_megatron.errors import UserError

# dcp says it assumes one process when there is no process group: that is what no_dist=True below asks for.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized",
                        category=UserWarning, module=r"torch\.distributed\.checkpoint")

MEGATRON_METADATA = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}


@dataclass(frozen=True)
class TensorChunk:
    """One stored piece of a global tensor, produced on demand."""

    key: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    global_size: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]


class _StreamingSavePlanner(SavePlanner):
    def __init__(self, chunks: list[TensorChunk], objects: dict[str, bytes]) -> None:
        self.chunks = {(c.key, c.offsets): c for c in chunks}
        self.objects = objects

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator: bool = False) -> None:
        pass

    def create_local_plan(self) -> SavePlan:
        items = [WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO) for key in self.objects]
        for c in self.chunks.values():
            items.append(
                WriteItem(
                    index=MetadataIndex(c.key, torch.Size(c.offsets)),
                    type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(
                        chunk=ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.sizes)),
                        properties=TensorProperties(dtype=c.dtype),
                        size=torch.Size(c.global_size),
                    ),
                )
            )
        return SavePlan(items)

    def create_global_plan(self, all_plans):
        return create_default_global_save_plan(all_plans)

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        return new_plan

    def resolve_data(self, write_item: WriteItem):
        if write_item.type == WriteItemType.BYTE_IO:
            return io.BytesIO(self.objects[write_item.index.fqn])
        chunk = self.chunks[(write_item.index.fqn, tuple(write_item.index.offset))]
        tensor = chunk.produce()
        if tuple(tensor.shape) != chunk.sizes or tensor.dtype != chunk.dtype:
            raise RuntimeError(
                f"{chunk.key}: produced {tuple(tensor.shape)} {tensor.dtype}, planned {chunk.sizes} {chunk.dtype}"
            )
        return tensor


def save_streaming(ckpt_dir: Path, chunks: list[TensorChunk], objects: dict[str, bytes]) -> None:
    """Write a megatron-core ``torch_dist`` checkpoint, materialising one chunk at a time."""
    writer = dcp.FileSystemWriter(str(ckpt_dir), single_file_per_rank=True, thread_count=1)
    dcp.save(state_dict={}, storage_writer=writer, planner=_StreamingSavePlanner(chunks, objects), no_dist=True)
    torch.save({}, ckpt_dir / "common.pt")
    (ckpt_dir / "metadata.json").write_text(json.dumps(MEGATRON_METADATA))


def extra_state_bytes() -> bytes:
    """What megatron-core stores for a local-spec linear layer's ``_extra_state`` (None)."""
    buf = io.BytesIO()
    torch.save([None], buf)
    return buf.getvalue()


class _RegionLoadPlanner(DefaultLoadPlanner):
    """Reads given regions of global tensors into preallocated buffers."""

    def __init__(self, regions: dict[str, tuple[tuple[int, ...], torch.Tensor]]) -> None:
        super().__init__()
        self.regions = regions

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        items: list[ReadItem] = []
        for key, (offsets, dest) in self.regions.items():
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=dest.shape)
            items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [chunk])
        return LoadPlan(items)

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        dest = self.regions[read_item.dest_index.fqn][1]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths, strict=True)):
            dest = dest.narrow(dim, start, length)
        return dest

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass


class DistCheckpointReader:
    """Random access to regions of the tensors of a ``torch_dist`` checkpoint."""

    def __init__(self, ckpt_dir: str | Path) -> None:
        self.dir = Path(ckpt_dir)
        meta = self.dir / "metadata.json"
        if not meta.is_file():
            raise UserError(f"{meta} not found; --input must be a Megatron distributed checkpoint directory.")
        backend = json.loads(meta.read_text()).get("sharded_backend")
        if backend != "torch_dist":
            raise UserError(f"{self.dir} uses the {backend!r} format; only torch_dist checkpoints are supported.")
        try:
            self.metadata = dcp.FileSystemReader(str(self.dir)).read_metadata()
        except Exception as e:  # DCP raises plain exceptions of several kinds for a damaged file
            raise UserError(
                f"cannot read {self.dir / '.metadata'} ({e}); the checkpoint is incomplete or corrupt."
            ) from e
        self.tensors = {
            k: v for k, v in self.metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)
        }

    def shape(self, key: str) -> tuple[int, ...]:
        if key not in self.tensors:
            raise UserError(f"tensor {key!r} is missing from {self.dir}; the checkpoint does not match its config.")
        return tuple(self.tensors[key].size)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].properties.dtype

    def read(self, regions: Iterable[tuple[str, tuple[int, ...], tuple[int, ...]]]) -> dict[str, torch.Tensor]:
        """Read ``(key, offsets, sizes)`` regions; returns key -> tensor of ``sizes``."""
        buffers = {key: (offsets, torch.empty(sizes, dtype=self.dtype(key))) for key, offsets, sizes in regions}
        try:
            dcp.load(
                state_dict={},
                storage_reader=dcp.FileSystemReader(str(self.dir)),
                planner=_RegionLoadPlanner(buffers),
                no_dist=True,
            )
        except Exception as e:
            raise UserError(
                f"cannot read tensors from {self.dir} ({e}); the checkpoint is incomplete or corrupt."
            ) from e
        return {key: buf for key, (_, buf) in buffers.items()}
