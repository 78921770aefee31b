"""Tracking backends for real (W&B offline, MLflow on its SQLite store, tensorboard), read back through each
library's own reader and compared with metrics.jsonl: the same scalars at the same steps, a resumed run continuing
the same runs without logging a step twice, a backend failing mid-run dropped while the others go on."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from flowrl_megatron.config import load_config
from flowrl_megatron.metrics import MetricsLog, read_metrics
from flowrl_megatron.tracking import STATE_FILE, mlflow_key, mlflow_uri, wandb_records

ALL = "logging.backends=[jsonl,tensorboard,wandb,mlflow]"


@pytest.fixture(autouse=True)
def no_wandb_service_left():
    """W&B's service lives as long as this process and is announced to children in WANDB_SERVICE: stop it."""
    yield
    import wandb

    wandb.teardown()
    assert "WANDB_SERVICE" not in os.environ


def wandb_history(run_dir: Path) -> list[dict]:
    """Every history row of every W&B offline segment of the run, read by W&B's own reader (``wandb leet``)."""
    rows = []
    for path in sorted(Path(run_dir, "wandb").glob("offline-run-*/*.wandb")):
        for record in wandb_records(path, check=True):
            if record.get("type") == "history":
                item = record["history"]["item"]
                rows.append({"step": item["_step"], **{k: v for k, v in item.items() if not k.startswith("_")}})
    return rows


def mlflow_history(cfg) -> dict[str, dict[int, float]]:
    """metric -> step -> value, through MLflow's client on the run's store (one entry per logged point)."""
    from mlflow import MlflowClient

    client = MlflowClient(mlflow_uri(cfg))
    run_id = json.loads((Path(cfg.run_dir) / STATE_FILE).read_text())["mlflow"]
    out: dict[str, dict[int, float]] = {}
    for key in client.get_run(run_id).data.metrics:
        points = client.get_metric_history(run_id, key)
        assert len({p.step for p in points}) == len(points), f"{key}: a step logged twice"
        out[key] = {p.step: p.value for p in points}
    return out


def tensorboard_history(run_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def assert_backends_equal_jsonl(cfg, redone: tuple[int, ...] = (), timed: tuple[str, ...] = ()) -> None:
    """Every configured backend holds exactly the JSONL file's scalars at its steps, each step once. ``redone``:
    steps trained twice (after a resume), whose ``timed`` metrics (wall-clock rates) W&B and MLflow keep from the
    first time."""
    run_dir = Path(cfg.run_dir)
    rows = read_metrics(run_dir)
    expected = {(r["step"], k): v for r in rows for k, v in r.items() if k != "step"}
    backends = set(cfg.logging.backends)

    def comparable(points: dict) -> dict:
        return {(s, k): v for (s, k), v in points.items() if not (s in redone and k.startswith(timed))}

    if "wandb" in backends:
        wandb_rows = wandb_history(run_dir)
        steps = [r["step"] for r in wandb_rows]
        assert sorted(steps) == [r["step"] for r in rows]  # each step once, none missing
        wandb = {(r["step"], k): v for r in wandb_rows for k, v in r.items() if k != "step"}
        assert wandb.keys() == expected.keys() and comparable(wandb) == pytest.approx(comparable(expected))
    if "mlflow" in backends:
        mlflow = {(step, key): v for key, points in mlflow_history(cfg).items() for step, v in points.items()}
        named = {(step, mlflow_key(k)): v for (step, k), v in expected.items()}
        assert mlflow.keys() == named.keys() and comparable(mlflow) == pytest.approx(comparable(named))
    if "tensorboard" in backends:  # tensorboard purges the redone steps: the second values, as the JSONL file
        tb = tensorboard_history(run_dir)
        assert {(s, k): v for k, points in tb.items() for s, v in points.items()} == pytest.approx(expected, rel=1e-6)


def wandb_config(run_dir: Path) -> dict:
    """The config W&B recorded with the run (its first segment's run record)."""
    path = sorted(Path(run_dir, "wandb").glob("offline-run-*/*.wandb"))[0]
    return next(r["run"]["config"] for r in wandb_records(path, check=True) if r.get("type") == "run")


def values(step: int) -> dict[str, float]:
    """A step's scalars; a redone step has the same ones (a synchronous run resumes bit-exactly)."""
    out = {"reward/mean": 0.1 * step, "train/loss": 1.0 / (step + 1), "optim/lr": 1e-6 * step}
    if step % 2 == 0:
        out |= {"eval/pass@1": 0.5 + 0.01 * step, "eval/pass@16": 0.9}
    return out


def test_every_backend_holds_the_jsonl_scalars_and_a_resumed_run_logs_no_step_twice(tmp_path):
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", ALL, "logging.wandb_mode=offline",
                             "logging.tags=[test,flowrl]", "logging.group=g"], check=False)
    log = MetricsLog(cfg, resume_step=0)
    for step in range(5):
        log.log(step, values(step))
    log.close()
    # resumed from step 2's checkpoint: steps 3 and 4 are trained again, then 5 and 6
    log = MetricsLog(cfg, resume_step=2)
    for step in range(3, 7):
        log.log(step, values(step))
    log.close()
    assert set(json.loads((tmp_path / "run" / STATE_FILE).read_text())) == {"wandb", "mlflow"}  # the runs' ids
    assert [r["step"] for r in read_metrics(cfg.run_dir)] == list(range(7))
    assert_backends_equal_jsonl(cfg)
    assert len(list((tmp_path / "run" / "wandb").glob("offline-run-*"))) == 2  # one W&B run, two segments
    config = wandb_config(tmp_path / "run")["update"]  # the resolved config, as the run's W&B config
    assert config["train"]["lr"] == 1e-6 and config["logging"]["tags"] == ["test", "flowrl"]


