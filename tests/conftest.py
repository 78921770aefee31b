import os
from pathlib import Path

import pytest
import torch

from flowrl_megatron.models.tiny import make_tiny_model

# The files with the most CPU work (core-seconds on a 2-core machine, in the order listed: about 420, 380, 220, 175,
# 165, 120, 65, 85, 75, 75, 70, 60), run first: `make test` hands whole files to its workers in this order
# (pytest-xdist, --dist loadfile), so no worker starts a long file when the others are nearly done.
LONGEST_FIRST = (
    "tests/test_trainer.py",
    "tests/demo/test_demo.py",
    "tests/algorithms/test_toy_distribution_matching.py",
    "tests/slurm/test_sbatch.py",
    "tests/rollout/test_weight_sync.py",
    "tests/rollout/test_engines_and_client.py",
    "tests/rollout/test_model_families.py",
    "tests/runtime/test_distributed.py",
    "tests/models/test_gpt_parity.py",
    "tests/evaluation/test_run.py",
    "tests/models/test_policy.py",
    "tests/training/test_gradient_invariance.py",
)


def worker_cpus(index: int, workers: int, cpus: list[int]) -> set[int]:
    """Worker ``index`` of ``workers``'s share of ``cpus``: an equal slice each, or every CPU when there are fewer
    CPUs than workers."""
    if not 0 <= index < workers:
        raise ValueError(f"worker {index} of {workers}: a worker's index is from 0 to {workers - 1}")
    if workers > len(cpus):
        return set(cpus)
    per = len(cpus) // workers
    return set(cpus[index * per : (index + 1) * per])


def pytest_configure(config: pytest.Config) -> None:
    """A pytest-xdist worker and every process it starts (ranks, engines) run on the worker's own CPUs, as on a
    machine of their own: with two unpinned workers sharing both cores, the demo test ran past its 1200 s limit (488 s
    alone). torch, imported before this, sized its thread pool for every CPU, and threads started before the pinning
    keep every CPU: without the thread count set here, a 150-step warm-up in the worker took 12 minutes, against
    about 25 s on one core."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        index, workers = int(worker.removeprefix("gw")), int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
        cpus = worker_cpus(index, workers, sorted(os.sched_getaffinity(0)))
        os.sched_setaffinity(0, cpus)
        torch.set_num_threads(len(cpus))


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
