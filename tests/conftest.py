from pathlib import Path

import pytest

from flowrl_megatron.models.tiny import make_tiny_qwen2


@pytest.fixture(scope="session")
def tiny_untied(tmp_path_factory) -> Path:
    """Qwen2: 4 layers, hidden 128, 4 heads of 32, 2 KV heads (GQA), QKV bias, untied embeddings."""
    return make_tiny_qwen2(tmp_path_factory.mktemp("tiny_untied"), tie_embeddings=False, seed=1)


@pytest.fixture(scope="session")
def tiny_tied(tmp_path_factory) -> Path:
    """As ``tiny_untied`` but with tied input/output embeddings (no lm_head tensor in the file)."""
    return make_tiny_qwen2(tmp_path_factory.mktemp("tiny_tied"), tie_embeddings=True, seed=2)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """Llama: the same shapes as ``tiny_untied`` without QKV bias."""
    return make_tiny_qwen2(tmp_path_factory.mktemp("tiny_llama"), family="llama", seed=3)
