"""The one Megatron <-> Hugging Face weight mapping.

Offline conversion (both directions) and live weight sync to vLLM use only this module for
names, layouts and tensor-parallel splits. Shapes follow megatron-core's distributed
checkpoint format:

- per-layer tensors are stored as one global tensor per name with a leading layer axis
  (``decoder.layers.<name>`` of shape [L, ...]); a pipeline stage owns a contiguous range;
- the local layer spec's norms are saved under the transformer-engine names
  (``input_layernorm`` -> ``self_attention.linear_qkv.layer_norm_weight``), so a checkpoint
  loads into either spec;
- fused QKV is laid out per query group: [q heads of group 0, k_0, v_0, q heads of group 1, ...];
- fused gate/up is [gate; up], split across TP as 2*TP chunks (rank r holds chunks r and r+TP);
- the vocabulary is padded to ``ModelArch.padded_vocab_size`` with zero rows;
- Qwen3's per-head query/key norms (``q_norm``/``k_norm``, one vector of head_dim) are replicated across TP.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from flowrl_megatron.models.arch import ModelArch

Kind = Literal["copy", "qkv", "gate_up", "vocab"]
LAYER_PREFIX = "decoder.layers."

# Linear layers that carry an ``_extra_state`` object in the checkpoint (None for the local spec).
EXTRA_STATE_MODULES = (
    "self_attention.linear_qkv",
    "self_attention.linear_proj",
    "mlp.linear_fc1",
    "mlp.linear_fc2",
)


@dataclass(frozen=True)
class WeightRule:
    """One Megatron tensor and the Hugging Face tensor(s) it is made of."""

    key: str  # distributed-checkpoint key
    param: str  # parameter name in the local-spec module ("{i}" = local layer index)
    hf: tuple[str, ...]  # Hugging Face names ("{i}" = global layer index)
    kind: Kind
    tp_axis: int | None  # axis of the (per-layer) tensor split across TP; None = replicated

    @property
    def per_layer(self) -> bool:
        return self.key.startswith(LAYER_PREFIX)

    def hf_names(self, layer: int | None = None) -> tuple[str, ...]:
        return tuple(n.format(i=layer) for n in self.hf)

    def tp_chunks(self, tp: int) -> int:
        """How many equal chunks along ``tp_axis`` one full tensor is stored as."""
        if self.tp_axis is None:
            return 1
        return 2 * tp if self.kind == "gate_up" else tp


def _layer_rule(key: str, param: str, hf: tuple[str, ...], kind: Kind, tp_axis: int | None) -> WeightRule:
    return WeightRule(
        key=LAYER_PREFIX + key,
        param="decoder.layers.{i}." + param,
        hf=tuple("model.layers.{i}." + n for n in hf),
        kind=kind,
        tp_axis=tp_axis,
    )


def weight_rules(arch: ModelArch) -> list[WeightRule]:
    """Every tensor of the model, non-layer tensors first, in a fixed order."""
    rules = [
        WeightRule(
            "embedding.word_embeddings.weight",
            "embedding.word_embeddings.weight",
            ("model.embed_tokens.weight",),
            "vocab",
            0,
        ),
        WeightRule(
            "decoder.final_layernorm.weight", "decoder.final_layernorm.weight", ("model.norm.weight",), "copy", None
        ),
    ]
    if not arch.tie_embeddings:
        rules.append(WeightRule("output_layer.weight", "output_layer.weight", ("lm_head.weight",), "vocab", 0))
    rules += [
        _layer_rule(
            "self_attention.linear_qkv.layer_norm_weight",
            "input_layernorm.weight",
            ("input_layernorm.weight",),
            "copy",
            None,
        ),
        _layer_rule(
            "self_attention.linear_qkv.weight",
            "self_attention.linear_qkv.weight",
            ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
            "qkv",
            0,
        ),
    ]
    if arch.qkv_bias:
        rules.append(
            _layer_rule(
                "self_attention.linear_qkv.bias",
                "self_attention.linear_qkv.bias",
                ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
                "qkv",
                0,
            )
        )
    if arch.qk_norm:
        rules += [
            _layer_rule(f"self_attention.{m}_layernorm.weight", f"self_attention.{m}_layernorm.weight",
                        (f"self_attn.{m}_norm.weight",), "copy", None)
            for m in ("q", "k")
        ]
    rules += [
        _layer_rule(
            "self_attention.linear_proj.weight",
            "self_attention.linear_proj.weight",
            ("self_attn.o_proj.weight",),
            "copy",
            1,
        ),
        _layer_rule(
            "mlp.linear_fc1.layer_norm_weight",
            "pre_mlp_layernorm.weight",
            ("post_attention_layernorm.weight",),
            "copy",
            None,
        ),
        _layer_rule(
            "mlp.linear_fc1.weight",
            "mlp.linear_fc1.weight",
            ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
            "gate_up",
            0,
        ),
        _layer_rule("mlp.linear_fc2.weight", "mlp.linear_fc2.weight", ("mlp.down_proj.weight",), "copy", 1),
    ]
    return rules


def megatron_shape(rule: WeightRule, arch: ModelArch) -> tuple[int, ...]:
    """Full (unsharded) shape of one layer's tensor, or of the non-layer tensor."""
    h, d = arch.hidden_size, arch.head_dim
    qkv_rows = (arch.num_heads + 2 * arch.num_kv_heads) * d
    shapes: dict[str, tuple[int, ...]] = {
        "embedding.word_embeddings.weight": (arch.padded_vocab_size, h),
        "output_layer.weight": (arch.padded_vocab_size, h),
        "decoder.final_layernorm.weight": (h,),
        LAYER_PREFIX + "self_attention.linear_qkv.layer_norm_weight": (h,),
        LAYER_PREFIX + "self_attention.linear_qkv.weight": (qkv_rows, h),
        LAYER_PREFIX + "self_attention.linear_qkv.bias": (qkv_rows,),
        LAYER_PREFIX + "self_attention.q_layernorm.weight": (d,),
        LAYER_PREFIX + "self_attention.k_layernorm.weight": (d,),
        LAYER_PREFIX + "self_attention.linear_proj.weight": (h, arch.num_heads * d),
        LAYER_PREFIX + "mlp.linear_fc1.layer_norm_weight": (h,),
        LAYER_PREFIX + "mlp.linear_fc1.weight": (2 * arch.ffn_hidden_size, h),
        LAYER_PREFIX + "mlp.linear_fc2.weight": (h, arch.ffn_hidden_size),
    }
    return shapes[rule.key]


