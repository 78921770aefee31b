"""The memory planner: exact parameter counts (published Qwen2.5 sizes, real Megatron and Z head modules), the
32B recipe fits and a bad layout is refused, and the estimate matches memory measured on CPU for a small model."""

from __future__ import annotations

import resource
import subprocess
import sys

import psutil
import pytest

from flowrl_megatron.config import RunConfig, load_config
from flowrl_megatron.models.arch import load_arch
from flowrl_megatron.planner import GIB, critic_params, plan, stage_params, total_params, z_head_params
from tests.distributed import REPO, run_distributed

CONFIGS = REPO / "recipes" / "model_configs"


def test_parameter_counts_of_the_published_models():
    """The published checkpoints' sizes (safetensors index total_size / 2 bytes in bfloat16)."""
    assert total_params(load_arch(CONFIGS / "qwen2.5-32b")) == 32_763_876_352
    assert total_params(load_arch(CONFIGS / "qwen2.5-7b")) == 7_615_616_512
    assert total_params(load_arch(CONFIGS / "qwen3-8b")) == 8_190_735_360  # "8.2B"
    assert total_params(load_arch(CONFIGS / "qwen3-32b")) == 32_762_123_264  # "32.8B"
    assert total_params(load_arch(CONFIGS / "deepseek-r1-distill-qwen-7b")) == 7_615_616_512  # Qwen2.5-Math-7B's shape


@pytest.mark.parametrize(("family", "tied"), [("qwen2", False), ("qwen3", True), ("llama", False)])
def test_parameter_counts_equal_the_real_modules(tmp_path, family, tied):
    import torch
    from transformers import AutoModelForCausalLM

    from flowrl_megatron.models.tiny import make_tiny_model
    from flowrl_megatron.models.z_head import ZHead

    path = make_tiny_model(tmp_path / "m", family, tie_embeddings=tied)
    arch = load_arch(path)
    assert total_params(arch) == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(path).parameters())
    for variant in ("paper", "authors"):
        cfg = load_config(None, [f"z_head.variant={variant}"], check=False)
        head = ZHead(arch.hidden_size, cfg.z_head, dtype=torch.float32)
        assert z_head_params(arch, cfg) == sum(p.numel() for p in head.parameters())
    policy, critic = run_distributed("tests.test_planner:megatron_numel", 1, path=str(path))[0]
    assert stage_params(arch, 1, 1) == policy
    assert critic_params(arch, 1, 1) == critic  # PPO's value model: untied embedding, Linear(h, 1) head


def megatron_numel(path: str) -> tuple[int, int]:
    """Parameters of the policy's and of PPO's critic's Megatron modules."""
    from flowrl_megatron.models.gpt import build_gpt_model
    from flowrl_megatron.runtime import ParallelLayout, init_model_parallel

    init_model_parallel(ParallelLayout())
    arch = load_arch(path)
    return tuple(sum(p.numel() for p in build_gpt_model(arch, value_head=v).parameters()) for v in (False, True))


def flowrl_plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flowrl_megatron", "plan", "recipes/qwen2.5_32b_math.yaml", *args,
                           "--model-config", str(CONFIGS / "qwen2.5-32b")], cwd=REPO, capture_output=True, text=True)


def test_the_32b_recipe_fits_and_a_bad_layout_is_refused():
    good = flowrl_plan()
    assert good.returncode == 0 and good.stdout.rstrip().endswith("fits."), good.stdout + good.stderr
    bad = flowrl_plan("model.tp=4", "model.pp=1")
    assert bad.returncode == 1
    assert "does not fit: a trainer rank needs 165.7 GiB of a 80 GiB GPU (largest: optimizer, 91.5 GiB)" in bad.stderr
    assert "train.recompute=full" not in bad.stderr  # the recipe sets it already: not a hint
    assert "set train.recompute=full" in flowrl_plan("model.tp=4", "model.pp=1", "train.recompute=none").stderr
    long = flowrl_plan("rollout.engine_tp=1", "rollout.max_response_tokens=120000")
    assert long.returncode == 1 and "a rollout engine's KV cache holds" in long.stderr


