"""Bad input, as a new user would give it: one sentence on stderr, a non-zero exit, no traceback, nothing started.

Every case runs the real command in this process (``flowrl_megatron.cli.main``, the converters' ``main``), so the
whole table takes seconds: a check that let a case through to torchrun or an engine would show as a slow test and a
wrong exit code (train cases pass ``--prepare``: a missed check exits 0 having written config.yaml).
"""

from __future__ import annotations

import functools
import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flowrl_megatron.cli import main
from flowrl_megatron.errors import run_cli
from tests.distributed import REPO

REWARD_MODULES = {
    "reward_syntax_error": "def reward(response, answer):\n    return 1.0 if response == answer else 0.0 +\n",
    "reward_missing_dependency": "import no_such_dependency_xyz\n\ndef reward(response, answer):\n    return 0.0\n",
    "reward_raises_on_import": "raise RuntimeError('set MY_REWARD_TABLE first')\n",
    "reward_shapes": ("def one_argument(response):\n    return 0.0\n\n"
                      "def returns_text(response, answer):\n    return 'correct'\n\n"
                      "def crashes(response, answer):\n    return response[0] == answer\n\n"
                      "def good(response, answer):\n    return float(response.strip() == answer)\n"),
}


@pytest.fixture(scope="module")
def ws(tiny_untied, tmp_path_factory) -> dict[str, Path]:
    """A workspace of good and bad inputs: a valid recipe, and broken data, weights and reward modules."""
    root = tmp_path_factory.mktemp("bad_inputs")
    good = root / "train.jsonl"
    good.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    files = {
        "no_answer.jsonl": json.dumps({"prompt": "1+1=", "solution": "2"}) + "\n",
        "empty.jsonl": "",
        "prompt_number.jsonl": json.dumps({"prompt": 7, "answer": "2"}) + "\n",
        "messages.jsonl": json.dumps({"prompt": [{"role": "user", "content": "1+1="}], "answer": "2"}) + "\n",
        "not_data.jsonl": "\x00\x01 this is not json {{{\n",
        "not_data.parquet": "PAR1 not really parquet",
        "table.csv": "prompt,answer\n1+1=,2\n",
    }
    for name, text in files.items():
        (root / name).write_text(text)
    for name, text in REWARD_MODULES.items():
        (root / f"{name}.py").write_text(text)
    weights = (Path(tiny_untied) / "model.safetensors").read_bytes()
    for name, data in (("truncated", weights[: len(weights) // 2]), ("garbage", b"not a safetensors file" * 8)):
        shutil.copytree(tiny_untied, root / f"model_{name}")
        (root / f"model_{name}" / "model.safetensors").write_bytes(data)
    (root / "a_file").write_text("")
    recipe = root / "recipe.yaml"
    recipe.write_text(f"""
run_dir: {root / "run"}
model: {{path: {tiny_untied}}}
data: {{train_files: [{good}], template: raw, max_prompt_tokens: 32}}
rollout: {{n: 4, max_response_tokens: 16}}
train: {{prompts_per_step: 8, mini_batch_prompts: 4, micro_batch_size: 4}}
""")
    (root / "bad.yaml").write_text("model: {path: [unclosed\n")
    (root / "list.yaml").write_text("- model\n- train\n")
    (root / "bench.jsonl").write_text(json.dumps({"problem": "1+1=", "answer": "2"}) + "\n")
    return {"root": root, "recipe": recipe, "model": Path(tiny_untied)}


T = "train {recipe} --prepare"  # every train case; a missed check exits 0 having written config.yaml
CASES = [
    # settings: names, types, sets
    ('{T} train.lrr=1', 'unknown setting train.lrr (did you mean train.lr?)'),
    ('{T} trian.lr=1', 'unknown setting trian (did you mean train?)'),
    ('{T} train.steps=ten', "train.steps must be int, got 'ten'"),
    ('{T} train.lr=oops', "train.lr must be float, got 'oops'"),
    ('{T} algorithm.name=dpo', "algorithm.name must be one of ['flowrl', 'grpo', 'reinforce_pp', 'gspo', 'ppo']"),
    ('{T} rollout.weight_update=abort', "rollout.weight_update must be one of ['keep', 'drain']"),
    ('{T} train', "override 'train' is not key=value"),
    ('{T} train=3', 'train is a section; set its keys, e.g. train.steps=...'),
    ('{T} model=3', 'model is a section; set its keys, e.g. model.path=...'),
    # settings: each one's declared range
    ('{T} train.lr=-1', 'train.lr must be > 0, got -1.0'),
    ('{T} algorithm.beta=-1', 'algorithm.beta must be > 0, got -1.0'),
    ('{T} algorithm.clip_eps=-0.2', 'algorithm.clip_eps must be in (0, 1), got -0.2'),
    ('{T} algorithm.mask_eps=1.5', 'algorithm.mask_eps must be in (0, 1), got 1.5'),
    ('{T} train.warmup_steps=-1', 'train.warmup_steps must be >= 0, got -1'),
    ('{T} train.grad_clip=-1', 'train.grad_clip must be >= 0, got -1.0'),
    ('{T} checkpoint.every=-1', 'checkpoint.every must be >= 0, got -1'),
    ('{T} reward.timeout_s=0', 'reward.timeout_s must be > 0, got 0.0'),
    ('{T} rollout.bucket_mib=0', 'rollout.bucket_mib must be >= 1, got 0'),
    ('{T} data.max_prompt_tokens=0', 'data.max_prompt_tokens must be >= 1, got 0'),
    ('{T} z_head.dropout=2.0', 'z_head.dropout must be in [0, 1), got 2.0'),
    ('{T} train.mini_batch_prompts=0', 'train.mini_batch_prompts must be >= 1, got 0'),
    ('{T} train.prompts_per_step=0', 'train.prompts_per_step must be >= 1, got 0'),
    ('{T} rollout.max_concurrency=0', 'rollout.max_concurrency must be >= 1, got 0'),
    ('{T} rollout.max_staleness=-1', 'rollout.max_staleness must be >= 0, got -1'),
    ('{T} rollout.temperature=0', 'rollout.temperature must be in (0, 10], got 0.0'),
    ('{T} data.prompt_key=', 'data.prompt_key must not be empty'),
    # settings that contradict each other or the model
    ('{T} train.mini_batch_prompts=3', 'train.prompts_per_step=8 is not a multiple of train.mini_batch_prompts=3'),
    ('{T} train.micro_batch_size=3', 'does not split into dp=1 ranks x micro_batch_size=3'),
    ('{T} train.max_tokens_per_micro_batch=20', 'train.max_tokens_per_micro_batch=20 is below the longest'),
    ('{T} model.tp=3', 'TP=3 does not divide the 4 attention heads'),
    ('{T} model.pp=3', 'PP=3 does not divide the 4 layers'),
    ('{T} rollout.n=1', 'group-normalised rewards need at least 2 responses per prompt'),
    ('{T} algorithm.kl_coef=0.01',
     'algorithm.kl_coef is a per-token penalty of grpo, reinforce_pp and ppo, not of flowrl'),
    ('{T} reward.overlong_buffer=64 rollout.max_response_tokens=64', 'reward.overlong_buffer=64 must be below'),
    ('{T} rollout.max_response_tokens=1000', "exceeds the model's max_position_embeddings (512)"),
    ('{T} eval.every=5', 'eval.every is set but eval.files is empty'),
    ('{T} train.distributed_optimizer=true', 'train.distributed_optimizer=true is not supported yet'),
    ('{T} logging.backends=[jsonl,comet]', "logging.backends[1] must be one of ['jsonl', 'tensorboard', 'wandb'"),
    ('{T} logging.backends=[tensorboard]', "logging.backends=['tensorboard'] must list jsonl"),
    ('{T} logging.backends=[jsonl,mlflow] logging.mlflow_tracking_uri=nosuch://host',
     "logging.mlflow_tracking_uri 'nosuch://host' does not answer"),
    # recipes
    ('train {root}/nope.yaml --prepare', 'nope.yaml does not exist'),
    ('train {root}/bad.yaml --prepare', 'is not valid YAML'),
    ('train {root}/list.yaml --prepare', 'must be a mapping of sections'),
    # data files
    ('{T} data.train_files=[/no/such.jsonl]', 'data file /no/such.jsonl does not exist'),
    ('{T} eval.files=[/no/eval.jsonl]', 'eval file /no/eval.jsonl does not exist'),
    ('{T} data.train_files=[{root}/no_answer.jsonl]', "no_answer.jsonl row 0: field 'answer' is missing"),
    ('{T} data.train_files=[{root}/empty.jsonl]', 'empty.jsonl has no rows'),
    ('{T} data.train_files=[{root}/prompt_number.jsonl]', "row 0: field 'prompt' is missing or not text (got 7)"),
    ('{T} data.train_files=[{root}/messages.jsonl]', 'data.template=raw needs a text prompt'),
    ('{T} data.train_files=[{root}/not_data.jsonl]', 'not_data.jsonl could not be read as a dataset'),
    ('{T} data.train_files=[{root}/not_data.parquet]', 'not_data.parquet could not be read as a dataset'),
    ('{T} data.train_files=[{root}/table.csv]', "unsupported data file type '.csv'"),
    ('{T} eval.every=1 eval.files=[{root}/no_answer.jsonl]', "no_answer.jsonl row 0: field 'answer'"),
    # model files
    ('{T} model.path=/nowhere', 'model.path /nowhere has no config.json'),
    ('{T} model.path={root}/model_truncated', 'model.safetensors is not a readable safetensors file'),
    ('{T} model.path={root}/model_garbage', 'model.safetensors is not a readable safetensors file'),
    # the run directory
    ('{T} run_dir={root}/a_file/run', 'run_dir {root}/a_file/run cannot be used: Not a directory'),
    ('{T} run_dir=/sys/flowrl_run', 'run_dir /sys/flowrl_run cannot be used: Operation not permitted'),
    # custom rewards
    ('{T} reward.name=nope', "reward.name 'nope' is unknown; use one of answer_set, code, math"),
    ('{T} reward.name=reward_syntax_error:reward', 'reward_syntax_error.py:2 has a syntax error'),
    ('{T} reward.name=reward_missing_dependency:reward', "no module named 'no_such_dependency_xyz'; install"),
    ('{T} reward.name=reward_raises_on_import:reward', 'raised RuntimeError: set MY_REWARD_TABLE first'),
    ('{T} reward.name=no_such_reward_module:reward', "no module named 'no_such_reward_module'"),
    ('{T} reward.name=reward_shapes:absent', "module reward_shapes has no 'absent'"),
    ('{T} reward.name=math:pi', "reward.name 'math:pi' is a float, not a function"),
    ('{T} reward.name=reward_shapes:one_argument', 'cannot be called as function(response, answer)'),
    ('{T} reward.name=reward_shapes:returns_text', "returned 'correct' for an empty response"),
    ('{T} reward.name=reward_shapes:crashes', 'raised IndexError: string index out of range'),
    # flowrl eval
    ('eval --model {model} --n 0', 'argument --n: must be >= 1, got 0'),
    ('eval --model {model} --top-p 1.5', 'argument --top-p: must be in (0, 1], got 1.5'),
    ('eval --model {model} --reward nope', "argument --reward: invalid choice: 'nope'"),
    ('eval --model {model} --benchmarks nope', "benchmark 'nope' is neither a file nor"),
    ('eval --model {model} --benchmarks {root}/empty.jsonl', "empty.jsonl has no rows"),
    ('eval --model {model} --benchmarks {root}/not_data.jsonl', "not_data.jsonl could not be read as a dataset"),
    ('eval --model {model} --benchmarks {root}/no_answer.jsonl', "no_answer.jsonl row 0 has no 'problem' field"),
    ('eval --model {root}/model_garbage --benchmarks {root}/bench.jsonl --out {root}/eval',
     'model.safetensors is not a readable safetensors file'),
    ('eval --model {model} --benchmarks {root}/bench.jsonl --out {root}/a_file/eval',
     '--out {root}/a_file/eval cannot be used: Not a directory'),
    # flowrl plan, flowrl demo
    ('plan {recipe} --model-config {root}', 'has no config.json; pass --model-config'),
    ('plan {recipe} --gpu-gib 0', 'argument --gpu-gib: must be > 0, got 0'),
    ('demo --steps 0', 'argument --steps: must be >= 1, got 0'),
    ('demo --algorithms grpo,ppo', "--algorithms takes flowrl and the baselines to compare it with, each once, from "
                                   "flowrl, grpo, reinforce_pp, gspo, ppo; got 'grpo,ppo'"),
    ('demo --algorithms flowrl,dapo', "from flowrl, grpo, reinforce_pp, gspo, ppo; got 'flowrl,dapo'"),
    # the converters
    ('hf_to_megatron --input {root}/model_truncated --output {root}/ckpt',
     'model.safetensors is not a readable safetensors file'),
    ('hf_to_megatron --input {model} --output {root}/ckpt --tp 3', 'TP=3 does not divide'),
    ('megatron_to_hf --input {root} --output {root}/hf',
     'metadata.json not found; --input must be a Megatron distributed checkpoint'),
]


def run_command(argv: list[str]) -> int:
    """One command in this process, as its console script runs it; its exit code."""
    if argv[0] in ("hf_to_megatron", "megatron_to_hf"):
        module = importlib.import_module(f"checkpoints_tools.{argv[0]}")
        command = functools.partial(run_cli, functools.partial(module.main, argv[1:]))
    else:
        command = functools.partial(main, argv)
    try:
        command()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


def expand(text: str, ws: dict[str, Path]) -> str:
    return text.replace("{T}", T).format(**{k: str(v) for k, v in ws.items()})


@pytest.mark.parametrize(("command", "fragment"), CASES, ids=[c.removeprefix("{T} ")[:70] for c, _ in CASES])
def test_a_bad_input_is_one_sentence_and_exit_2(ws, command, fragment, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(ws["root"]))  # the custom reward modules
    code = run_command(expand(command, ws).split())
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert expand(fragment, ws) in lines[-1], err
    usage = lines[:-1]  # argparse's usage (its first line and indented continuations) may precede the sentence
    assert not usage or (usage[0].startswith("usage:") and all(line[0] == " " for line in usage[1:])), err
    assert not (ws["root"] / "run" / "config.yaml").exists()


def test_a_custom_reward_that_scores_text_is_accepted_and_overrides_may_follow_options(ws, capsys, monkeypatch):
    importlib.import_module("flowrl_megatron.rewards.math")  # as after any math-graded run: rewards.math is loaded
    monkeypatch.syspath_prepend(str(ws["root"]))
    run_dir = ws["root"] / "good_run"
    code = run_command(["train", str(ws["recipe"]), "--prepare", "reward.name=reward_shapes:good",
                        f"run_dir={run_dir}", "train.steps=3"])
    assert code == 0, capsys.readouterr().err
    text = (run_dir / "config.yaml").read_text()
    assert "name: reward_shapes:good" in text and "steps: 3" in text


def test_plan_takes_overrides_after_options_and_falls_back_to_the_published_config(capsys):
    recipe = REPO / "recipes" / "qwen2.5_32b_math.yaml"  # model.path is /models/Qwen2.5-32B, absent here
    code = run_command(["plan", str(recipe), "--gpu-gib", "80", "model.tp=8", "model.pp=2"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "planning with" in out.err and "model_configs/qwen2.5-32b" in out.err
    assert out.out.strip().endswith("fits.")


@pytest.mark.parametrize(("recipe", "config"), [
    ("qwen2.5_7b_math.yaml", "qwen2.5-7b"), ("qwen3_8b_math.yaml", "qwen3-8b"),
    ("deepseek_r1_distill_qwen_7b_code.yaml", "deepseek-r1-distill-qwen-7b"),
    ("qwen2.5_7b_math_grpo.yaml", "qwen2.5-7b"), ("qwen2.5_7b_math_ppo.yaml", "qwen2.5-7b"),
])
def test_each_recipe_plans_as_its_header_says(recipe, config, capsys):
    """``flowrl plan RECIPE``, as each header gives it, with the model not downloaded yet."""
    code = run_command(["plan", str(REPO / "recipes" / recipe)])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert f"model_configs/{config} instead" in out.err and out.out.strip().endswith("fits.")


def test_train_help_lists_every_setting_with_its_range(capsys):
    from flowrl_megatron.config import RunConfig, to_dict

    def leaves(d: dict, prefix: str = "") -> list[str]:
        return [k for key, v in d.items()
                for k in (leaves(v, f"{prefix}{key}.") if isinstance(v, dict) else [f"{prefix}{key}"])]

    assert run_command(["train", "--help"]) == 0
    help_text = capsys.readouterr().out
    for name in leaves(to_dict(RunConfig())):
        assert f"  {name} = " in help_text, name
    assert "rollout.max_concurrency = 256  (int >= 1)" in help_text
    assert "rollout.top_p = 1.0  (float in (0, 1])" in help_text


def test_validating_imports_no_megatron_vllm_or_torch_and_prints_no_library_warnings(ws):
    """``--prepare`` and ``plan`` read configs only: in a fresh interpreter they must not load the heavy stack."""
    probe = f"""
import sys
from flowrl_megatron.cli import main
from flowrl_megatron.errors import run_cli
for argv in (["train", {str(ws["recipe"])!r}, "--prepare", "run_dir={ws["root"]}/probe_run"],
             ["plan", {str(ws["recipe"])!r}]):
    try:
        main(argv)
    except SystemExit as e:
        assert e.code in (0, 1), (argv, e.code)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("megatron", "vllm", "torch", "transformer_engine"))
print("HEAVY", heavy[:5])
"""
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "HEAVY []" in r.stdout, r.stdout
    assert "warn" not in r.stderr.lower(), r.stderr


def test_a_problem_only_a_rank_can_see_is_one_sentence_too(ws):
    """Whether prompts fit ``data.max_prompt_tokens`` is known only after tokenizing (on rank 0, under torchrun):
    the rank says so in one sentence and exits 2; torchrun's launcher adds no traceback and library warnings
    megatron-core gives about itself are not printed."""
    data = ws["root"] / "long.jsonl"
    data.write_text(json.dumps({"prompt": "word " * 200, "answer": "a"}) + "\n")
    r = subprocess.run([sys.executable, "-m", "flowrl_megatron", "train", str(ws["recipe"]),
                        f"data.train_files=[{data}]", f"run_dir={ws['root'] / 'rank_run'}"],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "error: no usable prompts in" in r.stderr and "1 longer than data.max_prompt_tokens=32" in r.stderr
    assert "Traceback" not in r.stderr and "Warning" not in r.stderr, r.stderr
