"""The FlowRL policy: a Megatron GPTModel with the Z head on its last pipeline stage.

Subclassing GPTModel keeps every checkpoint key of the language model unchanged (so
converted checkpoints load as they are); the head adds ``z_head.*`` keys on the last stage.
On a causal model the prompt positions do not see the response, so the forward pass that
gives the response log-probs also gives log Z(x).
"""

from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel

from flowrl_megatron.config import ZHeadConfig
from flowrl_megatron.models.z_head import ZHead, mean_pool


class PolicyModel(GPTModel):
    def __init__(self, *, z_head: ZHeadConfig | None, **gpt_kwargs) -> None:
        super().__init__(**gpt_kwargs)
        self.z_head = None
        self._final_hidden: torch.Tensor | None = None
        if self.post_process and z_head is not None:
            self.z_head = ZHead(self.config.hidden_size, z_head, dtype=self.config.params_dtype)
            self.decoder.final_layernorm.register_forward_hook(self._keep_final_hidden)

    def _keep_final_hidden(self, module, inputs, output) -> None:
        self._final_hidden = output

    def forward(self, input_ids, position_ids, attention_mask, prompt_mask: torch.Tensor | None = None,
                sample_ids: torch.Tensor | None = None, **kwargs):
        """Logits on the last stage (plus log Z per sample when ``prompt_mask`` is given); hidden states elsewhere.

        Packed input (one row of several samples): ``sample_ids`` says which sample each token belongs to.
        """
        out = super().forward(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, **kwargs)
        if self.z_head is None or prompt_mask is None:
            return out
        hidden, self._final_hidden = self._final_hidden, None
        return out, self.z_head(mean_pool(hidden, prompt_mask, sample_ids))
