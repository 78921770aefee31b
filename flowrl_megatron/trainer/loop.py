"""The training loop (ARCHITECTURE.md's step), run on every trainer rank under torchrun.

Rank 0 is also the driver (``rollout.producer``): it owns the prompts, the rollout engines and the reward pool, and
hands each step's rollout groups to every rank. One step (``train_step``): the rollout batch (synchronous: sampled
now with the current weights; asynchronous: taken from what the producer generated meanwhile) -> normalised
rewards -> reference (and, when off-policy mini-batches follow, old) log-probs -> per mini-batch of prompts:
forward_backward + optimizer step, ``epochs`` times (PPO: GAE advantages from the critic's values first, and the
critic's value-loss update beside each policy update) -> weight sync to the engines. ``run`` owns the cadence around
it: evaluation every ``eval.every`` steps, metrics, a checkpoint every ``checkpoint.every`` steps.

    python -m torch.distributed.run --nproc-per-node N -m flowrl_megatron.trainer RUN_DIR/config.yaml
    (``flowrl train RECIPE key=value ...`` writes that file and starts torchrun)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from flowrl_megatron.checkpoint import (
    latest_checkpoint,
    load_model_weights,
    load_training_state,
    save_training_state,
    start_checkpoint_writer,
)
from flowrl_megatron.cli import describe, format_eval
from flowrl_megatron.config import RunConfig, load_config
from flowrl_megatron.errors import UserError, run_cli
from flowrl_megatron.evaluation.metrics import group_metrics
from flowrl_megatron.evaluation.sampling import sample_and_grade
from flowrl_megatron.metrics import MetricsLog, PhaseTimer, StepLog, Timeline, format_breakdown
from flowrl_megatron.models.arch import load_arch
from flowrl_megatron.models.gpt import build_gpt_model, takes_packed_sequences
from flowrl_megatron.processes import (
    die_with_parent,
    forked_children_die_with_this_process,
    hold_run_dir_unless_launcher_does,
)
from flowrl_megatron.rollout.engines import EngineGroup, RemoteEngines, launch_engines
from flowrl_megatron.rollout.gloo_transfer import in_background
from flowrl_megatron.rollout.groups import RolloutBatch, RolloutGroup
from flowrl_megatron.rollout.mismatch import Mismatch, check_mismatch, probe_mismatch, probe_stats
from flowrl_megatron.rollout.producer import Driver, RolloutProducer, sample_seed
from flowrl_megatron.runtime import ParallelLayout, init_model_parallel, shutdown
from flowrl_megatron.training.batch import Batch, build_batch, local_rows, prompt_batch, step_batch
from flowrl_megatron.training.micro_batches import MicroBatching, data_parallel_split
from flowrl_megatron.training.nonfinite import NonFiniteGuard
from flowrl_megatron.training.parallel import build_lr_scheduler, build_optimizer, wrap_ddp
from flowrl_megatron.training.step import forward_backward, forward_logprobs, reduce_stats


class Trainer:
    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        init_model_parallel(ParallelLayout(tp=cfg.model.tp, pp=cfg.model.pp), seed=cfg.train.seed)
        self.rank0 = dist.get_rank() == 0
        # The engines boot (loading the model, and on GPU capturing graphs) while the ranks build their models.
        engines = launch_engines(cfg, self.run_dir) if self.rank0 else None
        try:
            start_checkpoint_writer()
            self._set_up(engines)
        except BaseException:
            if engines is not None:
                engines.stop()
            raise

    def _set_up(self, engines: EngineGroup | RemoteEngines | None) -> None:
        """Models, optimizers and schedules (resumed from the last checkpoint if there is one), then, on rank 0,
        the driver around ``engines``; the weights sent to them; the logs."""
        cfg = self.cfg
        self.arch = load_arch(cfg.model.path)
        init_ckpt = self._initial_checkpoint()
        t = cfg.train
        dtype = getattr(torch, cfg.model.dtype)
        self.policy = build_gpt_model(self.arch, dtype, z_head=cfg.z_head if cfg.algorithm.needs_log_z else None,
                                      calculate_per_token_loss=True, recompute=t.recompute == "full",
                                      attention=cfg.model.attention)
        load_model_weights(self.policy, init_ckpt, new_prefixes=("z_head.",))
        self.reference = None
        if cfg.algorithm.needs_log_z or cfg.algorithm.kl_coef or cfg.eval.every:
            self.reference = build_gpt_model(self.arch, dtype, calculate_per_token_loss=True,
                                             attention=cfg.model.attention)
            load_model_weights(self.reference, init_ckpt)
            self.reference.eval()
            self.reference.requires_grad_(False)
        self.ddp = wrap_ddp(self.policy, use_distributed_optimizer=t.distributed_optimizer)
        self.optimizer = build_optimizer([self.ddp], lr=t.lr, weight_decay=t.weight_decay, clip_grad=t.grad_clip,
                                         z_head_lr_mult=cfg.z_head.lr_mult, bf16=dtype == torch.bfloat16,
                                         use_distributed_optimizer=t.distributed_optimizer)
        self.minis = t.prompts_per_step // t.mini_batch_prompts
        self.batching = MicroBatching(micro_batch_size=t.micro_batch_size, max_tokens=t.max_tokens_per_micro_batch,
                                      packed=t.pack_sequences and takes_packed_sequences(cfg.model.attention))
        updates = t.steps * self.minis * t.epochs
        self.scheduler = build_lr_scheduler(self.optimizer, lr=t.lr, warmup_steps=t.warmup_steps,
                                            total_steps=updates, weight_decay=t.weight_decay)
        self.critic = None
        if cfg.algorithm.needs_critic:
            from flowrl_megatron.training.critic import Critic

            self.critic = Critic.build(self.arch, cfg.critic, t, dtype, cfg.model.attention, init_ckpt, updates)
        self.nonfinite = NonFiniteGuard(t.stop_after_nonfinite)
        self.step, version, rollout = 0, 0, {"stream": {"epoch": 0, "offset": 0}, "pending": []}
        resumed = latest_checkpoint(self.run_dir / "checkpoints")
        if resumed is not None:
            state = load_training_state(resumed, self.policy, self.optimizer, critic=self.critic)
            self.scheduler.load_state_dict(state["scheduler"])
            if self.critic is not None:
                self.critic.scheduler.load_state_dict(state["critic_scheduler"])
            self.step, version = state["step"], state["weight_version"]
            rollout = state.get("rollout") or {"stream": state["data"], "pending": []}  # "data": older checkpoints
            if self.rank0:
                print(f"resuming from {resumed} (step {self.step}, weight version {version})", flush=True)
        self.timeline = Timeline()
        self.driver = Driver.start(cfg, engines, self.timeline) if engines is not None else None
        if self.driver is not None:
            self.driver.stream.restore(rollout["stream"])
            self.driver.pending.extend(rollout["pending"])
            print(f"{len(self.driver.prompts)} prompts ({self.driver.filtered} longer than data.max_prompt_tokens "
                  f"left out); micro-batches: {describe(self.batching)}", flush=True)
        self.sync = self._connect_weight_sync(version)
        # The engines serve model.path, or (engines started elsewhere, rollout.engine_urls) whatever an earlier run
        # left them: give them this run's weights before anything samples.
        self._send_weights("sending the weights at start-up", version=version)
        self._probe = None  # the last weight update's probe (_start_probe), compared before the next update
        self.producer = None
        if self.driver is not None and cfg.rollout.max_staleness:
            self.producer = RolloutProducer(self.driver, self.sync.client, max_staleness=cfg.rollout.max_staleness,
                                            version=version, step=self.step,
                                            update_mode=cfg.rollout.weight_update).start()
        self.metrics = self.rollout_log = self.timeline_log = None
        if self.rank0:
            self.metrics = MetricsLog(cfg, self.step)
            self.rollout_log = StepLog(self.run_dir / "rollouts.jsonl")
            self.timeline_log = StepLog(self.run_dir / "timeline.jsonl")
            for log in (self.rollout_log, self.timeline_log):
                log.truncate_after(self.step)

    @property
    def asynchronous(self) -> bool:
        return self.cfg.rollout.max_staleness > 0

    def _initial_checkpoint(self) -> Path:
        if self.cfg.model.megatron_checkpoint:
            return Path(self.cfg.model.megatron_checkpoint)
        path = self.run_dir / "init_megatron"
        if self.rank0 and not (path / "flowrl_checkpoint.json").is_file():
            from flowrl_megatron.conversion.convert import hf_to_megatron

            hf_to_megatron(self.cfg.model.path, path)
        dist.barrier()
        return path

    def _connect_weight_sync(self, version: int):
        from flowrl_megatron.rollout.engines import default_weight_transfer_backend
        from flowrl_megatron.rollout.weight_sync import EnginesClient, MegatronWeightSource, WeightSync

        ro = self.cfg.rollout
        client = None
        if self.driver is not None:
            engines = self.driver.engines
            client = EnginesClient(engines.urls, [ro.engine_tp] * ro.engines, engines.api_key)
        return WeightSync(MegatronWeightSource(self.policy, self.arch), client,
                          backend=default_weight_transfer_backend(), address=ro.sync_address,
                          bucket_bytes=ro.bucket_mib * 1024**2,
                          version=version).connect()

    # -- one step -------------------------------------------------------------------------------------------

    def _next_rollouts(self, timer: PhaseTimer) -> RolloutBatch | None:
        """Driver only: this step's rollout groups (None on other ranks); asynchronous, the ``rollout`` phase is
        the wait for them."""
        if self.driver is None:
            return None
        if self.producer is not None:
            with timer("rollout"):
                return self.producer.take(self.sync.version)
        return self.driver.rollouts(self.step, self.sync.version, timer)

    def _from_engines(self, fn: Callable[[], Any], what: str) -> Any:
        """``fn()`` on the driver (it asks the engines for something), its result on every rank. Engines lost
        meanwhile (killed, hung) are restarted with the current weights, and ``fn`` is called again while it could
        not finish (it asks for the same samples: seeds follow step and prompt); ``rollout.engine_restarts``
        restarts at most."""
        from flowrl_megatron.rollout.client import EnginesLost

        restarts = 0
        while True:
            result, lost = None, {}
            if self.driver is not None:
                with contextlib.suppress(EnginesLost):
                    result = fn()
                lost = dict(self.driver.client.lost)
            box = [(result, lost)]
            dist.broadcast_object_list(box, src=0)
            result, lost = box[0]
            if lost:  # asynchronous: the producer's other requests are frozen meanwhile, as for a weight update
                if self.producer is not None:
                    self.producer.pause_engines()
                restarts = self._restart_engines(lost, what, restarts, version=self.sync.version)
                if self.producer is not None:
                    self.producer.resume_engines(self.sync.version)
            if result is not None:
                return result

    def _restart_engines(self, lost: dict[int, str], what: str, restarts: int, version: int | None) -> int:
        """Every rank: the driver restarts engines ``lost``; all form a new weight-transfer group and send the
        weights again (as ``version``, or as the next one when the sync itself failed). A sync that fails again
        restarts every engine again. Returns the restarts made in this step so far."""
        from flowrl_megatron.rollout.weight_sync import WeightSyncError

        while True:
            if restarts >= self.cfg.rollout.engine_restarts:
                causes = "; ".join(f"engine {i} {w}" for i, w in sorted(lost.items()))
                raise UserError(f"step {self.step + 1}: rollout engine(s) lost while {what}, after {restarts} "
                                f"restart(s) in this step ({causes}); see {self.run_dir / 'engine_logs'} and resume "
                                "the run once they start.")
            restarts += 1
            if self.driver is not None:
                start = time.monotonic()
                for i, why in sorted(lost.items()):
                    print(f"warning: step {self.step + 1}, {what}: rollout engine {i} {why}; restarting it and "
                          "sending it the current weights.", file=sys.stderr, flush=True)
                self.driver.engines.restart(sorted(lost))
                self.driver.client.revive(sorted(lost))
                print(f"rollout engine(s) {', '.join(map(str, sorted(lost)))} restarted in "
                      f"{time.monotonic() - start:.0f} s.", file=sys.stderr, flush=True)
            self.sync.reconnect()
            try:
                self.sync.send(version=version)
                return restarts
            except WeightSyncError as e:  # on every rank
                lost, what = self._failed_sync(e), "sending weights to restarted engines"

    def _failed_sync(self, e: Exception) -> dict[int, str]:
        """Every engine, lost by a failed weight sync: one may hold half the new weights, the others may be stuck in
        the transfer, so all are restarted and get the weights in a new group."""
        return dict.fromkeys(range(self.cfg.rollout.engines), f"failed the weight sync ({first_sentence(e)})")

    def train_step(self, timer: PhaseTimer) -> dict[str, float]:
        """Train on one rollout batch and send the new weights to the engines; the step's metrics."""
        cfg, algo, t = self.cfg, self.cfg.algorithm, self.cfg.train
        rollouts: RolloutBatch = self._from_engines(lambda: self._next_rollouts(timer), "generating rollouts")
        full, penalty = step_batch(rollouts.groups, algo, cfg.reward, cfg.rollout.max_response_tokens)
        version = self.sync.version
        correct = torch.tensor([r > 0.5 for g in rollouts.groups for r in g.rewards]).float().mean().item()
        if self.asynchronous:  # only samples of these very weights can be compared with them
            full.current = (full.first_version == version) & (full.last_version == version)
        rows = t.mini_batch_prompts * cfg.rollout.n
        minis = local_rows(full, rows, cfg.dp, self.batching, parallel_state.get_data_parallel_rank())
        mine = torch.cat(minis)
        local = full.replace(rewards=None, truncated=None, first_version=None, last_version=None)
        local = local.trimmed(mine)
        starts = [0]
        for m in minis:
            starts.append(starts[-1] + len(m))
        kw = dict(batching=self.batching, vocab_size=self.arch.vocab_size, temperature=cfg.rollout.temperature)
        with timer("logprobs"):
            if self.reference is not None:
                local.ref_logprobs = forward_logprobs([self.reference], local, **kw)
            if self.asynchronous:  # samples of older weights: the importance weights' denominator is what sampled
                local.old_logprobs = local.rollout_logprobs
            elif self.minis * t.epochs > 1:  # off-policy mini-batches follow: keep the sampling policy's log-probs
                local.old_logprobs = forward_logprobs([self.ddp], local, **kw)
            if self.critic is not None:  # PPO: per-token advantages from the critic's values, by GAE
                self.critic.set_advantages(local, full.rewards[mine], algo, self.batching)
        totals: dict[str, float] = {}
        grad_norms, critic_norms = [], []
        models = [self.ddp] + ([self.critic.ddp] if self.critic is not None else [])
        mismatch, skipped, empty = None, 0, 0
        with timer("update"):
            for epoch in range(t.epochs):
                for k in range(self.minis):
                    first = epoch == 0 and k == 0
                    if full.keep is not None and not full.keep[k * rows : (k + 1) * rows].any():
                        empty += 1  # every sample left out (overlong filtering): no loss to average, no update
                        continue
                    mb = local.trimmed(slice(starts[k], starts[k + 1]))
                    mb.group_ids = mb.group_ids - k * t.mini_batch_prompts
                    if not first:  # the mismatch check reads the weights the engines sampled with
                        mb.rollout_logprobs = None
                    self.ddp.zero_grad_buffer()
                    self.optimizer.zero_grad()
                    stats = forward_backward([self.ddp], mb, algo, **kw,
                                             groups=t.mini_batch_prompts if algo.needs_log_z else 0)
                    if self.critic is not None:
                        self.critic.zero_grad()
                        stats.update(self.critic.forward_backward(mb, self.batching))
                    if first:
                        mismatch = self._check_rollout_mismatch(stats)
                    if self.nonfinite.check(stats, models, self.step + 1):  # policy and critic step together
                        _, grad_norm, _ = self.optimizer.step()
                        self.scheduler.step(increment=1)
                        grad_norms.append(float(grad_norm or 0.0))
                        if self.critic is not None:
                            critic_norms.append(self.critic.step())
                    else:
                        skipped += 1
                    for name, v in stats.items():
                        totals[name] = totals.get(name, 0.0) + v / (self.minis * t.epochs)
        with timer("sync"):
            probe = self._check_probe()  # the previous update's, answered by engines that still hold it
            self._sync_weights()
            if self.asynchronous:
                self._start_probe()
                if self.step + 1 == t.steps:  # no next update: compare now
                    probe = self._check_probe()
        self.step += 1
        if self.rollout_log is not None:
            self.rollout_log.append(self.step, {"trained": [[g.order, g.prompt.row, g.first_version, g.last_version]
                                                            for g in rollouts.groups], "dropped": rollouts.dropped})
        return {**self._step_metrics(full, rollouts, totals, mismatch, grad_norms, version), **probe,
                "reward/accuracy": correct, "optim/skipped_updates": float(skipped),
                **({"optim/empty_mini_batches": float(empty)} if algo.mask_truncated else {}),
                **({"reward/overlong_penalty": penalty.mean().item()} if cfg.reward.overlong_buffer else {}),
                **self._critic_metrics(critic_norms)}

    def _critic_metrics(self, grad_norms: list[float]) -> dict[str, float]:
        if self.critic is None:
            return {}
        return {"optim/critic_lr": self.critic.optimizer.param_groups[0]["lr"],
                "optim/critic_grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else float("nan")}

    def _check_rollout_mismatch(self, stats: dict[str, float]) -> Mismatch | None:
        """The engines' log-probs against the trainer's, before any update, on the samples these weights sampled
        (every sample when synchronous; possibly none when asynchronous)."""
        tokens = int(stats.pop("count/mismatch_tokens"))
        mismatch = Mismatch(stats.pop("mismatch_abs_diff"), stats.pop("mismatch_prob_ratio"),
                            stats.pop("mismatch_abs_diff_max"), tokens)
        if not tokens:
            return None
        check_mismatch(mismatch, self.cfg.rollout.max_mismatch, self.step)
        return mismatch

    def _sync_weights(self) -> None:
        """The new weights to every engine; asynchronous: engines paused around the transfer with requests in
        flight, and what finishes from then on counts as (partly) sampled with the new version."""
        if self.producer is not None:
            self.producer.pause_engines()
        self._send_weights("syncing weights")
        if self.producer is not None:
            self.producer.resume_engines(self.sync.version)

    def _send_weights(self, what: str, version: int | None = None) -> None:
        """The weights to every engine (as ``version``, or as the next one); a failed transfer restarts every engine
        and sends them again (``_restart_engines``)."""
        from flowrl_megatron.rollout.weight_sync import WeightSyncError

        try:
            self.sync.send(version=version)
        except WeightSyncError as e:  # raised on every rank
            self._restart_engines(self._failed_sync(e), what, 0, version=version)

    def _start_probe(self) -> None:
        """After a weight update: the trainer scores the fixed probe prompts now (every rank), every engine scores
        them in the background (rank 0); ``_check_probe`` compares them before the next update. Above
        ``rollout.max_mismatch`` the run stops: with samples of older weights in every batch, this is the check that
        the engines serve the trained weights. (The engines' answer waits behind the requests in flight: comparing
        it at the next update keeps that wait off the trainer's path.)"""
        prompts = self.driver.probe_prompts if self.driver is not None else None
        box = [prompts]
        dist.broadcast_object_list(box, src=0)
        batch = prompt_batch(box[0])
        train = forward_logprobs([self.ddp], batch, batching=MicroBatching(batch.rows),
                                 vocab_size=self.arch.vocab_size)
        engines = in_background(lambda: self.driver.client.prompt_logprobs(prompts)) if self.driver else None
        self._probe = (self.step, batch, train, engines)

    def _check_probe(self) -> dict[str, float]:
        """Compare the last probe's trainer and engine log-probs (every rank; nothing when none is pending)."""
        if self._probe is None:
            return {}
        step, batch, train, engines = self._probe
        self._probe = None
        box = [None]
        if engines is not None:
            try:
                box = [engines.result()]
            except Exception as e:  # an engine lost since; restarted, it is compared after the next update
                print(f"warning: the weight check after step {step + 1} went unanswered ({first_sentence(e)}); "
                      "skipped.", file=sys.stderr, flush=True)
        dist.broadcast_object_list(box, src=0)
        if box[0] is None:
            return {}
        per_mb = []
        if train is not None:  # the last pipeline stage
            mask = batch.prompt_mask.clone()
            mask[:, 0] = False  # nothing predicts a prompt's first token
            per_mb = [probe_stats(train.cpu(), box[0], mask)]
        worst, m = probe_mismatch(reduce_stats(per_mb), len(box[0]))
        check_mismatch(m, self.cfg.rollout.max_mismatch, step, f"probe log-probs of engine {worst}")
        return {"mismatch/probe_abs_diff": m.mean_abs_diff, "mismatch/probe_abs_diff_max": m.max_abs_diff}

    def _step_metrics(self, full: Batch, rollouts: RolloutBatch, totals: dict[str, float],
                      mismatch: Mismatch | None, grad_norms: list[float], version: int) -> dict[str, float]:
        lengths = full.response_mask.sum(1).float()
        staleness = (version - full.first_version).float()
        out = {
            "reward/mean": full.rewards.mean().item(),
            "reward/timeouts": float(rollouts.reward_timeouts),
            "reward/errors": float(rollouts.reward_errors),
            **({"reward/test_pass_fraction": rollouts.test_pass_fraction}
               if rollouts.test_pass_fraction is not None else {}),
            "response/length_mean": lengths.mean().item(),
            "response/length_max": lengths.max().item(),
            "response/truncated_fraction": full.truncated.float().mean().item(),
            "rollout/staleness_mean": staleness.mean().item(),
            "rollout/staleness_max": staleness.max().item(),
            "rollout/across_updates": (full.last_version > full.first_version).float().mean().item(),
            "rollout/dropped_stale": float(rollouts.dropped.get("stale", 0)),
            "optim/lr": self.optimizer.param_groups[0]["lr"],
            "optim/grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else float("nan"),
            "weights/version": float(self.sync.version),
            "count/response_tokens": lengths.sum().item(),
        }
        if self.cfg.algorithm.dynamic_sampling:
            out["rollout/dropped_equal_rewards"] = float(rollouts.dropped.get("equal_rewards", 0))
        if mismatch is not None:
            out.update({"mismatch/abs_diff": mismatch.mean_abs_diff, "mismatch/prob_ratio": mismatch.mean_prob_ratio,
                        "mismatch/abs_diff_max": mismatch.max_abs_diff})
        out.update({f"train/{k}": v for k, v in totals.items() if not k.startswith("count/")})
        if totals:  # empty when overlong filtering left every mini-batch out
            out["batching/padding_fraction"] = 1.0 - totals["count/sample_tokens"] / max(totals["count/model_tokens"],
                                                                                          1)
            out["batching/micro_batches"] = totals["count/micro_batches"] / self.cfg.dp
        return out

    # -- evaluation and checkpoints -------------------------------------------------------------------------

    def _eval_samples(self) -> tuple[Batch, dict[str, float]] | None:
        """Driver only: eval.n samples per eval prompt from the engines, graded; the batch and its statistics."""
        from flowrl_megatron.rollout.client import SamplingConfig

        d, ev = self.driver, self.cfg.eval
        if d is None:
            return None
        sampling = SamplingConfig(n=ev.n, max_tokens=self.cfg.rollout.max_response_tokens,
                                  temperature=ev.temperature, top_p=ev.top_p)
        # The same seeds at every evaluation: what changes between evaluations is the model, not the sampler.
        seeds = [sample_seed(self.cfg.train.seed, -1, i) for i in range(len(d.eval_prompts))]
        v = self.sync.version
        graded = sample_and_grade(d.client, d.tokenizer, d.pool, self.cfg.reward.name,
                                  [p.token_ids for p in d.eval_prompts], [p.answer for p in d.eval_prompts],
                                  sampling, seeds, salt=d.salt(v))
        groups = [RolloutGroup(p, -1, g, graded.scores.rewards[i * ev.n : (i + 1) * ev.n], v, v)
                  for i, (p, g) in enumerate(zip(d.eval_prompts, graded.groups, strict=True))]
        batch = build_batch(groups)
        values = {f"eval/{k}": v for k, v in group_metrics(graded.answers, graded.correct).items()}
        values["eval/reward_mean"] = batch.rewards.mean().item()
        values["eval/response_length"] = batch.response_mask.sum(1).float().mean().item()
        return batch, values

    def evaluate(self) -> dict[str, float]:
        """The current weights on the eval prompts: pass@k, distinct (correct) answers, KL to the reference.

        kl_ref averages sum_t log pi(y_t) - log pi_ref(y_t) over the samples, both models at temperature 1, so
        with eval.temperature=1 it is an unbiased estimate of KL(pi || pi_ref). Every rank takes part.
        """
        batch, values = self._from_engines(self._eval_samples, "evaluating")
        dp, batching = self.cfg.dp, self.batching
        batch = batch.padded(dp * (1 if batching.dynamic else batching.micro_batch_size))
        mine = data_parallel_split(batch.lengths(), dp, batching)[parallel_state.get_data_parallel_rank()]
        local = batch.replace(rewards=None, truncated=None).trimmed(torch.tensor(mine))
        kw = dict(batching=batching, vocab_size=self.arch.vocab_size, temperature=1.0)
        policy = forward_logprobs([self.ddp], local, **kw)
        reference = forward_logprobs([self.reference], local, **kw)
        per_mb = []
        if policy is not None:  # the last pipeline stage
            mask = local.response_mask
            per_mb = [{"seq/kl_ref": ((policy - reference) * mask).sum(), "count/sequences": mask.any(1).sum()}]
        values["eval/kl_ref"] = reduce_stats(per_mb)["kl_ref"]
        return values

    def _eval_due(self) -> bool:
        every = self.cfg.eval.every
        return bool(every) and (self.step % every == 0 or self.step == self.cfg.train.steps)

    def _checkpoint_due(self) -> bool:
        every = self.cfg.checkpoint.every
        return bool(every and self.step % every == 0) or self.step == self.cfg.train.steps

    def save(self) -> None:
        rollout = None  # rank 0 writes it
        if self.producer is not None:
            rollout = self.producer.state()
        elif self.driver is not None:
            rollout = self.driver.state()
        state = {"step": self.step, "weight_version": self.sync.version, "scheduler": self.scheduler.state_dict(),
                 "rollout": rollout}
        if self.critic is not None:
            state["critic_scheduler"] = self.critic.scheduler.state_dict()
        save_training_state(self.run_dir / "checkpoints", self.step, self.policy, self.optimizer, state,
                            self.cfg.checkpoint.keep, hf_side=self.cfg.model.path, critic=self.critic)

    # -- the run --------------------------------------------------------------------------------------------

    def run(self) -> None:
        from tqdm import tqdm

        t = self.cfg.train
        bar = tqdm(total=t.steps, initial=self.step, desc="flowrl", disable=not self.rank0, dynamic_ncols=True)
        sums: dict[str, float] = {}
        done = 0
        try:
            if self.step == 0 and self._eval_due():  # the starting point: the reference itself
                values = self.evaluate()
                if self.metrics is not None:
                    self.metrics.log(0, values)
                    bar.write(format_eval(0, values))
            timer = PhaseTimer(self.timeline if self.rank0 else None)
            while self.step < t.steps:
                values = self.train_step(timer)
                if self._eval_due():
                    with timer("eval"):
                        values.update(self.evaluate())
                seconds = timer.breakdown()
                tokens = values.pop("count/response_tokens")
                values["perf/tokens_per_s"] = tokens / max(seconds["total"], 1e-9)
                if not self.asynchronous:  # asynchronous, the engines generate while the trainer works
                    values["perf/rollout_tokens_per_s"] = tokens / max(seconds["rollout"], 1e-9)
                values.update({f"time/{k}": v for k, v in seconds.items()})
                done += 1
                for k, v in seconds.items():
                    sums[k] = sums.get(k, 0.0) + v
                if self.rank0:
                    self._log(values, bar)
                bar.update(1)
                # A step's records are written before the checkpoint that covers them (a kill between the two
                # would otherwise lose them: the resumed run starts after that step); the save's seconds are the
                # next step's time/checkpoint.
                timer = PhaseTimer(self.timeline if self.rank0 else None)
                if self._checkpoint_due():
                    with timer("checkpoint"):
                        self.save()
            if done:
                for k, v in timer.breakdown().items():  # the last checkpoint's
                    sums[k] = sums.get(k, 0.0) + v
        finally:
            bar.close()
            if self.producer is not None:
                self.producer.close()
            if self.driver is not None:
                self.driver.close()
            if self.metrics is not None:
                self.metrics.close()
        if self.rank0 and done:
            print(format_breakdown(sums), flush=True)
            (self.run_dir / "time_breakdown.json").write_text(json.dumps(sums, indent=1))

    def _log(self, values: dict[str, float], bar) -> None:
        self.metrics.log(self.step, values)
        self.timeline_log.append(self.step, *self.timeline.drain())
        postfix = {"reward": f"{values['reward/mean']:.3f}", "acc": f"{values['reward/accuracy']:.2f}",
                   "logZ": f"{values.get('train/log_z', 0.0):.2f}", "s/step": f"{values['time/total']:.1f}"}
        if "mismatch/abs_diff" in values:
            postfix["mismatch"] = f"{values['mismatch/abs_diff']:.1e}"
        if self.asynchronous:
            postfix["stale"] = f"{values['rollout/staleness_mean']:.2f}"
        bar.set_postfix(postfix)
        if "eval/kl_ref" in values:
            bar.write(format_eval(self.step, values))


def first_sentence(e: BaseException) -> str:
    """An exception's message up to its first full stop (gloo appends a paragraph of advice to its own)."""
    return re.split(r"(?<=\.)\s", str(e), maxsplit=1)[0]


def main(argv: list[str] | None = None) -> None:
    """A rank's work under torchrun: ``python -m flowrl_megatron.trainer RUN_DIR/config.yaml`` (``__main__.py``)."""
    args = sys.argv[1:] if argv is None else argv

    def train() -> None:
        cfg = load_config(args[0], args[1:])
        die_with_parent()  # a launcher killed by SIGKILL takes its ranks (and so their engines) with it
        forked_children_die_with_this_process()  # and a rank killed mid-save its checkpoint writers
        if int(os.environ.get("RANK", "0")) == 0:
            hold_run_dir_unless_launcher_does(Path(cfg.run_dir))
        trainer = Trainer(cfg)
        try:
            trainer.run()
        finally:
            shutdown()

    run_cli(train)  # a bad input found by a rank (one launched without `flowrl train`): one sentence, exit 2
