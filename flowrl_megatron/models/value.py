"""PPO's critic: a Megatron GPTModel from the policy's checkpoint whose output layer is a scalar value head.

Built like the policy (same spec, same TP x PP layout) so it loads the converted checkpoint as it is, except the
output layer: the vocabulary projection is replaced by ``Linear(hidden, 1)``, replicated on every tensor-parallel
rank (each computes the same value from the same replicated final hidden states, so the head needs no
communication, and megatron-core counts its gradient once in the norm). Its keys stay under ``output_layer.``,
which a converted checkpoint's loader leaves to this initialisation.
"""

from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel
from torch import nn

from flowrl_megatron.models.z_head import seeded_init

VALUE_HEAD_SEED = 1234  # the head's initial weights, the same for every layout
VALUE_HEAD_PREFIX = "output_layer."  # the head's keys; a language model's tensors there are not loaded


class ValueHead(nn.Linear):
    """Called as megatron-core calls its output layer (``weight``, ``runtime_gather_output`` are for a vocabulary
    projection and mean nothing here); [s, b, h] -> ([s, b] float32 values, None)."""

    def __init__(self, hidden_size: int, dtype: torch.dtype) -> None:
        super().__init__(hidden_size, 1, dtype=dtype)
        seeded_init(self, torch.Generator().manual_seed(VALUE_HEAD_SEED))

    def forward(self, hidden: torch.Tensor, weight=None, runtime_gather_output=None):
        return super().forward(hidden).squeeze(-1).float(), None


class ValueModel(GPTModel):
    """On the last pipeline stage, ``forward`` returns values [b, s]: V at each position, given the tokens up to
    it; hidden states elsewhere."""

    def __init__(self, **gpt_kwargs) -> None:
        if gpt_kwargs.get("share_embeddings_and_output_weights"):
            raise ValueError("a value model has no vocabulary projection to tie to the embeddings")
        super().__init__(**gpt_kwargs)
        if self.post_process:
            self.output_layer = ValueHead(self.config.hidden_size, self.config.params_dtype)
