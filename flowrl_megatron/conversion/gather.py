"""Stream a sharded live model's tensors to global rank 0 as full Hugging Face-named tensors.

Uses the one mapping, so names and layouts are exactly those of the offline export. Every
rank runs the same loop in the same order: for each tensor, the TP ranks of the pipeline
stage that owns it all-gather their shards, and that stage's first rank sends the full HF
tensors to global rank 0, which yields them. Rank 0 never holds more than one tensor's worth
at a time, so weight sync can bucket and send as it goes (a 32B model never sits on one rank).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from flowrl_megatron.conversion.mapping import WeightRule, megatron_shape, to_hf, tp_merge, weight_rules
from flowrl_megatron.models.arch import ModelArch
from flowrl_megatron.runtime import device


def _plan(arch: ModelArch) -> Iterator[tuple[WeightRule, int | None, list[str], list[torch.Size]]]:
    """(rule, layer, HF names, HF shapes) in the order every rank walks the model."""
    for rule in weight_rules(arch):
        for layer in range(arch.num_layers) if rule.per_layer else [None]:
            meta = to_hf(rule, arch, torch.empty(megatron_shape(rule, arch), device="meta"))
            yield rule, layer, rule.hf_names(layer), [m.shape for m in meta]


def hf_metadata(arch: ModelArch) -> list[tuple[str, torch.Size]]:
    """Names and full shapes of what ``iter_hf_tensors`` yields (without extras), in the same order, without
    touching any weights: what a receiver sizes its buffers from."""
    return [(n, s) for _, _, names, shapes in _plan(arch) for n, s in zip(names, shapes, strict=True)]


def iter_hf_tensors(
    model: torch.nn.Module,
    arch: ModelArch,
    tensor_of: Callable[[torch.nn.Parameter], torch.Tensor] = lambda p: p.data,
    extra_prefixes: tuple[str, ...] = (),
    keep_on_device: bool = False,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, full tensor)`` on global rank 0; every other rank must exhaust it too (yields nothing).

    ``model`` is this rank's unwrapped stage; ``tensor_of`` picks what to send (weights, ``main_grad``...);
    parameters under ``extra_prefixes`` (e.g. ``z_head.``), which the mapping does not name, follow as they are.
    Tensors come on the CPU unless ``keep_on_device`` (an NCCL broadcast sends them from the GPU).
    """
    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    layers_per_stage = arch.num_layers // pp
    in_first_replica = parallel_state.get_data_parallel_rank() == 0
    sender = in_first_replica and parallel_state.get_tensor_model_parallel_rank() == 0
    rank = dist.get_rank()
    params = dict(model.named_parameters())
    dtype = tensor_of(next(iter(params.values()))).dtype  # what is sent (an fp32 main_grad of bf16 weights, say)
    # Global rank of each stage's member in this rank's TP/DP slot: for rank 0, each stage's sender.
    stage_first_rank = dist.get_process_group_ranks(parallel_state.get_pipeline_model_parallel_group())

    def owner(rule, layer) -> int:
        if rule.per_layer:
            return layer // layers_per_stage
        return 0 if rule.key.startswith("embedding.") else pp - 1

    for rule, layer, names, shapes in _plan(arch):
        stage = owner(rule, layer)
        full: list[torch.Tensor] | None = None
        if stage == pp_rank and in_first_replica:
            local = rule.param.format(i=layer - stage * layers_per_stage if rule.per_layer else None)
            shard = tensor_of(params[local]).detach().contiguous()
            shards = [shard.clone()]  # a snapshot: the caller may keep it while the parameter changes
            if tp > 1:
                shards = [torch.empty_like(shard) for _ in range(tp)]
                dist.all_gather(shards, shard, group=tp_group)
            full = [t.contiguous() for t in to_hf(rule, arch, tp_merge(rule, shards))]
            if sender and rank != 0:
                for t in full:
                    dist.send(t, dst=0)
        if rank == 0:
            if full is None:
                full = [torch.empty(shape, dtype=dtype, device=device()) for shape in shapes]
                for t in full:
                    dist.recv(t, src=stage_first_rank[stage])
            for name, t in zip(names, full, strict=True):
                yield name, t if keep_on_device else t.cpu()
    if extra_prefixes and pp_rank == pp - 1 and sender:
        extras = [(n, tensor_of(p).detach().cpu().clone()) for n, p in params.items() if n.startswith(extra_prefixes)]
        if rank == 0:
            yield from extras
        else:
            dist.send_object_list([extras], dst=0)
    elif extra_prefixes and rank == 0:
        box: list = [None]
        dist.recv_object_list(box, src=stage_first_rank[pp - 1])
        yield from box[0]


def gather_hf_state(
    model: torch.nn.Module,
    arch: ModelArch,
    tensor_of: Callable[[torch.nn.Parameter], torch.Tensor] = lambda p: p.data,
    extra_prefixes: tuple[str, ...] = ("z_head.",),
) -> dict[str, torch.Tensor]:
    """All of ``iter_hf_tensors`` as one dict on rank 0 (empty elsewhere): for tests, debugging and small models."""
    return dict(iter_hf_tensors(model, arch, tensor_of, extra_prefixes))