def global_shape(rule: WeightRule, arch: ModelArch) -> tuple[int, ...]:
    """Shape of the tensor in the distributed checkpoint (with the leading layer axis if per layer)."""
    return ((arch.num_layers,) if rule.per_layer else ()) + megatron_shape(rule, arch)


@dataclass(frozen=True)
class CheckpointChunk:
    """One stored piece of ``rule``'s global tensor: one TP part of one layer."""

    layer: int | None
    offsets: tuple[int, ...]  # in the global tensor
    sizes: tuple[int, ...]
    start: int  # start of the piece along ``rule.tp_axis`` of the per-layer tensor


def checkpoint_chunks(rule: WeightRule, arch: ModelArch, tp: int) -> list[CheckpointChunk]:
    """How megatron-core at TP=``tp`` stores ``rule``'s tensor: the pieces its main replicas write."""
    shape = megatron_shape(rule, arch)
    n = rule.tp_chunks(tp)
    step = shape[rule.tp_axis] // n if rule.tp_axis is not None else 0
    chunks = []
    for layer in range(arch.num_layers) if rule.per_layer else [None]:
        for c in range(n):
            sizes, offsets = list(shape), [0] * len(shape)
            if rule.tp_axis is not None:
                sizes[rule.tp_axis], offsets[rule.tp_axis] = step, c * step
            if layer is not None:
                sizes, offsets = [1, *sizes], [layer, *offsets]
            chunks.append(CheckpointChunk(layer, tuple(offsets), tuple(sizes), c * step))
    return chunks


def to_megatron(rule: WeightRule, arch: ModelArch, hf_tensors: list[torch.Tensor]) -> torch.Tensor:
    """Hugging Face tensor(s) -> one full Megatron tensor (per layer, without the layer axis)."""
    if rule.kind == "copy":
        return hf_tensors[0]
    if rule.kind == "vocab":
        (t,) = hf_tensors
        pad = arch.padded_vocab_size - t.shape[0]
        return torch.cat([t, t.new_zeros((pad, *t.shape[1:]))]) if pad else t
    if rule.kind == "gate_up":
        return torch.cat(hf_tensors, dim=0)
    q, k, v = hf_tensors
    groups, d = arch.num_kv_heads, arch.head_dim
    tail = q.shape[1:]
    fused = torch.cat(
        [q.reshape(groups, arch.heads_per_group * d, *tail), k.reshape(groups, d, *tail), v.reshape(groups, d, *tail)],
        dim=1,
    )
    return fused.reshape(-1, *tail)


def to_hf(rule: WeightRule, arch: ModelArch, tensor: torch.Tensor) -> list[torch.Tensor]:
    """Inverse of ``to_megatron``: one full Megatron tensor -> the Hugging Face tensor(s), in ``rule.hf`` order."""
    if rule.kind == "copy":
        return [tensor]
    if rule.kind == "vocab":
        return [tensor[: arch.vocab_size]]
    if rule.kind == "gate_up":
        return list(tensor.chunk(2, dim=0))
    groups, d = arch.num_kv_heads, arch.head_dim
    tail = tensor.shape[1:]
    q, k, v = tensor.reshape(groups, (arch.heads_per_group + 2) * d, *tail).split(
        [arch.heads_per_group * d, d, d], dim=1
    )
    return [q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)]


def tp_shard(rule: WeightRule, tensor: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """The part of a full Megatron tensor that TP rank ``rank`` holds in its module."""
    if rule.tp_axis is None:
        return tensor
    chunks = tensor.chunk(rule.tp_chunks(tp), dim=rule.tp_axis)
    if rule.kind == "gate_up":
        return torch.cat([chunks[rank], chunks[rank + tp]], dim=rule.tp_axis)
    return chunks[rank]


def tp_merge(rule: WeightRule, shards: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of ``tp_shard``: the TP ranks' parts (in rank order) -> the full tensor."""
    if rule.tp_axis is None or len(shards) == 1:
        return shards[0]
    if rule.kind == "gate_up":
        halves = [s.chunk(2, dim=rule.tp_axis) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=rule.tp_axis)
    return torch.cat(shards, dim=rule.tp_axis)
