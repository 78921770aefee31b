"""Asynchronous generation against K vLLM engines: token ids in, token ids + log-probs out.

One request per prompt asks for its ``n`` samples, so a prompt's group is generated (and
retried) as a unit. All requests are in flight at once up to ``max_concurrency``; each goes
to the engine with the fewest requests in flight. A failed request (connection error,
timeout, 5xx, or an answer that does not hold exactly ``n`` complete samples) is retried on
another engine with the same seed; after ``retries`` failures the whole batch fails with the
prompt and the last error named. Every requested sample comes back exactly once, or none do.

An engine is lost when a request to it fails and its health probe does not answer (killed), or when it has
requests in flight and has not answered a health probe for ``hang_s`` (stopped, frozen: its requests would
otherwise wait for the request timeout). A lost engine's requests are abandoned and retried on the others, it is
sent nothing more, and when every engine is lost the call raises ``EnginesLost``; the owner restarts them and
calls ``revive``.

``salt`` keys vLLM's prefix cache: the cache is keyed by tokens, not weights, so after a weight update a
cached prompt prefix holds keys and values the old weights computed. Requests salted with their weight
version only ever share cached blocks with requests of the same version.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpx


@dataclass(frozen=True)
class SamplingConfig:
    n: int = 8
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Sample:
    prompt_index: int
    sample_index: int
    token_ids: list[int]
    logprobs: list[float]  # of each sampled token, under the distribution sampled from
    finish_reason: str  # "stop" (EOS or a stop token) or "length"
    engine: int


class GenerationError(RuntimeError):
    pass


class EnginesLost(GenerationError):
    """Every engine is lost (``RolloutClient.lost``): nothing more can be generated until they are restarted."""

    def __init__(self, lost: dict[int, str]) -> None:
        self.lost = dict(lost)
        super().__init__("; ".join(f"engine {i} {why}" for i, why in sorted(lost.items())))


class _BadAnswer(Exception):
    pass


class _Lost(Exception):
    """The request's engine was lost while it was in flight."""


