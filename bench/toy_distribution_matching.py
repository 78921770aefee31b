"""FlowRL matches a multimodal reward distribution; GRPO collapses (the analogue of the paper's Figure 1).

Everything is exact and enumerable: one prompt, responses of 3 tokens over a 6-token vocabulary
(216 sequences), a real megatron-core GPTModel policy (+ Z head) trained through the same
schedule, losses and optimizer as production. Four responses are rewarded (r = 1, all
others 0). The reference policy is the tiny model after an exact supervised warm-up towards
uneven mass on the four modes. FlowRL and GRPO then train from it with the same budget
(steps, samples per step, learning rate), sampling exactly from the current policy.

Target: pi*(y) proportional to pi_ref(y) exp(beta r(y)) with raw binary rewards and beta = 15,
i.e. (up to e^-15) the reference restricted to the rewarded responses. Training uses the
group-normalised r_hat as production does: with binary rewards every mixed group gives
correct answers r_hat > 0 > wrong ones, a gap of 1/std (about 2 or more for 32 samples), so
exp(beta * |y| * r_hat) separates them by about e^88 or more whatever the group's spread, and all-correct groups
(r_hat = 0) pull log pi - log pi_ref to the same value on every mode: the fixed point is the
same pi*. (With a continuous reward, group normalisation would rescale the target's
temperature with each group's spread; there, use reward_normalization="none".)

All FlowRL settings are the production defaults (group normalisation, beta 15, clipped
importance weight, Z head at the policy's learning rate). Sensitivity seen while choosing the
toy: with a reference that puts half its mass on unrewarded responses (instead of about a
fifth), on-policy FlowRL also lost its rarest modes within 200-600 steps. Pushing down an
unrewarded response through the softmax raises every token in proportion to its probability,
so while unrewarded mass remains the dominant mode gains fastest, and a mode that stops being
sampled is no longer corrected by the all-correct groups that hold the target ratios.
With a fifth, the step size still mattered: at 600 steps x 64 samples with lr 1e-3, seed 0 lost
mode 4; the defaults below are 1200 x 32, lr 5e-4.

A run is a trajectory of 38,400 draws from the policy, so it is reproducible on one CPU model (single-threaded)
but not across models: a last-bit difference in a kernel flips one draw and the two runs part ways. Seeds 0, 1 and
2 gave FlowRL KL 0.016, 0.010, 0.012 on one machine and 0.354, 0.296, 0.015 on another (AMD EPYC), where seed 0
ended with 2% of its mass still on unrewarded responses and seed 1 lost mode 2 (a mode that stops being sampled is
not restored). GRPO ended at KL 0.48-0.59 in all six (on the second machine: 0.999 or more on one mode each time).
The table below is one machine's; ``--check`` therefore judges what held on both over several seeds, not one
seed's numbers:

- GRPO keeps less than half the target mass on at least 2 of the 4 modes, in every seed;
- FlowRL keeps at least 3 of the 4 modes at half their target mass or more, and ends closer to pi* than GRPO,
  in every seed;
- FlowRL matches the target (every mode at half its target mass or more, at most 0.05 unrewarded mass, against
  the reference's 0.21) in a majority of the seeds, and its mean KL is at most half of GRPO's.

GSPO and PPO (``--algorithms flowrl,grpo,gspo,ppo``), reward maximisers like GRPO, collapsed the same way in each
seed of the table: 0.999 of the mass on one mode. PPO's critic starts from the reference's weights with a fresh value
head and learns at 10x the policy's rate (verl's ratio); gamma = lambda = 1 and whitened advantages, as in
production.

KL(pi || pi*) weighs each unit of unrewarded mass by about beta = 15 nats, so it mostly reports leftover
unrewarded mass; the mode masses and the unrewarded column show the shape separately.

    python bench/toy_distribution_matching.py [--seeds 0,1,2] [--algorithms flowrl,grpo,gspo,ppo] [--jobs 2]
        [--markdown docs/toy_distribution_matching.md] [--check]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VOCAB = 6  # response tokens 0..5; the prompt is token 5 as well (a single fixed prompt)
LENGTH = 3
PROMPT = [5]
MODES = [(0, 1, 2), (3, 3, 0), (4, 2, 1), (1, 4, 4)]
REF_MODE_MASS = [0.45, 0.20, 0.10, 0.05]  # uneven; the other 212 responses share the remaining 0.20
BETA = 15.0
CHECKED = ("flowrl", "grpo")  # the algorithms --check compares
CRITIC_LR_MULT = 10.0  # PPO's critic learns at 10x the policy's rate, as in verl's PPO defaults (1e-5 vs 1e-6)


def arch():
    from flowrl_megatron.models.arch import ModelArch

    return ModelArch(
        architecture="Qwen2ForCausalLM", vocab_size=VOCAB, hidden_size=64, ffn_hidden_size=128, num_layers=2,
        num_heads=2, num_kv_heads=1, head_dim=32, rms_norm_eps=1e-6, rope_theta=10000.0, qkv_bias=True,
        tie_embeddings=False, max_position_embeddings=16,
    )


def all_responses() -> torch.Tensor:
    return torch.tensor(list(itertools.product(range(VOCAB), repeat=LENGTH)))


def sequence_batch(responses: torch.Tensor, old=None, ref=None, advantages=None):
    from flowrl_megatron.training.batch import Batch

    n = responses.shape[0]
    tokens = torch.cat([torch.tensor(PROMPT).expand(n, -1), responses], dim=1)
    prompt_mask = torch.zeros_like(tokens, dtype=torch.bool)
    prompt_mask[:, : len(PROMPT)] = True
    zeros = torch.zeros(tokens.shape)
    return Batch(tokens=tokens, prompt_mask=prompt_mask, response_mask=~prompt_mask,
                 old_logprobs=zeros if old is None else old, ref_logprobs=zeros if ref is None else ref,
                 advantages=torch.zeros(n) if advantages is None else advantages)


def reference_target(rewards: torch.Tensor) -> torch.Tensor:
    """The designed reference distribution the warm-up fits: uneven mass on the modes."""
    rest = 1.0 - sum(REF_MODE_MASS)
    q = torch.full((rewards.numel(),), rest / (rewards.numel() - len(MODES)), dtype=torch.float64)
    for mass, idx in zip(REF_MODE_MASS, mode_indices(), strict=True):
        q[idx] = mass
    return q


def mode_indices() -> list[int]:
    return [sum(t * VOCAB ** (LENGTH - 1 - i) for i, t in enumerate(m)) for m in MODES]


def rewards_of(responses: torch.Tensor) -> torch.Tensor:
    modes = torch.tensor(MODES)
    return (responses[:, None, :] == modes[None]).all(-1).any(-1).double()


def kl(p: torch.Tensor, q: torch.Tensor) -> float:
    m = p > 0
    return float((p[m] * (p[m].log() - q[m].log())).sum())


class Toy:
    def __init__(self, seed: int) -> None:
        from flowrl_megatron.runtime import ParallelLayout, init_model_parallel

        torch.set_num_threads(1)  # bit-reproducible reductions, so the table in docs/ can be checked
        init_model_parallel(ParallelLayout(), seed=seed)
        self.arch = arch()
        self.responses = all_responses()
        self.rewards = rewards_of(self.responses)

    def build(self, z_head: bool):
        from flowrl_megatron.config import ZHeadConfig
        from flowrl_megatron.models.gpt import build_gpt_model
        from flowrl_megatron.training.parallel import wrap_ddp

        model = build_gpt_model(self.arch, z_head=ZHeadConfig() if z_head else None, calculate_per_token_loss=True)
        return model, wrap_ddp(model)

    def token_logprobs(self, ddp) -> torch.Tensor:
        from flowrl_megatron.training.micro_batches import MicroBatching
        from flowrl_megatron.training.step import forward_logprobs

        return forward_logprobs([ddp], sequence_batch(self.responses), batching=MicroBatching(self.responses.shape[0]),
                                vocab_size=VOCAB)

    def distribution(self, ddp) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.token_logprobs(ddp)
        return tok, tok.double().sum(-1).exp()

    def warm_up(self, steps: int, lr: float) -> dict:
        """Exact supervised warm-up: minimise KL(q || pi) over the whole response space."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from flowrl_megatron.models.gpt import causal_attention_mask
        from flowrl_megatron.training.parallel import build_optimizer
        from flowrl_megatron.training.step import token_logprobs

        model, ddp = self.build(z_head=False)
        optimizer = build_optimizer([ddp], lr=lr, weight_decay=0.0, clip_grad=0.0)
        q = reference_target(self.rewards).float()
        batch = sequence_batch(self.responses)
        tokens, n = batch.tokens, batch.tokens.shape[1]

        def step(data_iterator, m):
            ids = next(data_iterator)
            out = m(input_ids=ids, position_ids=torch.arange(n).expand_as(ids), attention_mask=causal_attention_mask(n))

            def loss(logits):
                lp, _ = token_logprobs(logits, ids, VOCAB, 1.0)
                return -(q * lp.sum(-1)).sum(), torch.tensor(1, dtype=torch.int), {}

            return out, loss

        for _ in range(steps):
            ddp.zero_grad_buffer()
            get_forward_backward_func()(forward_step_func=step, data_iterator=iter([tokens]), model=[ddp],
                                        num_microbatches=1, seq_length=n, micro_batch_size=tokens.shape[0])
            optimizer.step()
        return {k: v.detach().clone() for k, v in model.state_dict().items() if "_extra_state" not in k}

    def train(self, algorithm: str, ref_state: dict, ref_tok: torch.Tensor, steps: int, samples: int, lr: float,
              seed: int, normalization: str | None = None, z_lr_mult: float = 1.0) -> torch.Tensor:
        from flowrl_megatron.algorithms.losses import normalize_rewards
        from flowrl_megatron.config import AlgorithmConfig
        from flowrl_megatron.training.micro_batches import MicroBatching
        from flowrl_megatron.training.parallel import build_lr_scheduler, build_optimizer
        from flowrl_megatron.training.step import forward_backward

        model, ddp = self.build(z_head=algorithm == "flowrl")
        load_reference(model, ref_state, new_prefix="z_head.")
        cfg = AlgorithmConfig(name=algorithm, beta=BETA, reward_normalization=normalization)
        optimizer = build_optimizer([ddp], lr=lr, weight_decay=0.0, clip_grad=1.0, z_head_lr_mult=z_lr_mult)
        scheduler = build_lr_scheduler(optimizer, lr=lr, warmup_steps=0, total_steps=steps, weight_decay=0.0)
        critic = self.critic(ref_state, CRITIC_LR_MULT * lr, steps) if cfg.needs_critic else None
        sampler = torch.Generator().manual_seed(seed)
        groups = torch.zeros(samples, dtype=torch.long)
        batching = MicroBatching(samples)
        for _ in range(steps):
            tok, pi = self.distribution(ddp)
            idx = torch.multinomial(pi.float(), samples, replacement=True, generator=sampler)
            adv = normalize_rewards(cfg, self.rewards[idx].float(), groups)
            batch = sequence_batch(self.responses[idx], old=tok[idx], ref=ref_tok[idx], advantages=adv)
            if critic is not None:  # PPO: GAE advantages from the critic's values, then its value-loss update
                critic.set_advantages(batch, self.rewards[idx].float(), cfg, batching)
                critic.zero_grad()
                critic.forward_backward(batch, batching)
                critic.step()
            ddp.zero_grad_buffer()
            forward_backward([ddp], batch, cfg, batching=batching, vocab_size=VOCAB)
            optimizer.step()
            scheduler.step(increment=1)
        return self.distribution(ddp)[1]

    def critic(self, ref_state: dict, lr: float, steps: int):
        """PPO's value model from the reference's weights (a fresh value head), optimised like the policy."""
        from flowrl_megatron.config import CriticConfig, TrainConfig
        from flowrl_megatron.models.gpt import build_gpt_model
        from flowrl_megatron.models.value import VALUE_HEAD_PREFIX
        from flowrl_megatron.training.critic import Critic

        model = build_gpt_model(self.arch, calculate_per_token_loss=True, value_head=True)
        load_reference(model, {k: v for k, v in ref_state.items() if not k.startswith(VALUE_HEAD_PREFIX)},
                       new_prefix=VALUE_HEAD_PREFIX)
        train = TrainConfig(weight_decay=0.0, warmup_steps=0, grad_clip=1.0)
        return Critic.around(model, CriticConfig(lr=lr), train, torch.float32, total_updates=steps)


