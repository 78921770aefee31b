"""``flowrl eval``: a model (Hugging Face directory, or a Megatron checkpoint converted on the fly) served by vLLM
on benchmarks, with the paper's protocol by default (FLOWRL.md: 16 samples per problem, temperature 0.6, top_p
0.95, DAPO prompt format, graded with math-verify).

Writes OUT/results.json and OUT/results.md (per benchmark: avg@n, unbiased pass@k for k = 1, 2, 4, ... n, mean
response length, distinct final answers, distinct correct answers, distinct n-gram ratio, mean pairwise
similarity), OUT/pass_at_k.png, and every sample with its answer and grade in OUT/samples/BENCHMARK.jsonl.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from flowrl_megatron.errors import UserError
from flowrl_megatron.files import make_dir, write_text_atomic


@dataclass(frozen=True)
class EvalSettings:
    n: int = 16
    temperature: float = 0.6
    top_p: float = 0.95
    max_response_tokens: int = 8192
    template: str = "dapo"
    reward: str = "math"
    limit: int = 0  # first problems of each benchmark; 0 = all
    seed: int = 0
    reward_workers: int = 2
    reward_timeout_s: float = 10.0


def hf_model(model: Path, out: Path) -> Path:
    """``model`` itself if it is a Hugging Face directory; a Megatron checkpoint is converted into OUT/hf_model."""
    if (model / "config.json").is_file():
        return model
    if (model / "metadata.json").is_file():  # a torch_dist checkpoint (conversion output or training checkpoint)
        from flowrl_megatron.conversion.convert import megatron_to_hf

        target = out / "hf_model"
        if not (target / "config.json").is_file():
            print(f"converting {model} to {target}", flush=True)
            megatron_to_hf(model, target)
        return target
    raise UserError(f"{model} is neither a Hugging Face model directory (config.json) nor a Megatron checkpoint "
                    "(metadata.json).")


def evaluate_benchmark(name: str, problems: list, prompts: list[list[int]], client, tokenizer, pool,
                       settings: EvalSettings) -> tuple[dict, list]:
    """Metrics of one benchmark (``prompts``: its problems rendered to token ids) and its samples."""
    from flowrl_megatron.evaluation.metrics import group_metrics, text_diversity
    from flowrl_megatron.evaluation.sampling import sample_and_grade
    from flowrl_megatron.rollout.client import SamplingConfig

    n = settings.n
    sampling = SamplingConfig(n=n, max_tokens=settings.max_response_tokens, temperature=settings.temperature,
                              top_p=settings.top_p)
    seeds = [settings.seed * 1_000_003 + i for i in range(len(prompts))]
    graded = sample_and_grade(client, tokenizer, pool, settings.reward, prompts, [p.answer for p in problems],
                              sampling, seeds)
    texts, answers, correct, scores = graded.texts, graded.answers, graded.correct, graded.scores
    metrics = group_metrics(answers, correct)
    metrics = {f"avg@{n}": metrics["pass@1"], **metrics, **text_diversity(texts)}
    metrics["response_tokens"] = sum(len(s.token_ids) for g in graded.groups for s in g) / (n * len(problems))
    metrics.update(problems=len(problems), reward_timeouts=scores.timeouts, reward_errors=scores.errors)
    if scores.mean_fraction is not None:
        metrics["test_pass_fraction"] = scores.mean_fraction
    samples = [{"benchmark": name, "problem": i, "sample": j, "response": t, "answer": a, "correct": c}
               for i, (tg, ag, cg) in enumerate(zip(texts, answers, correct, strict=True))
               for j, (t, a, c) in enumerate(zip(tg, ag, cg, strict=True))]
    return metrics, samples


def markdown(results: dict[str, dict], n: int) -> str:
    ks = [k for k in next(iter(results.values())) if k.startswith("pass@")]
    head = ["benchmark", f"avg@{n}", *ks, "tokens", "distinct answers", "distinct correct", "distinct 4-grams",
            "pairwise sim."]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in results.items():
        cells = [name, f"{100 * m[f'avg@{n}']:.2f}", *(f"{100 * m[k]:.2f}" for k in ks), f"{m['response_tokens']:.0f}",
                 f"{m['distinct']:.2f}", f"{m['distinct_correct']:.2f}", f"{m['distinct_ngrams']:.3f}",
                 f"{m['pairwise_similarity']:.3f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot_pass_at_k(results: dict[str, dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, m in results.items():
        ks = sorted(int(k.removeprefix("pass@")) for k in m if k.startswith("pass@"))
        ax.plot(ks, [100 * m[f"pass@{k}"] for k in ks], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_eval(model: Path, benchmarks: list[str], data_dir: Path, out: Path, settings: EvalSettings) -> dict[str, dict]:
    from transformers import AutoTokenizer

    from flowrl_megatron.conversion.hf_io import HFReader
    from flowrl_megatron.data.prompts import render
    from flowrl_megatron.evaluation.benchmarks import load_benchmark, resolve
    from flowrl_megatron.models.arch import load_arch
    from flowrl_megatron.rewards import REWARDS
    from flowrl_megatron.rewards.pool import RewardPool
    from flowrl_megatron.rollout.client import RolloutClient
    from flowrl_megatron.rollout.engines import EngineConfig, EngineGroup

    if settings.reward not in REWARDS:
        raise UserError(f"--reward {settings.reward!r} is unknown; use one of {', '.join(sorted(REWARDS))}.")
    suites = {Path(b).stem: load_benchmark(resolve(b, data_dir), settings.limit) for b in benchmarks}
    make_dir(out, "--out")
    served = hf_model(model, out)
    HFReader(served)  # the weights' headers, before an engine starts on them
    tokenizer = AutoTokenizer.from_pretrained(served)
    prompts = {name: [render(p.problem, settings.template, tokenizer) for p in ps] for name, ps in suites.items()}
    longest = max(len(ids) for ps in prompts.values() for ids in ps)
    limit = load_arch(served).max_position_embeddings
    if longest + settings.max_response_tokens > limit:
        raise UserError(f"the longest prompt ({longest} tokens) plus --max-response-tokens "
                        f"({settings.max_response_tokens}) exceeds the model's {limit} positions; lower "
                        "--max-response-tokens.")
    engine = EngineConfig(model=str(served), max_model_len=longest + settings.max_response_tokens)
    results, samples = {}, {}
    pool = RewardPool(settings.reward, settings.reward_workers, settings.reward_timeout_s)
    try:
        with EngineGroup(engine, 1, out / "engine_logs") as engines:
            client = RolloutClient(engines.urls, engines.api_key)
            for name, problems in suites.items():
                results[name], samples[name] = evaluate_benchmark(name, problems, prompts[name], client, tokenizer,
                                                                  pool, settings)
                print(f"{name}: avg@{settings.n} {100 * results[name][f'avg@{settings.n}']:.2f}", flush=True)
    finally:
        pool.close()
    (out / "samples").mkdir(exist_ok=True)
    for name, rows in samples.items():
        write_text_atomic(out / "samples" / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    report = {"model": str(model), "settings": asdict(settings), "results": results}
    write_text_atomic(out / "results.json", json.dumps(report, indent=1))
    table = markdown(results, settings.n)
    write_text_atomic(out / "results.md", f"# {model}\n\n{json.dumps(asdict(settings))}\n\n{table}\n")
    plot_pass_at_k(results, out / "pass_at_k.png")
    print(table, flush=True)
    return results
