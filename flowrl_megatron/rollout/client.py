"""Asynchronous generation against K vLLM engines: token ids in, token ids + log-probs out.

One request per prompt asks for its ``n`` samples, so a prompt's group is generated (and
retried) as a unit. All requests are in flight at once up to ``max_concurrency``; each goes
to the engine with the fewest requests in flight. A failed request (connection error,
timeout, 5xx, or an answer that does not hold exactly ``n`` complete samples) is retried on
another engine with the same seed; after ``retries`` failures the whole batch fails with the
prompt and the last error named. Every requested sample comes back exactly once, or none do.

``salt`` keys vLLM's prefix cache: the cache is keyed by tokens, not weights, so after a weight update a
cached prompt prefix holds keys and values the old weights computed. Requests salted with their weight
version only ever share cached blocks with requests of the same version.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
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


class _BadAnswer(Exception):
    pass


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
    ) -> None:
        self.urls = list(urls)
        self.api_key = api_key
        self.max_concurrency = max_concurrency
        self.retries = retries
        self.request_timeout_s = request_timeout_s
        self.backoff_s = backoff_s
        self.in_flight = [0] * len(self.urls)
        self.requests_sent = [0] * len(self.urls)

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
                 seeds: Sequence[int], salt: str | None = None) -> list[list[Sample]]:
        """``prompts[i]`` (token ids) -> its ``sampling.n`` samples, generated with ``seeds[i]``."""
        return asyncio.run(self.generate_async(prompts, sampling, seeds, salt))

    async def generate_async(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
                             seeds: Sequence[int], salt: str | None = None) -> list[list[Sample]]:
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        semaphore = asyncio.Semaphore(self.max_concurrency)
        async with self.session() as http:
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

    def session(self) -> httpx.AsyncClient:
        """An HTTP client for this client's requests, used inside one event loop."""
        limits = httpx.Limits(max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency)
        headers = {"Authorization": f"Bearer {self.api_key}"}
        return httpx.AsyncClient(limits=limits, headers=headers, timeout=self.request_timeout_s)

    def _pick_engine(self, avoid: set[int]) -> int:
        candidates = [i for i in range(len(self.urls)) if i not in avoid] or list(range(len(self.urls)))
        return min(candidates, key=lambda i: (self.in_flight[i], self.requests_sent[i]))

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
                    return await self._request(http, engine, index, prompt, sampling, seed, salt)
                except (httpx.TransportError, httpx.HTTPStatusError, _BadAnswer) as e:
                    failed.add(engine)
                    last_error = f"engine {engine} ({self.urls[engine]}): {type(e).__name__}: {e}"
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
