"""The training loop (ARCHITECTURE.md's step), run on every trainer rank under torchrun.

Rank 0 is also the driver: it owns the prompts, the rollout engines and client, and the reward pool.
One step: prompts -> engines (n samples each, seeded by step and prompt) -> rewards -> the batch,
broadcast to every rank -> normalised rewards -> reference (and, when off-policy mini-batches follow,
old) log-probs -> per mini-batch of prompts: forward_backward + optimizer step, ``epochs`` times ->
weight sync to the engines -> evaluation every ``eval.every`` steps -> metrics -> checkpoint every
``checkpoint.every`` steps.

    python -m torch.distributed.run --nproc-per-node N -m flowrl_megatron.trainer RUN_DIR/config.yaml
    (``flowrl train RECIPE key=value ...`` writes that file and starts torchrun)
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from megatron.core import parallel_state

from flowrl_megatron.algorithms.losses import normalize_rewards
from flowrl_megatron.checkpoint import (
    latest_checkpoint,
    load_model_weights,
    load_training_state,
    save_training_state,
)
from flowrl_megatron.config import RunConfig, load_config
from flowrl_megatron.evaluation.metrics import group_metrics
from flowrl_megatron.evaluation.sampling import sample_and_grade
from flowrl_megatron.files import write_text_atomic
from flowrl_megatron.metrics import MetricsLog, PhaseTimer, format_breakdown
from flowrl_megatron.models.arch import load_arch
from flowrl_megatron.models.gpt import build_gpt_model, takes_packed_sequences
from flowrl_megatron.rollout.mismatch import Mismatch, check_mismatch
from flowrl_megatron.runtime import ParallelLayout, init_model_parallel, shutdown
from flowrl_megatron.training.micro_batches import MicroBatching, data_parallel_split, sample_lengths
from flowrl_megatron.training.parallel import build_lr_scheduler, build_optimizer, wrap_ddp
from flowrl_megatron.training.step import forward_backward, forward_logprobs, reduce_stats


def sample_seed(seed: int, step: int, prompt: int) -> int:
    """The engines' seed for one prompt's samples: a resumed run asks for exactly the same samples."""
    return ((seed * 1_000_003 + step) * 1_000_033 + prompt) % (2**31 - 1)


@dataclass
class Driver:
    """What only rank 0 holds."""

    tokenizer: object
    prompts: list
    stream: object
    pool: object
    engines: object
    client: object
    filtered: int
    eval_prompts: list

    def close(self) -> None:
        self.pool.close()
        self.engines.stop()


def start_driver(cfg: RunConfig, run_dir: Path):
    from transformers import AutoTokenizer

    from flowrl_megatron.data.prompts import PromptStream, load_prompts
    from flowrl_megatron.rewards.pool import RewardPool
    from flowrl_megatron.rollout.client import RolloutClient
    from flowrl_megatron.rollout.engines import EngineConfig, EngineGroup, RemoteEngines

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    loaded = load_prompts(cfg.data, tokenizer)
    eval_prompts = []
    if cfg.eval.every:
        eval_prompts = load_prompts(dataclasses.replace(cfg.data, train_files=cfg.eval.files), tokenizer).prompts
        eval_prompts = eval_prompts[: cfg.eval.max_prompts or None]
    stream = PromptStream(len(loaded.prompts), cfg.train.seed, cfg.data.shuffle)
    pool = RewardPool(cfg.reward.name, cfg.reward.workers, cfg.reward.timeout_s)
    max_len = cfg.data.max_prompt_tokens + cfg.rollout.max_response_tokens
    if cfg.rollout.engine_urls:
        engines = RemoteEngines(cfg.rollout.engine_urls, os.environ.get("FLOWRL_API_KEY", "")).start()
    else:
        engine_cfg = EngineConfig(model=cfg.model.path, tensor_parallel_size=cfg.rollout.engine_tp,
                                  max_model_len=max_len)
        engines = EngineGroup(engine_cfg, cfg.rollout.engines, run_dir / "engine_logs").start()
    client = RolloutClient(engines.urls, engines.api_key,
                           max_concurrency=cfg.rollout.max_concurrency)
    return Driver(tokenizer, loaded.prompts, stream, pool, engines, client, loaded.too_long, eval_prompts)


def build_batch(prompts: list, groups: list, rewards: list[float]) -> dict[str, torch.Tensor]:
    """Rows = prompt + response, right-padded, token-aligned (position t: log p(token_t | < t))."""
    rows = [(p, s) for p, g in zip(prompts, groups, strict=True) for s in g]
    width = max(len(p.token_ids) + len(s.token_ids) for p, s in rows)
    b = len(rows)
    tokens = torch.zeros(b, width, dtype=torch.long)
    prompt_mask = torch.zeros(b, width, dtype=torch.bool)
    response_mask = torch.zeros(b, width, dtype=torch.bool)
    rollout = torch.zeros(b, width)
    for i, (p, s) in enumerate(rows):
        n_p, n_r = len(p.token_ids), len(s.token_ids)
        tokens[i, : n_p + n_r] = torch.tensor(p.token_ids + s.token_ids)
        prompt_mask[i, :n_p] = True
        response_mask[i, n_p : n_p + n_r] = True
        rollout[i, n_p : n_p + n_r] = torch.tensor(s.logprobs)
    n = len(groups[0])
    return {
        "tokens": tokens, "prompt_mask": prompt_mask, "response_mask": response_mask, "rollout_logprobs": rollout,
        "rewards": torch.tensor(rewards, dtype=torch.float32), "group_ids": torch.arange(b) // n,
        "truncated": torch.tensor([s.finish_reason == "length" for _, s in rows]),
    }


def local_rows(full: dict[str, torch.Tensor], cfg: RunConfig, batching: MicroBatching,
               dp_rank: int) -> list[torch.Tensor]:
    """Data-parallel rank ``dp_rank``'s rows of each mini-batch (equal token loads with a token budget)."""
    rows = cfg.train.mini_batch_prompts * cfg.rollout.n
    lengths = sample_lengths(full)
    out = []
    for start in range(0, len(lengths), rows):
        mine = data_parallel_split(lengths[start : start + rows], cfg.dp, batching)[dp_rank]
        out.append(torch.tensor(mine) + start)
    return out


