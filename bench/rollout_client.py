"""Rollout client throughput against vLLM's own offline ``LLM.generate``, measured in one run.

The same token-id prompts, sampling settings and engine settings (dtype, max model length,
eager mode, KV cache) go once through our path (an OpenAI-compatible vLLM server driven by
``RolloutClient``: HTTP, JSON, retries, balancing) and once through ``LLM.generate`` in this
process. Each side warms up once, then runs ``--repeats`` times; medians are compared (one vLLM alive at a time).
Target: client overhead <= 10% (ratio of generated tokens/s >= 0.90).

    python bench/rollout_client.py [--prompts 64] [--n 4] [--max-tokens 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def prompts_of(count: int, vocab: int) -> list[list[int]]:
    import random

    rng = random.Random(0)
    return [[rng.randrange(5, vocab) for _ in range(rng.randrange(8, 32))] for _ in range(count)]


def client_run(client, prompts, sampling) -> float:
    start = time.perf_counter()
    groups = client.generate(prompts, sampling, seeds=list(range(len(prompts))))
    return sum(len(s.token_ids) for g in groups for s in g) / (time.perf_counter() - start)


def offline_run(llm, prompts, sampling) -> float:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = [SamplingParams(n=sampling.n, max_tokens=sampling.max_tokens, temperature=sampling.temperature,
                             top_p=sampling.top_p, seed=i, logprobs=0) for i in range(len(prompts))]
    start = time.perf_counter()
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return sum(len(c.token_ids) for o in outputs for c in o.outputs) / (time.perf_counter() - start)


def offline_llm(cfg):
    from vllm import LLM

    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.kv_cache_gib)
    return LLM(model=cfg.model, dtype=cfg.dtype, max_model_len=cfg.max_model_len, enforce_eager=True,
               logprobs_mode="processed_logprobs", enable_chunked_prefill=False,  # as Engine.command() on CPU
               max_num_batched_tokens=max(cfg.max_model_len, 4096))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    from flowrl_megatron.models.tiny import make_tiny_model
    from flowrl_megatron.rollout.client import RolloutClient, SamplingConfig
    from flowrl_megatron.rollout.engines import EngineConfig, EngineGroup

    sampling = SamplingConfig(n=args.n, max_tokens=args.max_tokens)
    with tempfile.TemporaryDirectory(prefix="flowrl-bench-client-") as tmp:
        model_dir = Path(tmp, "model")
        make_tiny_model(model_dir)
        prompts = prompts_of(args.prompts, 1000)
        cfg = EngineConfig(model=str(model_dir), max_model_len=256)
        # One vLLM at a time: two on 2 cores disturb each other more than anything measured here.
        with EngineGroup(cfg, 1, Path(tmp, "logs")) as group:
            client = RolloutClient([e.url for e in group.engines], group.api_key)
            ours = [client_run(client, prompts, sampling) for _ in range(args.repeats + 1)][1:]
        llm = offline_llm(cfg)
        offline = [offline_run(llm, prompts, sampling) for _ in range(args.repeats + 1)][1:]
    ours, offline = statistics.median(ours), statistics.median(offline)
    ratio = ours / offline
    print(f"{args.prompts} prompts x n={args.n} x {args.max_tokens} tokens, median of {args.repeats}")
    print(f"server + RolloutClient {ours:.0f} tokens/s   offline LLM.generate {offline:.0f} tokens/s")
    print(f"ratio {ratio:.3f}  -> client overhead {max(0.0, 1 - ratio):.1%}  (target <= 10%)")


if __name__ == "__main__":
    main()
