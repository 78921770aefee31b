"""Core attention for megatron-core's local layer spec built on ``torch.nn.functional.scaled_dot_product_attention``:
flash or memory-efficient kernels on GPU without transformer-engine, and no [b, heads, s, s] score tensor kept
for the backward pass. A drop-in for megatron's ``DotProductAttention`` (same constructor and forward).

Masking is causal through ``is_causal`` (what lets the fused kernels run): exact for our batches, whose padding
is on the right, so no real token ever attends to a pad. Packed sequences (megatron-core's THD format, as
transformer-engine takes them) are attended one sample at a time, each causal on its own. Grouped-query attention
repeats the key/value heads.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class SDPAttention(MegatronModule):
    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ) -> None:
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"SDPAttention supports causal attention only, got {attn_mask_type}")
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.heads = config.num_attention_heads // tp
        self.groups = config.num_query_groups // tp
        self.scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None) -> torch.Tensor:
        """[s, b, heads, d] query, [s, b, groups, d] key and value -> [s, b, heads * d].

        Packed: [t, heads, d] and [t, groups, d], the samples' boundaries in ``packed_seq_params.cu_seqlens_q``
        -> [t, heads * d].
        """
        if attention_bias is not None:
            raise ValueError("SDPAttention takes no attention bias")
        if packed_seq_params is None:
            return self._attend(query, key, value)
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(f"SDPAttention takes packed sequences as thd, got {packed_seq_params.qkv_format}")
        bounds = packed_seq_params.cu_seqlens_q.tolist()
        return torch.cat([self._attend(query[a:b, None], key[a:b, None], value[a:b, None])[:, 0]
                          for a, b in itertools.pairwise(bounds)])

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        s, b = query.shape[:2]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        if self.groups != self.heads:
            k = k.repeat_interleave(self.heads // self.groups, dim=1)
            v = v.repeat_interleave(self.heads // self.groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                             is_causal=True, scale=self.scale)
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)
