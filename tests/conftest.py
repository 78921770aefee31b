from pathlib import Path

import pytest

from flowrl_megatron.models.tiny import make_tiny_model

# The files that take longest (seconds, one process on a 2-core machine: 495, 488, 176, 176, 171, 139, 124, 99, 95,
# 91, 87, 76), run first: `make test` hands whole files to its workers in this order (pytest-xdist, --dist loadfile),
# so no worker starts a long file when the others are nearly done.
LONGEST_FIRST = (
    "tests/test_trainer.py",
    "tests/demo/test_demo.py",
    "tests/algorithms/test_toy_distribution_matching.py",
    "tests/rollout/test_weight_sync.py",
    "tests/slurm/test_sbatch.py",
    "tests/models/test_gpt_parity.py",
    "tests/rollout/test_engines_and_client.py",
    "tests/evaluation/test_run.py",
    "tests/rollout/test_model_families.py",
    "tests/runtime/test_distributed.py",
    "tests/conversion/test_vllm_loads_export.py",
    "tests/training/test_gradient_invariance.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    missing = [path for path in LONGEST_FIRST if not (config.rootpath / path).is_file()]
    if missing:
        raise pytest.UsageError(f"tests/conftest.py: LONGEST_FIRST names {missing}, which do not exist; update it.")
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: the rest keep their order


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
