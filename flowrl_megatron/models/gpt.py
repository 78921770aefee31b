"""Build a Megatron GPTModel from a ``ModelArch`` for the current parallel layout."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import ModuleSpec, TransformerConfig

from flowrl_megatron.config import ZHeadConfig
from flowrl_megatron.models.arch import Llama3RopeScaling, ModelArch
from flowrl_megatron.models.policy import PolicyModel
from flowrl_megatron.models.value import ValueModel


def transformer_engine_available() -> bool:
    """The TE layer spec is used only when TE imports and there is a GPU to run it."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def takes_packed_sequences(attention: str = "default") -> bool:
    """Whether the attention ``layer_spec`` picks takes megatron-core's packed (THD) sequences: transformer-engine's
    and SDPA do, megatron-core's local attention does not."""
    return attention == "sdpa" or transformer_engine_available()


def layer_spec(qk_norm: bool, use_te: bool | None = None, attention: str = "default") -> ModuleSpec:
    """transformer-engine's spec when it is usable, else megatron-core's local spec; ``attention="sdpa"``: the
    local spec with torch's scaled_dot_product_attention as its core attention. ``qk_norm``: RMSNorm on each
    query and key head (Qwen3)."""
    if use_te is None:
        use_te = transformer_engine_available() and attention == "default"
    if attention == "sdpa":
        from flowrl_megatron.models.sdpa_attention import SDPAttention

        spec = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=qk_norm)
        spec.submodules.self_attention.submodules.core_attention = SDPAttention
        return spec
    if use_te:
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_norm)
    return get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=qk_norm)


def transformer_config(
    arch: ModelArch,
    params_dtype: torch.dtype = torch.float32,
    calculate_per_token_loss: bool = False,
    recompute: bool = False,
) -> TransformerConfig:
    """Megatron's config for ``arch`` on the layout set up in ``parallel_state``.

    ``calculate_per_token_loss``: losses return (sum, count) and the schedule divides once by the global count.
    ``recompute``: full activation recompute, one layer at a time (only each layer's input is kept).
    """
    on_gpu = torch.cuda.is_available()
    config = TransformerConfig(
        recompute_granularity="full" if recompute else None,
        recompute_method="uniform" if recompute else None,
        recompute_num_layers=1 if recompute else None,
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,  # also makes finalize_model_grads sum these norms' grads over TP
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        pipeline_dtype=params_dtype,
        use_cpu_initialization=not on_gpu,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=on_gpu,
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=on_gpu,
        persist_layer_norm=on_gpu,
        apply_rope_fusion=False,
        calculate_per_token_loss=calculate_per_token_loss,
    )
    # Micro-batches differ in shape (each is cut to its longest sample, or packed), so pipeline stages exchange
    # shapes first. Set after construction: the constructor refuses it with its (MoE-only) default dispatcher.
    config.variable_seq_lengths = parallel_state.get_pipeline_model_parallel_world_size() > 1
    return config


def build_gpt_model(
    arch: ModelArch,
    params_dtype: torch.dtype = torch.float32,
    use_te: bool | None = None,
    z_head: ZHeadConfig | None = None,
    calculate_per_token_loss: bool = False,
    recompute: bool = False,
    attention: str = "default",
    value_head: bool = False,
) -> GPTModel:
    """The pipeline stage of the model that belongs to this rank, with vocab-parallel logits.

    With ``z_head`` it is the FlowRL policy (``PolicyModel``); with ``value_head``, PPO's critic (``ValueModel``,
    untied: values instead of logits); else a plain GPTModel (reference, or a baseline's policy).
    """
    if z_head is not None and value_head:
        raise ValueError("a model has a Z head or a value head, not both")
    config = transformer_config(arch, params_dtype, calculate_per_token_loss, recompute)
    model_cls = partial(PolicyModel, z_head=z_head) if z_head is not None else ValueModel if value_head else GPTModel
    model = model_cls(
        config=config,
        transformer_layer_spec=layer_spec(arch.qk_norm, use_te, attention),
        vocab_size=arch.padded_vocab_size,
        max_sequence_length=arch.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_embeddings and not value_head,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=arch.rope_theta,
    )
    if arch.rope_scaling is not None:
        scale_rope(model.rotary_pos_emb, arch.rope_scaling)
    if torch.cuda.is_available():
        model = model.cuda()
    return model


def scale_rope(rope: RotaryEmbedding, scaling: Llama3RopeScaling) -> None:
    """Llama 3.x's RoPE frequencies with the config's own factors and original context length.

    megatron-core's ``rope_scaling`` switch fixes low/high frequency factors 1 and 4 and an original context of
    8192 (Llama 3.1's); its formula is reused with the values this model was trained with. Set before the first
    forward, which caches the rotary embeddings.
    """
    rope.inv_freq = rope._apply_scaling(
        rope.inv_freq,
        factor=scaling.factor,
        low_freq_factor=scaling.low_freq_factor,
        high_freq_factor=scaling.high_freq_factor,
        original_max_position_embeddings=scaling.original_max_position_embeddings,
    )


def causal_attention_mask(seq_len: int, device: torch.device | None = None) -> torch.Tensor:
    """Megatron's boolean mask (True = masked) of shape [1, 1, s, s].

    Always passed explicitly: megatron-core's implicit default builds it on CUDA.
    """
    ones = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device)
    return torch.triu(ones, diagonal=1)[None, None]
