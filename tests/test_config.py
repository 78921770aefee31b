"""Recipes, overrides and validation: every inconsistency is one clear sentence before anything is built."""

from __future__ import annotations

import json

import pytest

from flowrl_megatron.config import load_config, parse_override
from flowrl_megatron.errors import UserError


@pytest.fixture()
def recipe(tiny_untied, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    path = tmp_path / "recipe.yaml"
    path.write_text(f"""
model: {{path: {tiny_untied}}}
data: {{train_files: [{data}], template: raw, max_prompt_tokens: 32}}
rollout: {{n: 4, max_response_tokens: 16}}
train: {{prompts_per_step: 8, mini_batch_prompts: 4, micro_batch_size: 4}}
""")
    return path


def test_recipe_and_overrides(recipe):
    cfg = load_config(recipe, ["train.lr=1e-6", "algorithm.name=grpo", "z_head.variant=authors", "dp=2",
                               "rollout.temperature=0.6"])
    assert cfg.train.lr == 1e-6 and isinstance(cfg.train.lr, float)
    assert cfg.algorithm.name == "grpo" and cfg.z_head.variant == "authors" and cfg.dp == 2
    assert cfg.rollout.n == 4 and cfg.rollout.temperature == 0.6 and cfg.train.prompts_per_step == 8
    assert cfg.algorithm.beta == 15.0  # untouched defaults stay the paper's


def test_override_values_are_yaml():
    assert parse_override("a.b=1e-6") == {"a": {"b": 1e-6}}
    assert parse_override("x=[1, 2]") == {"x": [1, 2]}
    assert parse_override("flag=true") == {"flag": True}


@pytest.mark.parametrize(("override", "message"), [
    ("train.lrr=1", "unknown setting train.lrr (did you mean train.lr?)"),
    ("trian.lr=1", "unknown setting trian (did you mean train?)"),
    ("train.steps=ten", "train.steps must be int, got 'ten'"),
    ("algorithm.name=ppo", "algorithm.name must be one of ['flowrl', 'grpo', 'reinforce_pp']"),
    ("train.mini_batch_prompts=3", "train.prompts_per_step=8 is not a multiple of train.mini_batch_prompts=3"),
    ("train.micro_batch_size=3", "does not split into dp=1 ranks x micro_batch_size=3"),
    ("train.max_tokens_per_micro_batch=20", "train.max_tokens_per_micro_batch=20 is below the longest sample"),
    ("model.tp=3", "TP=3 does not divide the 4 attention heads"),
    ("model.pp=3", "PP=3 does not divide the 4 layers"),
    ("rollout.n=1", "group-normalised rewards need at least 2 responses per prompt"),
    ("reward.name=nope", "reward.name 'nope' is unknown"),
    ("rollout.max_response_tokens=1000", "exceeds the model's max_position_embeddings (512)"),
    ("data.train_files=[/no/such.jsonl]", "data file /no/such.jsonl does not exist"),
    ("model.path=/nowhere", "model.path /nowhere has no config.json"),
    ("train", "override 'train' is not key=value"),
    ("train=3", "train is a section; set its keys"),
    ("eval.every=5", "eval.every is set but eval.files is empty"),
    ("train.distributed_optimizer=true", "train.distributed_optimizer=true is not supported yet"),
    ("rollout.max_staleness=-1", "rollout.max_staleness must be >= 0 (0: synchronous), got -1"),
    ("rollout.weight_update=abort", "rollout.weight_update must be one of ['keep', 'drain']"),
    ("eval.files=[/no/eval.jsonl]", "eval file /no/eval.jsonl does not exist"),
])
def test_bad_settings_are_one_sentence(recipe, override, message):
    with pytest.raises(UserError, match=None) as e:
        load_config(recipe, [override])
    assert message in str(e.value)


def test_a_sequence_mask_band_outside_0_1_is_refused(recipe):
    with pytest.raises(UserError, match=r"algorithm.mask_eps must be in \(0, 1\), got 1.5"):
        load_config(recipe, ["algorithm.importance_weight=mask", "algorithm.mask_eps=1.5"])


def test_cli_rejects_a_bad_recipe_with_exit_2(recipe, tmp_path):
    import subprocess
    import sys

    from tests.distributed import REPO

    r = subprocess.run([sys.executable, "-m", "flowrl_megatron", "train", str(recipe), "train.lr=oops"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == "error: train.lr must be float, got 'oops'."


def test_the_7b_recipe_has_the_papers_hyperparameters():
    from tests.distributed import REPO

    cfg = load_config(REPO / "recipes" / "qwen2.5_7b_math.yaml", check=False)
    t, r, a = cfg.train, cfg.rollout, cfg.algorithm
    assert (t.prompts_per_step, r.n, t.mini_batch_prompts, t.epochs) == (512, 8, 32, 1)
    assert (t.lr, t.weight_decay, t.warmup_steps, t.grad_clip) == (1e-6, 0.1, 10, 1.0)
    assert (cfg.data.max_prompt_tokens, r.max_response_tokens, r.temperature, r.top_p) == (2048, 8192, 1.0, 1.0)
    assert (a.name, a.beta, a.importance_weight, a.clip_eps, cfg.data.template) == ("flowrl", 15.0, "clip", 0.2, "dapo")
    assert r.max_staleness == 0  # the paper's runs are synchronous


def test_the_tiny_recipe_validates_after_make_tiny(tmp_path, monkeypatch):
    from flowrl_megatron.cli import main
    from tests.distributed import REPO

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["make-tiny", "runs/tiny"])
    assert e.value.code == 0
    cfg = load_config(REPO / "recipes" / "tiny_cpu.yaml")
    assert cfg.reward.name == "answer_set" and cfg.world_size == 1