class RolloutClient:
    def __init__(
        self,
        urls: Sequence[str],
        api_key: str,
        *,
        max_concurrency: int = 256,
        retries: int = 3,
        request_timeout_s: float = 1800.0,
        backoff_s: float = 0.5,
        hang_s: float = 60.0,
    ) -> None:
        self.urls = list(urls)
        self.api_key = api_key
        self.max_concurrency = max_concurrency
        self.retries = retries
        self.request_timeout_s = request_timeout_s
        self.backoff_s = backoff_s
        self.hang_s = hang_s
        # httpx's default verification, built once: each new client would otherwise load the CA bundle again
        # (about 30 ms, a tenth of the trainer's time in a tiny run here), also for plain-HTTP engines.
        self.tls = httpx.create_ssl_context()
        self.in_flight = [0] * len(self.urls)
        self.requests_sent = [0] * len(self.urls)
        self.lost: dict[int, str] = {}  # engine -> why; sent nothing until revived

    @property
    def all_lost(self) -> bool:
        return len(self.lost) == len(self.urls)

    def revive(self, engines: Sequence[int]) -> None:
        """Engines restarted by their owner: send them requests again."""
        for i in engines:
            self.lost.pop(i, None)

    def _lose(self, engine: int, why: str) -> None:
        self.lost.setdefault(engine, why)

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
                 seeds: Sequence[int], salt: str | None = None) -> list[list[Sample]]:
        """``prompts[i]`` (token ids) -> its ``sampling.n`` samples, generated with ``seeds[i]``."""
        return asyncio.run(self.generate_async(prompts, sampling, seeds, salt))

    async def generate_async(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
                             seeds: Sequence[int], salt: str | None = None) -> list[list[Sample]]:
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        semaphore = asyncio.Semaphore(self.max_concurrency)
        async with self.session() as http, self.watching(http):
            tasks = [
                asyncio.create_task(self.generate_group(http, i, list(p), sampling, seeds[i], salt, semaphore))
                for i, p in enumerate(prompts)
            ]
            try:
                return list(await asyncio.gather(*tasks))
            except BaseException:
                for t in tasks:
                    t.cancel()
                raise

    @contextlib.asynccontextmanager
    async def watching(self, http: httpx.AsyncClient):
        """While inside: the hang watchdog (``_watch``) for the requests this event loop sends."""
        watchdog = asyncio.create_task(self._watch(http))
        try:
            yield
        finally:
            watchdog.cancel()

    async def _healthy(self, http: httpx.AsyncClient, engine: int, timeout_s: float) -> bool:
        try:
            return (await http.get(f"{self.urls[engine]}/health", timeout=timeout_s)).status_code == 200
        except httpx.HTTPError:
            return False

    async def _watch(self, http: httpx.AsyncClient) -> None:
        """Probe every engine with requests in flight; one that has not answered for ``hang_s`` is lost."""
        every = max(min(self.hang_s / 4, 5.0), 0.05)
        answered = {i: time.monotonic() for i in range(len(self.urls))}
        while True:
            await asyncio.sleep(every)
            busy = [i for i in range(len(self.urls)) if self.in_flight[i] and i not in self.lost]
            for i, ok in zip(busy, await asyncio.gather(*[self._healthy(http, i, every) for i in busy]), strict=True):
                now = time.monotonic()
                if ok:
                    answered[i] = now
                elif now - answered[i] >= self.hang_s:
                    self._lose(i, f"({self.urls[i]}) has not answered its health probe for {now - answered[i]:.0f} s "
                                  "with requests in flight (stopped or frozen)")
            for i in range(len(self.urls)):
                if not self.in_flight[i]:
                    answered[i] = time.monotonic()

    def session(self) -> httpx.AsyncClient:
        """An HTTP client for this client's requests, used inside one event loop."""
        limits = httpx.Limits(max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency)
        headers = {"Authorization": f"Bearer {self.api_key}"}
        return httpx.AsyncClient(limits=limits, headers=headers, timeout=self.request_timeout_s, verify=self.tls)

    def _pick_engine(self, avoid: set[int]) -> int:
        alive = [i for i in range(len(self.urls)) if i not in self.lost]
        if not alive:
            raise EnginesLost(self.lost)
        candidates = [i for i in alive if i not in avoid] or alive
        return min(candidates, key=lambda i: (self.in_flight[i], self.requests_sent[i]))

    async def _request_unless_lost(self, http: httpx.AsyncClient, engine: int, *args) -> list[Sample]:
        """``_request``, abandoned (and so retried elsewhere) within a fraction of a second of its engine being
        lost (by any event loop's watchdog: the trainer's evaluation and the rollout producer share the client)."""
        request = asyncio.ensure_future(self._request(http, engine, *args))
        try:
            while not request.done():
                await asyncio.wait({request}, timeout=0.25)
                if engine in self.lost and not request.done():
                    raise _Lost(self.lost[engine])
        finally:
            if not request.done():
                request.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await request
        return request.result()

    async def generate_group(self, http: httpx.AsyncClient, index: int, prompt: list[int], sampling: SamplingConfig,
                             seed: int, salt: str | None = None,
                             semaphore: asyncio.Semaphore | None = None) -> list[Sample]:
        """One prompt's ``sampling.n`` samples, retried on another engine when a request fails."""
        failed: set[int] = set()
        last_error = ""
        async with semaphore or contextlib.nullcontext():
            for attempt in range(self.retries + 1):
                engine = self._pick_engine(failed)
                self.in_flight[engine] += 1
                self.requests_sent[engine] += 1
                try:
                    return await self._request_unless_lost(http, engine, index, prompt, sampling, seed, salt)
                except (httpx.TransportError, httpx.HTTPStatusError, _BadAnswer, _Lost) as e:
                    failed.add(engine)
                    last_error = f"engine {engine} ({self.urls[engine]}): {type(e).__name__}: {e}"
                    if isinstance(e, httpx.TransportError) and not await self._healthy(http, engine, 5.0):
                        self._lose(engine, f"({self.urls[engine]}) stopped answering ({type(e).__name__})")
                    if isinstance(e, _Lost):
                        continue  # retried on another engine at once
                    await asyncio.sleep(self.backoff_s * (2**attempt) * (1 + random.random()))
                finally:
                    self.in_flight[engine] -= 1
        raise GenerationError(
            f"prompt {index} failed {self.retries + 1} times, last on {last_error}; "
            "check the engines' logs and that they are healthy."
        )

    async def _request(self, http: httpx.AsyncClient, engine: int, index: int, prompt: list[int],
                       sampling: SamplingConfig, seed: int, salt: str | None) -> list[Sample]:
        body = {
            "model": "policy",
            "prompt": prompt,
            "n": sampling.n,
            "max_tokens": sampling.max_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "seed": seed,
            "logprobs": 0,
            "return_token_ids": True,
            "stop_token_ids": list(sampling.stop_token_ids),
            "skip_special_tokens": False,
            "return_tokens_as_token_ids": True,  # no per-token detokenization for the log-probs
        }
        if salt is not None:
            body["cache_salt"] = salt
        response = await http.post(f"{self.urls[engine]}/v1/completions", json=body)
        if response.status_code >= 500 or response.status_code == 429:
            response.raise_for_status()
        if response.status_code != 200:
            raise GenerationError(f"engine {engine} refused prompt {index}: HTTP {response.status_code} "
                                  f"{response.text[:500]}")
        choices = sorted(response.json().get("choices", []), key=lambda c: c["index"])
        if [c["index"] for c in choices] != list(range(sampling.n)):
            raise _BadAnswer(f"expected samples 0..{sampling.n - 1}, got {[c['index'] for c in choices]}")
        samples = []
        for c in choices:
            ids = c.get("token_ids")
            lps = (c.get("logprobs") or {}).get("token_logprobs")
            if ids is None or lps is None or len(ids) != len(lps) or not ids:
                raise _BadAnswer(f"sample {c['index']} lacks token ids or log-probs")
            samples.append(Sample(index, c["index"], list(ids), [float(x) for x in lps],
                                  c.get("finish_reason") or "length", engine))
        return samples

    def prompt_logprobs(self, prompts: Sequence[Sequence[int]]) -> list[list[list[float]]]:
        """Every engine's log-probs (temperature 1) of each prompt's tokens, token-aligned (position 0 is 0):
        ``[engine][prompt][position]``. Sent to each engine directly, not balanced: this checks every engine."""
        return asyncio.run(self._prompt_logprobs(prompts))

    async def _prompt_logprobs(self, prompts: Sequence[Sequence[int]]) -> list[list[list[float]]]:
        async with self.session() as http:
            return list(await asyncio.gather(*[
                asyncio.gather(*[self._score_prompt(http, url, list(p)) for p in prompts]) for url in self.urls]))

    async def _score_prompt(self, http: httpx.AsyncClient, url: str, prompt: list[int]) -> list[float]:
        body = {"model": "policy", "prompt": prompt, "max_tokens": 1, "temperature": 1.0, "prompt_logprobs": 0,
                "return_tokens_as_token_ids": True}
        response = await http.post(f"{url}/v1/completions", json=body)
        if response.status_code != 200:
            raise GenerationError(f"{url} could not score a probe prompt: HTTP {response.status_code} "
                                  f"{response.text[:500]}")
        scored = response.json()["choices"][0]["prompt_logprobs"]
        # One entry per prompt token: None for the first, else {token: {"logprob": ...}} with the prompt's token.
        return [0.0] + [next(iter(entry.values()))["logprob"] for entry in scored[1:]]
