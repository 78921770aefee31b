"""Offline Hugging Face <-> Megatron checkpoint conversion, streaming one layer at a time.

Memory bound (measured in bench/conversion_memory.py): HF -> Megatron holds at most the HF
source tensors of one Megatron tensor, that tensor fused and padded, and one TP chunk of it,
so about 3x the largest single tensor (the embedding or fused gate/up). Megatron -> HF
holds one layer's tensors plus the safetensors shard being filled (``max_shard_bytes``).
Neither ever holds the whole model.

A Megatron checkpoint directory made here is megatron-core's ``torch_dist`` format plus:
``hf/`` (config.json, generation config and tokenizer files of the source model) and
``flowrl_checkpoint.json`` (architecture, layout, dtype), so the reverse conversion needs
nothing else.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

from flowrl_megatron.conversion.dist_ckpt import (
    DistCheckpointReader,
    TensorChunk,
    extra_state_bytes,
    save_streaming,
)
from flowrl_megatron.conversion.hf_io import HF_SUBDIR, HFReader, HFShardWriter, copy_side_files
from flowrl_megatron.conversion.mapping import (
    EXTRA_STATE_MODULES,
    LAYER_PREFIX,
    CheckpointChunk,
    WeightRule,
    checkpoint_chunks,
    global_shape,
    megatron_shape,
    to_hf,
    to_megatron,
    weight_rules,
)
from flowrl_megatron.errors import UserError
from flowrl_megatron.models.arch import ModelArch, arch_from_hf_config, load_arch, load_hf_config

INFO_NAME = "flowrl_checkpoint.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@contextmanager
def atomic_output_dir(output: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory that becomes ``output`` only if the block succeeds."""
    out = Path(output).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"output {out} already exists and is not empty; choose a new directory or remove it.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_hf_shapes(reader: HFReader, arch: ModelArch, rules: list[WeightRule]) -> None:
    """Fail before writing anything if a tensor is missing or its shape contradicts config.json."""
    for rule in rules:
        meta = torch.empty(megatron_shape(rule, arch), device="meta")
        expected = [tuple(t.shape) for t in to_hf(rule, arch, meta)]
        for layer in range(arch.num_layers) if rule.per_layer else [None]:
            for name, want in zip(rule.hf_names(layer), expected, strict=True):
                if reader.shape(name) != want:
                    raise UserError(
                        f"tensor {name!r} has shape {reader.shape(name)} but config.json implies {want}; "
                        "the weights and config.json are from different models."
                    )