def test_the_7b_recipe_fits_with_its_token_budget_and_not_with_four_longest_samples():
    cfg = load_config(REPO / "recipes" / "qwen2.5_7b_math.yaml", check=False)
    arch = load_arch(CONFIGS / "qwen2.5-7b")
    assert not plan(cfg, arch).problems()
    cfg.train.max_tokens_per_micro_batch = 4 * (2048 + 8192)  # what micro_batch_size=4 used to mean: 111 GiB
    assert "a trainer rank needs 111.0 GiB" in plan(cfg, arch).problems()[0]


def measure_memory(path: str, seq: int, rows: int) -> dict:
    """Resident memory of the trainer's static state (policy, Z head, reference, Adam) and the peak added by one
    forward-backward of ``rows`` sequences of ``seq`` tokens, in this fresh process."""
    import torch

    from flowrl_megatron.config import AlgorithmConfig, ZHeadConfig
    from flowrl_megatron.models.gpt import build_gpt_model
    from flowrl_megatron.runtime import ParallelLayout, init_model_parallel
    from flowrl_megatron.training.batch import Batch
    from flowrl_megatron.training.micro_batches import MicroBatching
    from flowrl_megatron.training.parallel import build_optimizer, wrap_ddp
    from flowrl_megatron.training.step import forward_backward

    def batch(n: int, s: int) -> Batch:
        mask = torch.zeros(n, s, dtype=torch.bool)
        prompt = mask.clone().index_fill_(1, torch.arange(4), True)
        return Batch(tokens=torch.randint(0, 1000, (n, s)), prompt_mask=prompt,
                     response_mask=mask.index_fill_(1, torch.arange(4, s), True), advantages=torch.randn(n))

    init_model_parallel(ParallelLayout())
    arch = load_arch(path)
    rss = psutil.Process().memory_info
    before = rss().rss
    policy = build_gpt_model(arch, z_head=ZHeadConfig(), calculate_per_token_loss=True)
    reference = build_gpt_model(arch)
    ddp = wrap_ddp(policy)
    optimizer = build_optimizer([ddp], lr=1e-5)
    kw = dict(vocab_size=arch.vocab_size)
    forward_backward([ddp], batch(1, 8), AlgorithmConfig(), batching=MicroBatching(1), **kw)
    optimizer.step()  # allocates the Adam state
    static = rss().rss - before
    start = rss().rss
    forward_backward([ddp], batch(rows, seq), AlgorithmConfig(), batching=MicroBatching(rows), **kw)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    del reference
    return {"static": static, "activations": peak - start}


def test_the_estimate_matches_memory_measured_on_cpu(tmp_path):
    from flowrl_megatron.models.tiny import make_tiny_model

    path = make_tiny_model(tmp_path / "m", hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                           num_attention_heads=8, num_key_value_heads=2, head_dim=64, vocab_size=32000)
    seq, rows = 256, 16
    measured = run_distributed("tests.test_planner:measure_memory", 1, path=str(path), seq=seq, rows=rows)[0]
    cfg = RunConfig()
    cfg.model.path = str(path)
    cfg.data.max_prompt_tokens, cfg.rollout.max_response_tokens = 4, seq - 4
    cfg.train.micro_batch_size, cfg.train.mini_batch_prompts, cfg.rollout.n = rows, 2, rows // 2
    lines = {line.name: line.bytes for line in plan(cfg, load_arch(path), attention="unfused").trainer}
    static = sum(lines[k] for k in ("weights", "gradients", "optimizer", "reference model", "Z head"))
    dynamic = lines["activations"] + lines["logits"]
    print(f"static: estimated {static / GIB:.3f} GiB, measured {measured['static'] / GIB:.3f} GiB; activations: "
          f"estimated {dynamic / GIB:.3f} GiB, measured {measured['activations'] / GIB:.3f} GiB")
    assert measured["static"] == pytest.approx(static, rel=0.15)
    assert measured["activations"] == pytest.approx(dynamic, rel=0.25)
