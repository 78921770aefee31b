"""The driver: what only trainer rank 0 holds (prompts, engines, reward pool), and the rollouts it produces.

Synchronous (``rollout.max_staleness=0``): ``Driver.rollouts`` samples one step's prompts with the weights just
synced and scores them while the trainer waits; seeds follow step and prompt, so a resumed run asks for the same
samples. Asynchronous (k >= 1): a ``RolloutProducer`` keeps the engines generating while the trainer trains. It
admits a prompt only while ``consumed + live < (engine version + k + 1) x prompts_per_step`` (groups consumed
by the trainer so far, groups issued and not yet consumed), so in data order no group is trained more than k
versions after the one that sampled its first token; a group that still would be (it finished late) is dropped
at the sink and its prompt issued again, counted. Nothing is lost across a crash: a checkpoint records the
prompts issued but not trained (``state``), and a resumed producer issues them first.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import secrets
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from flowrl_megatron.config import RunConfig
from flowrl_megatron.data.prompts import Prompt
from flowrl_megatron.errors import UserError
from flowrl_megatron.metrics import PhaseTimer, Timeline
from flowrl_megatron.rollout.client import EnginesLost, RolloutClient, Sample, SamplingConfig
from flowrl_megatron.rollout.groups import RolloutBatch, RolloutGroup

if TYPE_CHECKING:
    from flowrl_megatron.rollout.engines import EngineGroup, RemoteEngines

UpdateMode = Literal["keep", "drain"]


def sample_seed(seed: int, step: int, prompt: int) -> int:
    """The engines' seed for one prompt's samples: a resumed run asks for exactly the same samples."""
    return ((seed * 1_000_003 + step) * 1_000_033 + prompt) % (2**31 - 1)


def weight_salt(version: int, run: str = "") -> str:
    """The prefix-cache salt of requests sampled with weight version ``version`` by the run (attempt) ``run``."""
    return f"{run}weights-v{version}"


@dataclass
class Driver:
    """Prompts and their data order, the engines and a client for them, the reward pool, the eval prompts, and
    the orders of prompts to sample before new ones (issued but never trained when the run last stopped)."""

    cfg: RunConfig
    tokenizer: object
    prompts: list
    stream: object
    pool: object
    engines: object
    client: RolloutClient
    filtered: int
    eval_prompts: list
    timeline: Timeline
    pending: deque = dataclasses.field(default_factory=deque)
    # Every start of a run numbers weight versions from its checkpoint again: engines that outlive it (started
    # elsewhere, rollout.engine_urls) must not serve this start's version v from another start's cache.
    run_salt: str = dataclasses.field(default_factory=lambda: secrets.token_hex(4) + "-")

    def salt(self, version: int) -> str:
        return weight_salt(version, self.run_salt)

    @classmethod
    def start(cls, cfg: RunConfig, engines: EngineGroup | RemoteEngines, timeline: Timeline) -> Driver:
        """Around ``engines`` (launched by ``engines.launch_engines``), once they answer."""
        from transformers import AutoTokenizer

        from flowrl_megatron.data.prompts import PromptStream, load_prompts
        from flowrl_megatron.rewards.pool import RewardPool

        tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
        loaded = load_prompts(cfg.data, tokenizer)
        eval_prompts = []
        if cfg.eval.every:
            eval_data = dataclasses.replace(cfg.data, train_files=cfg.eval.files)
            eval_prompts = load_prompts(eval_data, tokenizer).prompts[: cfg.eval.max_prompts or None]
        stream = PromptStream(len(loaded.prompts), cfg.train.seed, cfg.data.shuffle)
        pool = RewardPool(cfg.reward.name, cfg.reward.workers, cfg.reward.timeout_s)
        ro = cfg.rollout
        engines.wait_healthy()
        client = RolloutClient(engines.urls, engines.api_key, max_concurrency=ro.max_concurrency,
                               hang_s=ro.engine_hang_s)
        return cls(cfg, tokenizer, loaded.prompts, stream, pool, engines, client, loaded.too_long, eval_prompts,
                   timeline)

    @property
    def sampling(self) -> SamplingConfig:
        ro = self.cfg.rollout
        return SamplingConfig(n=ro.n, max_tokens=ro.max_response_tokens, temperature=ro.temperature, top_p=ro.top_p)

    @property
    def probe_prompts(self) -> list[list[int]]:
        """The fixed prompts every engine scores after each weight update (the first few of the data)."""
        return [p.token_ids for p in self.prompts[:4]]

    def score(self, prompts: Sequence[Prompt], orders: Sequence[int], samples: Sequence[list[Sample]],
              versions: Sequence[tuple[int, int]]) -> list[RolloutGroup]:
        """Decode and grade groups of samples (of prompts at ``orders`` in the data order) into rollout groups."""
        texts = [self.tokenizer.decode(s.token_ids, skip_special_tokens=True) for g in samples for s in g]
        answers = [p.answer for p, g in zip(prompts, samples, strict=True) for _ in g]
        with self.timeline.span("rewards", "rewards"):
            scores = self.pool.score(texts, answers)
        out, start = [], 0
        for order, prompt, group, (first, last) in zip(orders, prompts, samples, versions, strict=True):
            part = scores.part(start, start + len(group))
            start += len(group)
            out.append(RolloutGroup(prompt, order, group, part.rewards, first, last, part.timeouts, part.errors,
                                    part.fractions))
        return out

    def next_orders(self, k: int) -> list[int]:
        """The next ``k`` prompts' orders: pending ones first, then the data order's."""
        orders = [self.pending.popleft() for _ in range(min(k, len(self.pending)))]
        first = self.stream.position
        self.stream.take(k - len(orders))
        return orders + list(range(first, self.stream.position))

    def state(self) -> dict:
        """Where the data order stands, and the prompts to sample before it."""
        return {"stream": self.stream.state(), "pending": list(self.pending)}

    def rollouts(self, step: int, version: int, timer: PhaseTimer) -> RolloutBatch:
        """Synchronous: the next ``train.prompts_per_step`` prompts, sampled with weight version ``version``
        (the trainer's ``rollout`` and ``rewards`` phases).

        With ``algorithm.dynamic_sampling``, groups whose rewards are all equal are dropped (counted) and another
        ``prompts_per_step`` prompts sampled, round after round (DAPO's rounds); the prompts of useful groups not
        needed after all go back to the front of the order, untrained.
        """
        want, algo = self.cfg.train.prompts_per_step, self.cfg.algorithm
        kept: list[RolloutGroup] = []
        issued: list[int] = []
        dropped = rounds = 0
        while len(kept) < want:
            if rounds == (algo.dynamic_sampling_rounds if algo.dynamic_sampling else 1):
                raise too_few_differing(step, rounds, len(kept), want)
            rounds += 1
            need = want - len(kept)
            orders = self.next_orders(want)
            seeds = [sample_seed(self.cfg.train.seed, step, len(issued) + i) for i in range(len(orders))]
            issued += orders
            prompts = [self.prompts[self.stream.index_at(o)] for o in orders]
            with timer("rollout"), self.timeline.span("engines", "generate"):
                try:
                    samples = self.client.generate([p.token_ids for p in prompts], self.sampling, seeds,
                                                   salt=self.salt(version))
                except EnginesLost:  # the whole step asked for again, in the same order, once the engines are back
                    self.pending.extendleft(reversed(issued))
                    raise
            with timer("rewards"):
                groups = self.score(prompts, orders, samples, [(version, version)] * len(orders))
            useful = [g for g in groups if g.rewards_differ or not algo.dynamic_sampling]
            dropped += len(groups) - len(useful)
            kept += useful[:need]
            self.pending.extendleft(reversed([g.order for g in useful[need:]]))
        return RolloutBatch(kept, {"equal_rewards": dropped} if algo.dynamic_sampling else {})

    def close(self) -> None:
        self.pool.close()
        self.engines.stop()


def too_few_differing(step: int, rounds: int, kept: int, want: int) -> UserError:
    return UserError(f"step {step + 1}: after {rounds} sampling rounds only {kept} of {want} prompts had rewards "
                     "that differ within their group (algorithm.dynamic_sampling), so the data is too easy or too "
                     "hard for the model; raise algorithm.dynamic_sampling_rounds or change the data.")


class RolloutProducer:
    """Asynchronous rollouts on a background thread (an asyncio loop for the requests, one thread for rewards).

    The trainer calls ``take`` for each step's groups, ``pause_engines`` / ``resume_engines`` around each weight
    update, ``state`` when it checkpoints and ``close`` at the end. ``control`` pauses and resumes the engines
    (``weight_sync.EnginesClient``): ``keep`` freezes requests in flight through the update and continues them with
    the new weights (their caches are reset, so tokens after the update are computed entirely by the new weights);
    ``drain`` waits until every request in flight has finished, then updates.
    """

    def __init__(self, driver: Driver, control, *, max_staleness: int, version: int, step: int,
                 update_mode: UpdateMode = "keep") -> None:
        self.d = driver
        self.control = control
        self.k = max_staleness
        self.batch = driver.cfg.train.prompts_per_step
        self.update_mode = update_mode
        self._cv = threading.Condition()
        self.version = version  # of the engines' weights
        self._consumed = step * self.batch
        self._pending = driver.pending  # orders issued again before new ones (dropped, or in flight at a crash)
        self._live: dict[int, int] = {}  # order -> first version: issued, not yet trained or dropped
        self._ready: list[RolloutGroup] = []
        self._attempts: Counter = Counter()
        self._holding = False  # a weight update is under way: issue nothing
        self._stopping = False
        self._error: BaseException | None = None
        self._in_flight = 0
        self._busy_since = 0.0
        self._paused_at = 0.0
        self._loop = asyncio.new_event_loop()
        self._wake = asyncio.Event()
        self._thread = threading.Thread(target=self._run, name="rollout-producer", daemon=True)

    # -- the trainer's side ---------------------------------------------------------------------------------

    def start(self) -> RolloutProducer:
        self._thread.start()
        return self

    def take(self, step: int) -> RolloutBatch:
        """The next ``prompts_per_step`` finished groups (oldest weights first) for training step ``step``, whose
        staleness ``step - first_version`` is at most k; waits while fewer are ready."""
        start = time.perf_counter()
        dropped: Counter = Counter()
        with self._cv:
            while True:
                if self._error is not None:
                    raise self._error
                if self.d.client.all_lost and len(self._ready) < self.batch:
                    raise EnginesLost(self.d.client.lost)  # the trainer restarts them, then takes again
                for group in [g for g in self._ready if step - g.first_version > self.k]:
                    self._ready.remove(group)  # finished too late for its version: sample it again
                    del self._live[group.order]
                    self._pending.appendleft(group.order)
                    dropped["stale"] += 1
                if self.d.cfg.algorithm.dynamic_sampling:
                    for group in [g for g in self._ready if not g.rewards_differ]:
                        self._ready.remove(group)  # no signal for the baseline: dropped, and a new prompt issued
                        del self._live[group.order]
                        dropped["equal_rewards"] += 1
                    rounds = self.d.cfg.algorithm.dynamic_sampling_rounds
                    if dropped["equal_rewards"] > (rounds - 1) * self.batch:  # as many as `rounds` batches issued
                        raise too_few_differing(step, rounds, len(self._ready), self.batch)
                if len(self._ready) >= self.batch:
                    break
                if dropped:
                    self._poke()
                self._cv.wait(timeout=1.0)
            self._ready.sort(key=lambda g: (g.first_version, g.order))
            groups, self._ready = self._ready[: self.batch], self._ready[self.batch :]
            for group in groups:
                del self._live[group.order]
            self._consumed += self.batch
        self._poke()
        return RolloutBatch(groups, dict(dropped), time.perf_counter() - start)

    def pause_engines(self) -> None:
        """Before a weight update (rank 0): issue nothing more, freeze (or drain) what is in flight."""
        with self._cv:
            self._holding = True
        with self.d.timeline.span("engines", "pause"):
            self.control.pause("keep" if self.update_mode == "keep" else "wait")
        self._paused_at = time.time()

    def resume_engines(self, version: int) -> None:
        """After the update to ``version``: what finishes from now on was (partly) sampled with it."""
        with self._cv:
            self.version = version
        self.control.resume()
        self.d.timeline.add("engines", "paused", self._paused_at, time.time())
        with self._cv:
            self._holding = False
        self._poke()

    def counts(self) -> dict[str, int]:
        """Groups issued and not yet trained (``live``: in flight, being scored or ready), ready, waiting to be
        issued again, and consumed by the trainer; the engines' weight version."""
        with self._cv:
            return {"live": len(self._live), "ready": len(self._ready), "pending": len(self._pending),
                    "consumed": self._consumed, "version": self.version}

    def state(self) -> dict:
        """What a checkpoint needs: the data order's position and every issued prompt not yet trained."""
        with self._cv:
            return {"stream": self.d.stream.state(), "pending": sorted(self._live) + list(self._pending)}

    def close(self) -> None:
        with self._cv:
            self._stopping = True
        self._poke()
        self._thread.join(timeout=60)

    # -- the producer's side (its own thread) ---------------------------------------------------------------

    def _poke(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has ended
            self._loop.call_soon_threadsafe(self._wake.set)

    def _admissible(self) -> bool:
        return (not self._holding and not self.d.client.all_lost
                and self._consumed + len(self._live) < (self.version + self.k + 1) * self.batch)

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self._main())
        except BaseException as e:  # handed to the trainer at its next take
            with self._cv:
                self._error = e
                self._cv.notify_all()
        finally:
            self._loop.close()

    async def _main(self) -> None:
        scored: asyncio.Queue = asyncio.Queue()
        rewards = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rollout-rewards")
        tasks: set[asyncio.Task] = set()
        scorer = asyncio.create_task(self._score(scored, rewards))
        try:
            async with self.d.client.session() as http, self.d.client.watching(http):
                while (admitted := await self._admit()) is not None:
                    task = asyncio.create_task(self._group(http, *admitted, scored))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    task.add_done_callback(self._failed)
                    if self._error is not None:
                        break
        finally:
            for task in [*tasks, scorer]:
                task.cancel()
            await asyncio.gather(*tasks, scorer, return_exceptions=True)
            rewards.shutdown(wait=False, cancel_futures=True)

    def _failed(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            with self._cv:
                self._error = self._error or task.exception()
                self._cv.notify_all()
            self._wake.set()

    async def _admit(self) -> tuple[int, Prompt, int] | None:
        """Wait until a prompt may be issued; its order, the prompt and the weight version it is issued with."""
        while True:
            with self._cv:
                if self._stopping or self._error is not None:
                    return None
                if self._admissible():
                    (order,) = self.d.next_orders(1)
                    self._live[order] = self.version
                    return order, self.d.prompts[self.d.stream.index_at(order)], self.version
                self._wake.clear()
            await self._wake.wait()

    async def _group(self, http, order: int, prompt: Prompt, version: int, scored: asyncio.Queue) -> None:
        self._attempts[order] += 1
        seed = sample_seed(self.d.cfg.train.seed, -1 - self._attempts[order], order)  # eval uses step -1
        self._busy(+1)
        try:
            samples = await self.d.client.generate_group(http, order, prompt.token_ids, self.d.sampling, seed,
                                                         salt=self.d.salt(version))
        except EnginesLost:  # issued again once the trainer has restarted them
            with self._cv:
                del self._live[order]
                self._pending.appendleft(order)
                self._cv.notify_all()
            return
        finally:
            self._busy(-1)
        with self._cv:
            last = self.version
        await scored.put((prompt, order, samples, (version, last)))

    def _busy(self, change: int) -> None:
        """The engines' busy intervals for the timeline: while any of this producer's requests is in flight."""
        if change > 0 and self._in_flight == 0:
            self._busy_since = time.time()
        self._in_flight += change
        if self._in_flight == 0:
            self.d.timeline.add("engines", "generate", self._busy_since, time.time())

    async def _score(self, scored: asyncio.Queue, rewards: concurrent.futures.Executor) -> None:
        """Grade finished groups (all that have arrived, together) off the event loop, then make them ready."""
        loop = asyncio.get_running_loop()
        while True:
            items = [await scored.get()]
            while not scored.empty():
                items.append(scored.get_nowait())
            prompts, orders, samples, versions = zip(*items, strict=True)
            groups = await loop.run_in_executor(rewards, self.d.score, prompts, orders, samples, versions)
            with self._cv:
                self._ready += groups
                self._cv.notify_all()