def test_a_resumed_run_sends_each_backend_the_steps_it_lacks_from_the_jsonl_file(tmp_path):
    """W&B's offline writer loses what it had not flushed when the run was killed, a backend dropped mid-run misses
    the rest of that attempt: simulated by an attempt that wrote steps 3-4 to metrics.jsonl only. Resumed from
    step 4's checkpoint, W&B and MLflow get 3 and 4 from the JSONL file, then 5 and 6, each once."""
    run = [f"run_dir={tmp_path / 'run'}", "logging.wandb_mode=offline"]
    tracked = load_config(None, [*run, "logging.backends=[jsonl,wandb,mlflow]"], check=False)
    jsonl_only = load_config(None, [*run, "logging.backends=[jsonl]"], check=False)
    for cfg, steps, resume_step in ((tracked, range(3), 0), (jsonl_only, range(3, 5), 2), (tracked, range(5, 7), 4)):
        log = MetricsLog(cfg, resume_step)
        for step in steps:
            log.log(step, values(step))
        log.close()
    assert [r["step"] for r in read_metrics(tracked.run_dir)] == list(range(7))
    assert_backends_equal_jsonl(tracked)


def test_a_start_without_a_checkpoint_redoes_everything_an_earlier_attempt_logged(tmp_path):
    """Killed after step 0's evaluation, before the first checkpoint: the next attempt starts from nothing, so its
    step 0 replaces the earlier one in every backend (tensorboard's purge_step 0) instead of following it."""
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", "logging.backends=[jsonl,tensorboard]"], check=False)
    for _ in range(2):
        log = MetricsLog(cfg, resume_step=0)
        log.log(0, values(0))
        log.close()
    assert [r["step"] for r in read_metrics(cfg.run_dir)] == [0]
    assert_backends_equal_jsonl(cfg)


def test_a_backend_that_fails_mid_run_is_dropped_once_and_the_others_go_on(tmp_path, capsys):
    from mlflow import MlflowClient

    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", "logging.backends=[jsonl,mlflow,tensorboard]"],
                      check=False)
    log = MetricsLog(cfg, resume_step=0)
    log.log(0, values(0))
    run_id = json.loads((tmp_path / "run" / STATE_FILE).read_text())["mlflow"]
    MlflowClient(mlflow_uri(cfg)).delete_run(run_id)  # the store refuses metrics of a deleted run
    for step in range(1, 4):
        log.log(step, values(step))
    log.close()
    err = capsys.readouterr().err
    assert err.count("warning: logging backend mlflow failed at step 1") == 1 and "it is off" in err
    assert [r["step"] for r in read_metrics(cfg.run_dir)] == [0, 1, 2, 3]
    assert set(tensorboard_history(tmp_path / "run")["reward/mean"]) == {0, 1, 2, 3}


def test_a_backend_that_cannot_start_stops_the_run_in_one_sentence(tmp_path, monkeypatch):
    from flowrl_megatron.errors import UserError
    from flowrl_megatron.tracking import check_backends

    cfg = load_config(None, [f"run_dir={tmp_path}", "logging.backends=[jsonl,mlflow]",
                             "logging.mlflow_tracking_uri=nosuchscheme://host/x"], check=False)
    with pytest.raises(UserError, match=r"logging.mlflow_tracking_uri 'nosuchscheme://host/x' does not answer"):
        check_backends(cfg)
    monkeypatch.setitem(sys.modules, "wandb", None)  # what Python does for a package that is not installed
    cfg = load_config(None, [f"run_dir={tmp_path}", "logging.backends=[jsonl,wandb]"], check=False)
    with pytest.raises(UserError, match=r"logging.backends lists wandb, but its package does not import .*"
                                        r"pip install -e '.\[tracking\]'"):
        check_backends(cfg)