def load_reference(model: torch.nn.Module, ref_state: dict, new_prefix: str) -> None:
    """The warmed-up reference's weights into ``model``; only its tensors under ``new_prefix`` keep their init."""
    missing, unexpected = model.load_state_dict(ref_state, strict=False)
    assert not unexpected and all(k.startswith(new_prefix) or "_extra_state" in k for k in missing)


Row = dict  # {"kl": float, "modes": [float, ...], "other": float}: one policy's distribution, summarised


def summary(pi: torch.Tensor, target: torch.Tensor) -> Row:
    modes = mode_indices()
    return {"kl": kl(pi, target), "modes": [float(pi[i]) for i in modes], "other": float(1 - sum(pi[i] for i in modes))}


def run_seed(seed: int, algorithms: Sequence[str], steps: int, samples: int, lr: float,
             flowrl_normalization: str | None, z_lr_mult: float, warm_up_steps: int = 300) -> dict:
    """One seed's reference and target, and each algorithm trained from that reference in turn. Training draws
    nothing from the global generators (the sampler, the Z head and the value head have their own), so each row is
    the one a process of its own would give, with the warm-up done once."""
    toy = Toy(seed)
    ref_state = toy.warm_up(steps=warm_up_steps, lr=3e-3)
    ref_model, ref_ddp = toy.build(z_head=False)
    ref_model.load_state_dict(ref_state, strict=False)
    ref_tok, pi_ref = toy.distribution(ref_ddp)
    target = pi_ref * torch.exp(BETA * toy.rewards)
    target = target / target.sum()
    rows = {"reference": summary(pi_ref, target)}
    for algorithm in algorithms:
        norm = flowrl_normalization if algorithm == "flowrl" else None
        rows[algorithm] = summary(toy.train(algorithm, ref_state, ref_tok, steps, samples, lr, seed, norm, z_lr_mult),
                                  target)
    return {"target_modes": [float(target[i]) for i in mode_indices()], "rows": rows}


