"""Reading Hugging Face configs and checking layouts."""

from __future__ import annotations

import pytest

from flowrl_megatron.errors import UserError
from flowrl_megatron.models.arch import arch_from_hf_config

QWEN25_7B = {
    "architectures": ["Qwen2ForCausalLM"], "hidden_size": 3584, "intermediate_size": 18944,
    "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": False, "max_position_embeddings": 131072,
}


def test_qwen25_7b():
    a = arch_from_hf_config(QWEN25_7B)
    assert (a.head_dim, a.heads_per_group, a.qkv_bias, a.tie_embeddings) == (128, 7, True, False)
    assert a.rope_theta == 1e6 and a.padded_vocab_size == 152064
    a.check_layout(tp=4, pp=2)


def test_transformers5_rope_parameters_and_llama():
    rope = {"rope_theta": 5e5, "rope_type": "default"}
    cfg = {**QWEN25_7B, "architectures": ["LlamaForCausalLM"], "rope_parameters": rope}
    del cfg["rope_theta"]
    a = arch_from_hf_config(cfg)
    assert a.rope_theta == 5e5 and a.qkv_bias is False


def test_vocab_padding_is_independent_of_tp():
    """One checkpoint must load at every TP, so the padded size cannot depend on TP."""
    a = arch_from_hf_config({**QWEN25_7B, "vocab_size": 1000})
    assert a.padded_vocab_size == 1024
    for tp in (1, 2, 4):
        a.check_layout(tp=tp, pp=1)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "architecture 'GPT2LMHeadModel' is not supported"),
        ({"hidden_act": "gelu"}, "activation 'gelu' is not supported"),
        ({"use_sliding_window": True}, "sliding-window attention is not supported"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "RoPE type 'yarn' is not supported"),
        ({"architectures": ["LlamaForCausalLM"], "attention_bias": True}, "output-projection bias"),
    ],
)
def test_unsupported_configs_are_rejected(cfg, message):
    with pytest.raises(UserError, match=message):
        arch_from_hf_config({**QWEN25_7B, **cfg})


@pytest.mark.parametrize(
    ("tp", "pp", "message"),
    [
        (3, 1, r"TP=3 does not divide the 28 attention heads; choose a TP from \[1, 2, 4, 7, 14, 28\]"),
        (7, 1, r"TP=7 does not divide the 4 key/value heads; choose a TP from \[1, 2, 4\]"),
        (1, 3, r"PP=3 does not divide the 28 layers"),
    ],
)
def test_bad_layouts_name_the_fix(tp, pp, message):
    with pytest.raises(UserError, match=message):
        arch_from_hf_config(QWEN25_7B).check_layout(tp=tp, pp=pp)