def padded(batch: dict[str, torch.Tensor], multiple: int) -> dict[str, torch.Tensor]:
    """Rows appended (copies of row 0 with nothing to score) until their count is a multiple of ``multiple``."""
    extra = -batch["tokens"].shape[0] % multiple
    if not extra:
        return batch
    out = {k: torch.cat([v, v[:1].expand(extra, *v.shape[1:])]) for k, v in batch.items()}
    out["response_mask"][-extra:] = False
    return out


def trimmed(batch: dict[str, torch.Tensor], rows: slice | torch.Tensor) -> dict[str, torch.Tensor]:
    """Select rows and drop the padding columns none of them uses (same on every stage of this pipeline)."""
    part = {k: v[rows] for k, v in batch.items()}
    width = int((part["prompt_mask"] | part["response_mask"]).sum(1).max())
    return {k: v[:, :width] if v.dim() == 2 else v for k, v in part.items()}


class Trainer:
    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        init_model_parallel(ParallelLayout(tp=cfg.model.tp, pp=cfg.model.pp), seed=cfg.train.seed)
        self.rank0 = dist.get_rank() == 0
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
        self.scheduler = build_lr_scheduler(self.optimizer, lr=t.lr, warmup_steps=t.warmup_steps,
                                            total_steps=t.steps * self.minis * t.epochs, weight_decay=t.weight_decay)
        self.step, version, data = 0, 0, {"epoch": 0, "offset": 0}
        resumed = latest_checkpoint(self.run_dir / "checkpoints")
        if resumed is not None:
            state = load_training_state(resumed, self.policy, self.optimizer)
            self.scheduler.load_state_dict(state["scheduler"])
            self.step, version, data = state["step"], state["weight_version"], state["data"]
        self.driver = start_driver(cfg, self.run_dir) if self.rank0 else None
        if self.driver is not None:
            self.driver.stream.restore(data)
            print(f"{len(self.driver.prompts)} prompts ({self.driver.filtered} longer than data.max_prompt_tokens "
                  f"left out); micro-batches: {describe(self.batching)}", flush=True)
        self.sync = self._connect_weight_sync(version)
        if resumed is not None:  # the engines start from model.path: give them the resumed weights
            self.sync.send(version=version)
        self.metrics = MetricsLog(self.run_dir) if self.rank0 else None
        if self.metrics is not None:
            self.metrics.truncate_after(self.step)

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

    def _rollouts(self, timer: PhaseTimer) -> tuple[dict[str, torch.Tensor], dict] | None:
        """Driver only: prompts -> samples -> rewards -> the batch and its counters (None on other ranks)."""
        from flowrl_megatron.rollout.client import SamplingConfig

        d, cfg = self.driver, self.cfg
        if d is None:
            return None
        picked = [d.prompts[i] for i in d.stream.take(cfg.train.prompts_per_step)]
        sampling = SamplingConfig(n=cfg.rollout.n, max_tokens=cfg.rollout.max_response_tokens,
                                  temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p)
        with timer("rollout"):
            seeds = [sample_seed(cfg.train.seed, self.step, i) for i in range(len(picked))]
            groups = d.client.generate([p.token_ids for p in picked], sampling, seeds)
        with timer("rewards"):
            texts = [d.tokenizer.decode(s.token_ids, skip_special_tokens=True) for g in groups for s in g]
            answers = [p.answer for p, g in zip(picked, groups, strict=True) for _ in g]
            scores = d.pool.score(texts, answers)
        info = {"reward_timeouts": scores.timeouts, "reward_errors": scores.errors,
                "test_pass_fraction": scores.mean_fraction}
        return build_batch(picked, groups, scores.rewards), info

    def _eval_samples(self) -> tuple[dict[str, torch.Tensor], dict[str, float]] | None:
        """Driver only: eval.n samples per eval prompt from the engines, graded; the batch and its statistics."""
        from flowrl_megatron.rollout.client import SamplingConfig

        d, ev = self.driver, self.cfg.eval
        if d is None:
            return None
        sampling = SamplingConfig(n=ev.n, max_tokens=self.cfg.rollout.max_response_tokens,
                                  temperature=ev.temperature, top_p=ev.top_p)
        # The same seeds at every evaluation: what changes between evaluations is the model, not the sampler.
        seeds = [sample_seed(self.cfg.train.seed, -1, i) for i in range(len(d.eval_prompts))]
        graded = sample_and_grade(d.client, d.tokenizer, d.pool, self.cfg.reward.name,
                                  [p.token_ids for p in d.eval_prompts], [p.answer for p in d.eval_prompts],
                                  sampling, seeds)
        batch = build_batch(d.eval_prompts, graded.groups, graded.scores.rewards)
        values = {f"eval/{k}": v for k, v in group_metrics(graded.answers, graded.correct).items()}
        values["eval/reward_mean"] = batch["rewards"].mean().item()
        values["eval/response_length"] = batch["response_mask"].sum(1).float().mean().item()
        return batch, values

    def evaluate(self) -> dict[str, float]:
        """The current weights on the eval prompts: pass@k, distinct (correct) answers, KL to the reference.

        kl_ref averages sum_t log pi(y_t) - log pi_ref(y_t) over the samples, both models at temperature 1, so
        with eval.temperature=1 it is an unbiased estimate of KL(pi || pi_ref). Every rank takes part.
        """
        box = [self._eval_samples()]
        dist.broadcast_object_list(box, src=0)
        batch, values = box[0]
        dp, batching = self.cfg.dp, self.batching
        batch = padded(batch, dp * (1 if batching.dynamic else batching.micro_batch_size))
        mine = data_parallel_split(sample_lengths(batch), dp, batching)[parallel_state.get_data_parallel_rank()]
        local = trimmed(batch, torch.tensor(mine))
        kw = dict(batching=batching, vocab_size=self.arch.vocab_size, temperature=1.0)
        policy = forward_logprobs([self.ddp], local, **kw)
        reference = forward_logprobs([self.reference], local, **kw)
        per_mb = []
        if policy is not None:  # the last pipeline stage
            mask = local["response_mask"]
            per_mb = [{"seq/kl_ref": ((policy - reference) * mask).sum(), "count/sequences": mask.any(1).sum()}]
        values["eval/kl_ref"] = reduce_stats(per_mb)["kl_ref"]
        return values

    def _eval_due(self) -> bool:
        every = self.cfg.eval.every
        return bool(every) and (self.step % every == 0 or self.step == self.cfg.train.steps)

    def train_step(self) -> dict[str, float]:
        cfg, algo, t = self.cfg, self.cfg.algorithm, self.cfg.train
        timer = PhaseTimer()
        box = [self._rollouts(timer)]
        dist.broadcast_object_list(box, src=0)
        full, info = box[0]
        full["advantages"] = normalize_rewards(algo, full["rewards"], full["group_ids"])
        minis = local_rows(full, cfg, self.batching, parallel_state.get_data_parallel_rank())
        local = trimmed(full, torch.cat(minis))
        starts = [0, *itertools.accumulate(len(m) for m in minis)]
        kw = dict(batching=self.batching, vocab_size=self.arch.vocab_size, temperature=cfg.rollout.temperature)
        with timer("logprobs"):
            if self.reference is not None:
                ref = forward_logprobs([self.reference], local, **kw)
                if ref is not None:
                    local["ref_logprobs"] = ref
            if self.minis * t.epochs > 1:  # off-policy mini-batches follow: keep the sampling policy's log-probs
                old = forward_logprobs([self.ddp], local, **kw)
                if old is not None:
                    local["old_logprobs"] = old
        keys = ["tokens", "prompt_mask", "response_mask", "advantages", "ref_logprobs", "old_logprobs"]
        totals: dict[str, float] = {}
        grad_norms = []
        with timer("update"):
            for epoch in range(t.epochs):
                for k in range(self.minis):
                    rows = slice(starts[k], starts[k + 1])
                    first = epoch == 0 and k == 0
                    mb = trimmed({key: local[key] for key in keys + ["rollout_logprobs"] * first if key in local},
                                 rows)
                    self.ddp.zero_grad_buffer()
                    self.optimizer.zero_grad()
                    stats = forward_backward([self.ddp], mb, algo, **kw)
                    if first:  # before any update: the engines sampled with exactly these weights
                        mismatch = Mismatch(stats.pop("mismatch_abs_diff"), stats.pop("mismatch_prob_ratio"),
                                            stats.pop("mismatch_abs_diff_max"), int(stats["count/tokens"]))
                        check_mismatch(mismatch, cfg.rollout.max_mismatch, self.step)
                    _, grad_norm, _ = self.optimizer.step()
                    self.scheduler.step(increment=1)
                    grad_norms.append(float(grad_norm or 0.0))
                    for name, v in stats.items():
                        totals[name] = totals.get(name, 0.0) + v / (self.minis * t.epochs)
        with timer("sync"):
            self.sync.send()
        self.step += 1
        evaluated = {}
        if self._eval_due():
            with timer("eval"):
                evaluated = self.evaluate()
        with timer("checkpoint"):
            every = cfg.checkpoint.every
            if (every and self.step % every == 0) or self.step == t.steps:
                self.save()
        return {**self._step_metrics(full, info, totals, mismatch, grad_norms, timer), **evaluated}

    def _step_metrics(self, full, info, totals, mismatch: Mismatch, grad_norms, timer: PhaseTimer) -> dict[str, float]:
        rewards = full["rewards"]
        lengths = full["response_mask"].sum(1).float()
        seconds = timer.breakdown()
        out = {
            "reward/mean": rewards.mean().item(),
            "reward/accuracy": (rewards > 0.5).float().mean().item(),
            "reward/timeouts": float(info["reward_timeouts"]),
            "reward/errors": float(info["reward_errors"]),
            **({"reward/test_pass_fraction": info["test_pass_fraction"]}
               if info["test_pass_fraction"] is not None else {}),
            "response/length_mean": lengths.mean().item(),
            "response/length_max": lengths.max().item(),
            "response/truncated_fraction": full["truncated"].float().mean().item(),
            "mismatch/abs_diff": mismatch.mean_abs_diff,
            "mismatch/prob_ratio": mismatch.mean_prob_ratio,
            "mismatch/abs_diff_max": mismatch.max_abs_diff,
            "optim/lr": self.optimizer.param_groups[0]["lr"],
            "optim/grad_norm": sum(grad_norms) / len(grad_norms),
            "weights/version": float(self.sync.version),
            "perf/tokens_per_s": lengths.sum().item() / max(seconds["total"], 1e-9),
            "perf/rollout_tokens_per_s": lengths.sum().item() / max(seconds["rollout"], 1e-9),
        }
        out.update({f"train/{k}": v for k, v in totals.items() if not k.startswith("count/")})
        out["batching/padding_fraction"] = 1.0 - totals["count/sample_tokens"] / max(totals["count/model_tokens"], 1)
        out["batching/micro_batches"] = totals["count/micro_batches"] / self.cfg.dp
        out.update({f"time/{k}": v for k, v in seconds.items()})
        return out

    def save(self) -> None:
        state = {"step": self.step, "weight_version": self.sync.version, "scheduler": self.scheduler.state_dict(),
                 "data": self.driver.stream.state() if self.driver else None}  # rank 0 writes it
        save_training_state(self.run_dir / "checkpoints", self.step, self.policy, self.optimizer, state,
                            self.cfg.checkpoint.keep, hf_side=self.cfg.model.path)

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
            while self.step < t.steps:
                values = self.train_step()
                done += 1
                for k, v in values.items():
                    if k.startswith("time/"):
                        sums[k] = sums.get(k, 0.0) + v
                if self.metrics is not None:
                    self.metrics.log(self.step, values)
                    bar.set_postfix({"reward": f"{values['reward/mean']:.3f}",
                                     "acc": f"{values['reward/accuracy']:.2f}",
                                     "logZ": f"{values.get('train/log_z', 0.0):.2f}",
                                     "mismatch": f"{values['mismatch/abs_diff']:.1e}",
                                     "s/step": f"{values['time/total']:.1f}"})
                    if "eval/kl_ref" in values:
                        bar.write(format_eval(self.step, values))
                bar.update(1)
        finally:
            bar.close()
            if self.driver is not None:
                self.driver.close()
            if self.metrics is not None:
                self.metrics.close()
        if self.rank0 and done:
            breakdown = {k.removeprefix("time/"): v for k, v in sums.items()}
            print(format_breakdown(breakdown), flush=True)
            (self.run_dir / "time_breakdown.json").write_text(json.dumps(breakdown, indent=1))


def describe(batching: MicroBatching) -> str:
    layout = "packed (THD)" if batching.packed else "padded"
    if batching.dynamic:
        return f"{layout}, up to {batching.max_tokens} tokens each"
    return f"{layout}, {batching.micro_batch_size} samples each"


def format_eval(step: int, values: dict[str, float]) -> str:
    shown = {k.removeprefix("eval/"): v for k, v in values.items() if k.startswith("eval/")}
    return f"eval after step {step}: " + "  ".join(f"{k} {v:.3g}" for k, v in shown.items())


def main(argv: list[str] | None = None) -> None:
    """Entry point under torchrun: ``python -m flowrl_megatron.trainer RUN_DIR/config.yaml``."""
    args = sys.argv[1:] if argv is None else argv
    cfg = load_config(args[0], args[1:])
    trainer = Trainer(cfg)
    try:
        trainer.run()
    finally:
        shutdown()


def write_run_config(cfg: RunConfig) -> Path:
    """The resolved config, saved in the run directory: what torchrun's ranks load, and the run's record."""
    from flowrl_megatron.config import to_dict

    return write_text_atomic(Path(cfg.run_dir) / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))


if __name__ == "__main__":
    main()