def hf_to_megatron(
    input_dir: str | Path, output_dir: str | Path, tp: int = 1, pp: int = 1, dtype: str | None = None
) -> Path:
    """Convert a Hugging Face safetensors model into a Megatron ``torch_dist`` checkpoint for TP x PP."""
    src = Path(input_dir)
    arch = load_arch(src)
    arch.check_layout(tp, pp)
    reader = HFReader(src)
    rules = weight_rules(arch)
    _check_hf_shapes(reader, arch, rules)
    out_dtype = DTYPES[dtype] if dtype else reader.dtype(rules[0].hf_names()[0])

    cache: dict[tuple[str, int | None], torch.Tensor] = {}

    def full_tensor(rule: WeightRule, layer: int | None) -> torch.Tensor:
        # One entry: the writer asks for the TP chunks of one tensor one after another.
        if (rule.key, layer) not in cache:
            cache.clear()
            hf = [reader.get(n) for n in rule.hf_names(layer)]
            cache[(rule.key, layer)] = to_megatron(rule, arch, hf).to(out_dtype)
        return cache[(rule.key, layer)]

    progress = tqdm(desc="hf -> megatron", unit="chunk", disable=None)

    def producer(rule: WeightRule, chunk: CheckpointChunk):
        def produce() -> torch.Tensor:
            progress.update()
            t = full_tensor(rule, chunk.layer)
            if rule.tp_axis is not None:
                t = t.narrow(rule.tp_axis, chunk.start, chunk.sizes[rule.tp_axis + rule.per_layer])
            return (t.unsqueeze(0) if rule.per_layer else t).clone()

        return produce

    # Non-layer tensors first, then layer by layer (rule order within a layer): the writer keeps this order,
    # so the TP chunks of one tensor are produced one after another from a single cached tensor.
    planned = sorted(
        ((rule, c) for rule in rules for c in checkpoint_chunks(rule, arch, tp)),
        key=lambda rc: -1 if rc[1].layer is None else rc[1].layer,
    )
    chunks = [
        TensorChunk(key=rule.key, offsets=c.offsets, sizes=c.sizes, global_size=global_shape(rule, arch),
                    dtype=out_dtype, produce=producer(rule, c))
        for rule, c in planned
    ]
    objects = {
        f"{LAYER_PREFIX}{m}._extra_state/shard_{layer}_{arch.num_layers}": extra_state_bytes()
        for layer in range(arch.num_layers)
        for m in EXTRA_STATE_MODULES
    }
    progress.total = len(chunks)
    with atomic_output_dir(output_dir) as tmp:
        save_streaming(tmp, chunks, objects)
        progress.close()
        (tmp / HF_SUBDIR).mkdir()
        copy_side_files(src, tmp / HF_SUBDIR)
        info = {"arch": arch.to_dict(), "tp": tp, "pp": pp, "dtype": str(out_dtype).removeprefix("torch.")}
        (tmp / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
    return Path(output_dir)


def megatron_to_hf(
    input_dir: str | Path,
    output_dir: str | Path,
    hf_config_dir: str | Path | None = None,
    max_shard_bytes: int = 2 * 1024**3,
) -> Path:
    """Convert a Megatron ``torch_dist`` checkpoint (any TP/PP) into a Hugging Face safetensors model.

    Only the weights the mapping names are read: the Z head and optimizer state are dropped.
    """
    src = Path(input_dir)
    reader = DistCheckpointReader(src)
    side_dir = Path(hf_config_dir) if hf_config_dir else src / HF_SUBDIR
    if not (side_dir / "config.json").is_file():
        raise UserError(
            f"{side_dir / 'config.json'} not found; pass --hf-config with the directory of the "
            "original Hugging Face model's config and tokenizer files."
        )
    arch = arch_from_hf_config(load_hf_config(side_dir))
    rules = weight_rules(arch)
    for rule in rules:
        expected = global_shape(rule, arch)
        if reader.shape(rule.key) != expected:
            raise UserError(
                f"{rule.key} has shape {reader.shape(rule.key)} in {src} but {expected} per "
                f"{side_dir / 'config.json'}; "
                "the checkpoint and config are from different models."
            )

    def write(writer: HFShardWriter, rule: WeightRule, layer: int | None, tensor: torch.Tensor) -> None:
        for name, t in zip(rule.hf_names(layer), to_hf(rule, arch, tensor), strict=True):
            writer.add(name, t.clone())

    def read_whole(rule: WeightRule) -> torch.Tensor:
        shape = reader.shape(rule.key)
        return reader.read([(rule.key, (0,) * len(shape), shape)])[rule.key]

    with atomic_output_dir(output_dir) as tmp:
        writer = HFShardWriter(tmp, max_shard_bytes)
        embedding, *other_globals = [r for r in rules if not r.per_layer]
        write(writer, embedding, None, read_whole(embedding))
        layer_rules = [r for r in rules if r.per_layer]
        for layer in tqdm(range(arch.num_layers), desc="megatron -> hf", unit="layer", disable=None):
            regions = []
            for r in layer_rules:
                shape = reader.shape(r.key)
                regions.append((r.key, (layer,) + (0,) * (len(shape) - 1), (1, *shape[1:])))
            loaded = reader.read(regions)
            for r in layer_rules:
                write(writer, r, layer, loaded.pop(r.key)[0])
        for r in other_globals:
            write(writer, r, None, read_whole(r))
        writer.close()
        copy_side_files(side_dir, tmp)
    return Path(output_dir)
