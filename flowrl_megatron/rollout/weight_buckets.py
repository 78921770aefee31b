"""Pack named tensors into byte buckets for one broadcast each, and unpack them. No vLLM import:
the trainer side uses it too, and on GPU clusters vLLM may live in another environment."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

DEFAULT_BUCKET_BYTES = 256 * 1024**2


def bucket_meta(named: list[tuple[str, torch.Tensor]]) -> dict[str, list]:
    return {
        "names": [n for n, _ in named],
        "dtype_names": [str(t.dtype).removeprefix("torch.") for _, t in named],
        "shapes": [list(t.shape) for _, t in named],
    }


def bucket_size(dtype_names: list[str], shapes: list[list[int]]) -> int:
    pairs = zip(dtype_names, shapes, strict=True)
    return sum(int(torch.Size(s).numel()) * getattr(torch, d).itemsize for d, s in pairs)


def pack(named: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
    return torch.cat([t.detach().contiguous().cpu().view(torch.uint8).reshape(-1) for _, t in named])


def unpack(buffer: torch.Tensor, names: list[str], dtype_names: list[str],
           shapes: list[list[int]]) -> list[tuple[str, torch.Tensor]]:
    """Split one byte buffer into named tensors (views, no copy)."""
    out, offset = [], 0
    for name, dtype_name, shape in zip(names, dtype_names, shapes, strict=True):
        dtype = getattr(torch, dtype_name)
        nbytes = int(torch.Size(shape).numel()) * dtype.itemsize
        out.append((name, buffer[offset : offset + nbytes].view(dtype).reshape(shape)))
        offset += nbytes
    return out


def buckets(named: Iterable[tuple[str, torch.Tensor]], max_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive groups of at most ``max_bytes`` (a larger tensor travels alone)."""
    current: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in named:
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_bytes:
            yield current
            current, size = [], 0
        current.append((name, t))
        size += nbytes
    if current:
        yield current
