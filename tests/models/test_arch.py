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


LLAMA31_8B_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}


def test_llama3_rope_scaling_is_read_from_the_config_not_assumed():
    old = {**QWEN25_7B, "architectures": ["LlamaForCausalLM"], "rope_theta": 5e5, "rope_scaling": LLAMA31_8B_ROPE}
    new = {**old, "rope_parameters": {**LLAMA31_8B_ROPE, "rope_theta": 5e5, "original_max_position_embeddings": 64,
                                      "factor": 32.0}}
    del new["rope_scaling"], new["rope_theta"]
    a, b = arch_from_hf_config(old), arch_from_hf_config(new)
    assert (a.rope_theta, a.rope_scaling.factor, a.rope_scaling.original_max_position_embeddings) == (5e5, 8.0, 8192)
    assert (b.rope_theta, b.rope_scaling.factor, b.rope_scaling.original_max_position_embeddings) == (5e5, 32.0, 64)
    assert arch_from_hf_config(QWEN25_7B).rope_scaling is None


def test_qwen3_has_query_key_norms_and_no_biases_whatever_its_head_dim():
    a = arch_from_hf_config({**QWEN25_7B, "architectures": ["Qwen3ForCausalLM"], "hidden_size": 1024,
                             "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128})
    assert (a.qk_norm, a.qkv_bias, a.head_dim) == (True, False, 128)
    assert not arch_from_hf_config(QWEN25_7B).qk_norm


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "architecture 'GPT2LMHeadModel' is not supported; supported: "
                                                 "Qwen2ForCausalLM, Qwen3ForCausalLM, LlamaForCausalLM"),
        ({"architectures": ["Qwen3MoeForCausalLM"], "num_experts": 128}, "'Qwen3MoeForCausalLM' is not supported"),
        ({"num_experts": 8}, "num_experts=8 asks for a mixture-of-experts model, which is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported; only SwiGLU"),
        ({"use_sliding_window": True}, "use_sliding_window asks for sliding-window attention, which is not supported"),
        ({"layer_types": ["sliding_attention"] * 28}, "layer_types asks for sliding-window attention"),
        ({"architectures": ["MistralForCausalLM"], "sliding_window": 4096}, "sliding_window asks for sliding-window"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, r"RoPE type 'yarn' \(rope_scaling.rope_type\) is not "
                                                                r"supported; supported: default, llama3"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
         "llama3 RoPE scaling needs low_freq_factor, high_freq_factor, original_max_position_embeddings"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor below 1 is not supported"),
        ({"architectures": ["LlamaForCausalLM"], "mlp_bias": True}, "mlp_bias=true is not supported"),
        ({"architectures": ["LlamaForCausalLM"], "attention_bias": True}, "output projection"),
        ({"architectures": ["Qwen3ForCausalLM"], "attention_bias": True}, "not supported for Qwen3ForCausalLM"),
        ({"architectures": ["LlamaForCausalLM"], "use_qk_norm": True}, "use_qk_norm=true asks for query/key norms, "
                                                                       "which LlamaForCausalLM does not have"),
    ],
)
def test_unsupported_configs_are_rejected_in_one_sentence(cfg, message):
    with pytest.raises(UserError, match=message) as e:
        arch_from_hf_config({**QWEN25_7B, **cfg})
    assert str(e.value).count(". ") == 0 and str(e.value).endswith(".")


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