def run(seeds: list[int], algorithms: list[str], steps: int, samples: int, lr: float, jobs: int,
        flowrl_normalization: str | None = None, z_lr_mult: float = 1.0) -> dict:
    """Each seed in its own single-threaded process (its warm-up done once), ``jobs`` at a time; with more jobs
    than seeds, a seed's algorithms are shared among several processes, each warming up the same reference."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from tqdm import tqdm

    parts = max(1, min(len(algorithms), -(-jobs // len(seeds))))
    work = [(seed, algorithms[i::parts]) for seed in seeds for i in range(parts)]
    per_seed: dict[int, dict] = {seed: {"rows": {}} for seed in seeds}
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(run_seed, seed, chunk, steps, samples, lr, flowrl_normalization, z_lr_mult): seed
                   for seed, chunk in work}
        for future in tqdm(as_completed(futures), total=len(futures), desc="toy seeds", file=sys.stderr):
            done, entry = future.result(), per_seed[futures[future]]
            entry["target_modes"] = done["target_modes"]  # the same in every part of a seed
            entry["rows"].update(done["rows"])
    for entry in per_seed.values():  # rows in a fixed order: reference first, then as asked
        entry["rows"] = {name: entry["rows"][name] for name in ["reference", *algorithms]}
    return {"seeds": per_seed, "settings": {"steps": steps, "samples": samples, "lr": lr, "seeds": seeds}}


def markdown(result: dict) -> str:
    from flowrl_megatron.demo.run import ALGORITHMS

    s = result["settings"]
    lines = [
        f"Exact KL(pi || pi*) with pi* ~ pi_ref exp({BETA:g} r); {len(MODES)} rewarded responses among "
        f"{VOCAB ** LENGTH}; {s['steps']} steps x {s['samples']} samples, Adam lr {s['lr']:g}, seeds "
        f"{', '.join(map(str, s['seeds']))}.",
        "",
        "| seed | policy | KL(pi \\|\\| pi*) | " + " | ".join(f"mode {i + 1}" for i in range(len(MODES)))
        + " | unrewarded |",
        "|---|---|---|" + "---|" * len(MODES) + "---|",
    ]
    for seed, entry in result["seeds"].items():
        lines.append(f"| {seed} | target pi* | 0 | " + " | ".join(f"{m:.3f}" for m in entry["target_modes"])
                     + " | 0.000 |")
        for name, row in entry["rows"].items():
            label = "reference pi_ref" if name == "reference" else ALGORITHMS[name]
            lines.append(f"| {seed} | {label} | {row['kl']:.3f} | " + " | ".join(f"{m:.3f}" for m in row["modes"])
                         + f" | {row['other']:.3f} |")
    return "\n".join(lines)


def modes_kept(row: Row, target: list[float]) -> int:
    """How many modes hold at least half their target mass."""
    return sum(got >= 0.5 * want for got, want in zip(row["modes"], target, strict=True))


def matches(row: Row, target: list[float]) -> bool:
    return modes_kept(row, target) == len(MODES) and row["other"] <= 0.05


def check(result: dict) -> list[str]:
    """What held on two CPU models over seeds 0-2 (the module's docstring): one sentence per failed claim."""
    failures, matched, kls = [], 0, {"flowrl": [], "grpo": []}
    for seed, entry in result["seeds"].items():
        target, flowrl, grpo = entry["target_modes"], entry["rows"]["flowrl"], entry["rows"]["grpo"]
        kept = [modes_kept(row, target) for row in (flowrl, grpo)]
        if kept[1] > len(MODES) - 2:
            failures.append(f"seed {seed}: GRPO kept {kept[1]} of {len(MODES)} modes at half their target mass")
        if kept[0] < len(MODES) - 1:
            failures.append(f"seed {seed}: FlowRL kept only {kept[0]} of {len(MODES)} modes at half their target mass")
        if flowrl["kl"] >= grpo["kl"]:
            failures.append(f"seed {seed}: FlowRL's KL {flowrl['kl']:.3f} is not below GRPO's {grpo['kl']:.3f}")
        matched += matches(flowrl, target)
        kls["flowrl"].append(flowrl["kl"])
        kls["grpo"].append(grpo["kl"])
    n = len(result["seeds"])
    if 2 * matched <= n:
        failures.append(f"FlowRL matched the target in {matched} of {n} seeds, not a majority")
    mean = {name: sum(v) / n for name, v in kls.items()}
    if mean["flowrl"] > 0.5 * mean["grpo"]:
        failures.append(f"FlowRL's mean KL {mean['flowrl']:.3f} is more than half GRPO's {mean['grpo']:.3f}")
    return failures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (task reference and sampling)")
    p.add_argument("--algorithms", default="flowrl,grpo", help="comma-separated: flowrl, grpo, gspo, ppo, "
                   "reinforce_pp")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--samples", type=int, default=32, help="responses sampled per step (one group)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--jobs", type=int, default=2, help="processes at once, single-threaded, one or more per "
                   "seed (its warm-up done in each)")
    p.add_argument("--flowrl-normalization", choices=["group", "batch", "none"], default=None)
    p.add_argument("--z-lr-mult", type=float, default=1.0, help="FlowRL's Z head learning-rate multiplier")
    p.add_argument("--markdown", type=Path, help="also write the table to this file")
    p.add_argument("--check", action="store_true", help="exit 1 unless the claims listed above hold (needs flowrl "
                   "and grpo among --algorithms)")
    args = p.parse_args()
    from flowrl_megatron.demo.run import parse_algorithms
    from flowrl_megatron.errors import UserError

    seeds = [int(s) for s in args.seeds.split(",")]
    try:  # --check compares FlowRL with GRPO
        algorithms = list(parse_algorithms(args.algorithms, CHECKED if args.check else ()))
    except UserError as e:
        p.error(str(e))
    result = run(seeds, algorithms, args.steps, args.samples, args.lr, args.jobs, args.flowrl_normalization,
                 args.z_lr_mult)
    table = markdown(result)
    print(table)
    if args.markdown:
        from flowrl_megatron.files import write_text_atomic

        about = __doc__.split("\n    python ")[0].strip()
        header = ("# Toy distribution matching\n\nGenerated by `python bench/toy_distribution_matching.py "
                  "--algorithms flowrl,grpo,gspo,ppo --markdown docs/toy_distribution_matching.md`; `tests/algorithms/"
                  "test_toy_distribution_matching.py` runs `--check` and checks that the computed rows (target, "
                  "reference) reproduce the table.\n\n")
        write_text_atomic(args.markdown, header + about + "\n\n" + table + "\n")
    failures = check(result) if set(CHECKED) <= set(algorithms) else []
    for f in failures:
        print("FAIL:", f, file=sys.stderr)
    if args.check and failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
