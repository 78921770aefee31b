"""Recipes and overrides (bad ones, each one sentence, are tabled in tests/test_cli.py)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from flowrl_megatron.config import load_config, parse_override, to_dict
from flowrl_megatron.errors import UserError
from tests.distributed import REPO


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


def test_a_recipe_with_a_base_sets_only_what_differs(recipe, tmp_path):
    child = tmp_path / "sub" / "child.yaml"
    child.parent.mkdir()
    child.write_text("base: ../recipe.yaml\nrollout: {n: 6}\nalgorithm: {name: grpo}\n")
    cfg, base = load_config(child, ["train.lr=2e-6"]), load_config(recipe)
    assert (cfg.rollout.n, cfg.rollout.max_response_tokens, cfg.algorithm.name, cfg.train.lr) == (6, 16, "grpo", 2e-6)
    assert cfg.model.path == base.model.path and cfg.train == dataclasses.replace(base.train, lr=2e-6)
    loop = tmp_path / "loop.yaml"
    loop.write_text("base: loop2.yaml\n")
    (tmp_path / "loop2.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(UserError, match="is its own base"):
        load_config(loop)
    (tmp_path / "bad.yaml").write_text("base: [a.yaml]\n")
    with pytest.raises(UserError, match="must be the path of another recipe"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "gone.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(UserError, match=r"nowhere\.yaml does not exist"):
        load_config(tmp_path / "gone.yaml")


def test_the_7b_grpo_baseline_differs_from_the_flowrl_recipe_only_in_its_objective():
    grpo, flowrl = (to_dict(load_config(REPO / "recipes" / r, check=False))
                    for r in ("qwen2.5_7b_math_grpo.yaml", "qwen2.5_7b_math.yaml"))
    a = grpo.pop("algorithm")
    assert (a["name"], a["clip_eps"], a["kl_coef"]) == ("grpo", 0.2, 0.001)
    assert grpo.pop("run_dir") != flowrl.pop("run_dir")
    flowrl.pop("algorithm")
    assert grpo == flowrl


def test_the_7b_ppo_baseline_adds_a_critic_and_recompute_to_the_flowrl_recipe():
    ppo, flowrl = (to_dict(load_config(REPO / "recipes" / r, check=False))
                   for r in ("qwen2.5_7b_math_ppo.yaml", "qwen2.5_7b_math.yaml"))
    a = ppo.pop("algorithm")
    assert (a["name"], a["clip_eps"], a["gamma"], a["lam"], a["whiten_advantages"], a["kl_coef"]) == (
        "ppo", 0.2, 1.0, 1.0, True, 0.0)
    assert ppo.pop("critic") == {"lr": 1e-5, "value_clip": 0.5}
    assert ppo["train"].pop("recompute") == "full" and flowrl["train"].pop("recompute") == "none"
    assert ppo.pop("run_dir") != flowrl.pop("run_dir")
    for d in (flowrl, ppo):
        d.pop("algorithm", None)
        d.pop("critic", None)
    assert ppo == flowrl


def test_override_values_are_yaml():
    assert parse_override("a.b=1e-6") == {"a": {"b": 1e-6}}
    assert parse_override("x=[1, 2]") == {"x": [1, 2]}
    assert parse_override("flag=true") == {"flag": True}


# FLOWRL.md's table of the paper's runs: prompts per step, rollout TP, temperature, reward, template.
PAPER_COLUMNS = {
    "qwen2.5_7b_math.yaml": (512, 1, 1.0, "math", "dapo"),
    "qwen3_8b_math.yaml": (512, 1, 1.0, "math", "dapo"),  # the paper has no Qwen3 run: its math 7B column
    "deepseek_r1_distill_qwen_7b_code.yaml": (64, 2, 0.6, "code", "chat"),
}


@pytest.mark.parametrize("recipe", list(PAPER_COLUMNS))
def test_the_7b_and_8b_recipes_have_the_papers_hyperparameters(recipe):
    cfg = load_config(REPO / "recipes" / recipe, check=False)
    t, r, a = cfg.train, cfg.rollout, cfg.algorithm
    assert (t.prompts_per_step, r.engine_tp, r.temperature, cfg.reward.name, cfg.data.template) == PAPER_COLUMNS[recipe]
    assert (r.n, t.mini_batch_prompts, t.epochs) == (8, 32, 1)
    assert (t.lr, t.weight_decay, t.warmup_steps, t.grad_clip) == (1e-6, 0.1, 10, 1.0)
    assert (cfg.data.max_prompt_tokens, r.max_response_tokens, r.top_p) == (2048, 8192, 1.0)
    assert (a.name, a.beta, a.importance_weight, a.clip_eps) == ("flowrl", 15.0, "clip", 0.2)
    assert r.max_staleness == 0  # the paper's runs are synchronous
    assert cfg.world_size == 8 and r.engines * r.engine_tp == 8  # the paper's 8 GPUs each for training and rollout


def test_the_tiny_recipe_validates_after_make_tiny(tmp_path, monkeypatch):
    from flowrl_megatron.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["make-tiny", "runs/tiny"])
    assert e.value.code == 0
    cfg = load_config(REPO / "recipes" / "tiny_cpu.yaml")
    assert cfg.reward.name == "answer_set" and cfg.world_size == 1
