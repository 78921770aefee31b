"""Streaming Hugging Face safetensors I/O: read one tensor at a time, write bounded shards."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError, safe_open

from flowrl_megatron.errors import UserError

if TYPE_CHECKING:
    import torch

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Files copied verbatim between HF and Megatron checkpoints (whichever exist).
HF_SUBDIR = "hf"  # a Megatron checkpoint's copy of its Hugging Face config and tokenizer files
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
)


class HFReader:
    """Reads named tensors from a single or index-sharded safetensors checkpoint, lazily.

    Opening checks every file's header (a truncated or foreign file is refused here, in one sentence), without
    torch: the driver checks a run's weights with it before any rank starts."""

    def __init__(self, model_dir: str | Path) -> None:
        self.dir = Path(model_dir)
        index = self.dir / INDEX_NAME
        if index.is_file():
            try:
                self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise UserError(
                    f"{index} is not a valid safetensors index ({e}); restore it from the model source."
                ) from e
        elif (self.dir / SINGLE_NAME).is_file():
            self.weight_map = {name: SINGLE_NAME for name in self._open(SINGLE_NAME, "numpy").keys()}
        else:
            raise UserError(
                f"no {SINGLE_NAME} or {INDEX_NAME} in {self.dir}; it must be a Hugging Face model saved as "
                "safetensors."
            )
        for file in sorted(set(self.weight_map.values())):
            if not (self.dir / file).is_file():
                raise UserError(f"{self.dir / file} listed in {INDEX_NAME} is missing; download the complete model.")
            self._open(file, "numpy")

    def _open(self, file: str, framework: str = "pt"):
        path = self.dir / file
        try:
            return safe_open(str(path), framework=framework)
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{path} is not a readable safetensors file ({e}); re-download it.") from e

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _read(self, name: str, what: Callable):
        """Open, read and close: a kept-open handle keeps every page read through its mmap resident."""
        if name not in self.weight_map:
            raise UserError(f"tensor {name!r} is missing from {self.dir}; the weights do not match config.json.")
        file = self.weight_map[name]
        try:
            with self._open(file) as handle:
                return what(handle)
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"cannot read {name!r} from {self.dir / file} ({e}); re-download the file.") from e

    def get(self, name: str) -> torch.Tensor:
        return self._read(name, lambda h: h.get_tensor(name))

    def shape(self, name: str) -> tuple[int, ...]:
        return self._read(name, lambda h: tuple(h.get_slice(name).get_shape()))

    def dtype(self, name: str) -> torch.dtype:
        return self._read(name, lambda h: h.get_slice(name)[0:1].dtype)


class HFShardWriter:
    """Writes tensors into safetensors shards of at most ``max_shard_bytes`` (plus one tensor).

    Only the current shard is held in memory. With one shard the output is ``model.safetensors``;
    with more, ``model-0000K-of-0000N.safetensors`` plus ``model.safetensors.index.json``.
    """

    def __init__(self, out_dir: Path, max_shard_bytes: int) -> None:
        self.dir = out_dir
        self.max_shard_bytes = max_shard_bytes
        self._shard: dict[str, torch.Tensor] = {}
        self._shard_bytes = 0
        self._files: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._shard and self._shard_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._shard[name] = tensor.contiguous()
        self._shard_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        tmp_name = f"shard-{len(self._files):05d}.tmp"
        save_file(self._shard, str(self.dir / tmp_name), metadata={"format": "pt"})
        self._files.append((tmp_name, list(self._shard)))
        self._shard, self._shard_bytes = {}, 0

    def close(self) -> None:
        if self._shard or not self._files:
            self._flush()
        n = len(self._files)
        if n == 1:
            (self.dir / self._files[0][0]).rename(self.dir / SINGLE_NAME)
            return
        weight_map = {}
        for k, (tmp_name, names) in enumerate(self._files):
            final = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            (self.dir / tmp_name).rename(self.dir / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy config, generation config and tokenizer files that exist in ``src``."""
    copied = []
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied
