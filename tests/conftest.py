from pathlib import Path

import pytest

from flowrl_megatron.models.tiny import make_tiny_model


@pytest.fixture(scope="session")
def tiny_untied(tmp_path_factory) -> Path:
    """Qwen2: 4 layers, hidden 128, 4 heads of 32, 2 KV heads (GQA), QKV bias, untied embeddings."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny_untied"), "qwen2", tie_embeddings=False, seed=1)


@pytest.fixture(scope="session")
def tiny_tied(tmp_path_factory) -> Path:
    """As ``tiny_untied`` but with tied input/output embeddings (no lm_head tensor in the file)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny_tied"), "qwen2", tie_embeddings=True, seed=2)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """``LlamaForCausalLM``: the shapes of ``tiny_untied``, no biases, untied, llama3 RoPE scaling (factor 8 over an
    original context of 64 tokens)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny_llama"), "llama", tie_embeddings=False, seed=3)


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> Path:
    """``Qwen3ForCausalLM``: per-head query/key RMSNorms, no biases, 4 heads of 64 on a hidden size of 128 (head_dim
    independent of hidden / heads), tied embeddings as Qwen3's small sizes have."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny_qwen3"), "qwen3", tie_embeddings=True, seed=4)
