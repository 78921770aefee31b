"""Collect a sharded live model's tensors as full Hugging Face-named tensors on global rank 0.

Uses the one mapping, so names and layouts are exactly those of the offline export. Holds
the whole model on rank 0: meant for tests, debugging and small models (live weight sync
streams in buckets instead).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from flowrl_megatron.conversion.mapping import to_hf, tp_merge, weight_rules
from flowrl_megatron.models.arch import ModelArch


def gather_hf_state(
    model: torch.nn.Module,
    arch: ModelArch,
    tensor_of: Callable[[torch.nn.Parameter], torch.Tensor] = lambda p: p.data,
    extra_prefixes: tuple[str, ...] = ("z_head.",),
) -> dict[str, torch.Tensor]:
    """Full tensors keyed by HF name (plus unmapped params under ``extra_prefixes``, as named) on rank 0.

    ``model`` is this rank's unwrapped stage; ``tensor_of`` picks what to gather (weights, ``main_grad``...).
    """
    tp_group = parallel_state.get_tensor_model_parallel_group()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    layers_here = arch.num_layers // pp
    offset = parallel_state.get_pipeline_model_parallel_rank() * layers_here
    is_tp0 = parallel_state.get_tensor_model_parallel_rank() == 0
    params = dict(model.named_parameters())
    local: dict[str, torch.Tensor] = {}
    for rule in weight_rules(arch):
        for i in range(layers_here) if rule.per_layer else [None]:
            name = rule.param.format(i=i)
            if name not in params:
                continue
            shard = tensor_of(params[name]).detach().contiguous()
            shards = [torch.empty_like(shard) for _ in range(tp)]
            dist.all_gather(shards, shard, group=tp_group)
            if is_tp0:
                hf_layer = offset + i if rule.per_layer else None
                for hf_name, t in zip(rule.hf_names(hf_layer), to_hf(rule, arch, tp_merge(rule, shards)), strict=True):
                    local[hf_name] = t.cpu().clone()
    if is_tp0:
        for name, p in params.items():
            if name.startswith(extra_prefixes):
                local[name] = tensor_of(p).detach().cpu().clone()
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    gathered: list[dict | None] = [None] * pp
    first = parallel_state.get_pipeline_model_parallel_first_rank()
    dist.gather_object(local, gathered if dist.get_rank() == first else None, dst=first, group=pp_group)
    if dist.get_rank() != 0:
        return {}
    return {k: v for part in gathered for k, v in (part or {}).items()}
