"""Where a run's scalars go besides ``metrics.jsonl``: tensorboard, Weights & Biases, MLflow (``logging.backends``).

Only the driver (trainer rank 0) logs. Each backend gets exactly the scalars and steps the JSONL file gets, and each
step once: every backend knows the last step it holds (``held``) and is sent only later ones. A resumed run
continues the same W&B and MLflow run (their ids are kept in ``RUN_DIR/tracking.json``); W&B and MLflow are asked
what they hold, from their own records (after a kill, what reached them is not what this process last sent), and
what they lack of the steps up to the checkpoint is sent again from the JSONL file (``MetricsLog``); tensorboard
purges the steps after the checkpoint (``purge_step``). A step redone after the checkpoint that W&B or MLflow hold
already keeps its first values there (equal to the new ones in a synchronous run, which resumes bit-exactly). A
backend that fails mid-run is reported once and dropped; the others go on.
"""

from __future__ import annotations

import json
import netrc
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any, Protocol

from flowrl_megatron.config import RunConfig, to_dict
from flowrl_megatron.errors import UserError
from flowrl_megatron.files import write_text_atomic
from flowrl_megatron.metrics import kept_through

STATE_FILE = "tracking.json"


class Backend(Protocol):
    name: str
    held: int  # the last step this backend holds (-1: none); only later steps are sent to it

    def log(self, step: int, values: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class TensorBoard:
    name = "tensorboard"

    def __init__(self, cfg: RunConfig, resume_step: int, state: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # the steps after the checkpoint (all of them, with none) are dropped from the earlier events files
        self.held = kept_through(resume_step)
        self.writer = SummaryWriter(str(Path(cfg.run_dir) / "tensorboard"), purge_step=self.held + 1)

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def run_name(cfg: RunConfig) -> str:
    return cfg.logging.name or Path(cfg.run_dir).resolve().name


def wandb_mode(cfg: RunConfig) -> str:
    """``logging.wandb_mode``; auto: online when W&B has a key here (WANDB_API_KEY or ``wandb login``)."""
    mode = cfg.logging.wandb_mode
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        return "online" if netrc.netrc().authenticators("api.wandb.ai") else "offline"
    except (OSError, netrc.NetrcParseError):
        return "offline"


def wandb_records(path: Path, check: bool = False) -> list[dict]:
    """The records of one W&B offline log (``offline-run-*/run-ID.wandb``), read by W&B's own reader."""
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(path)],
                         capture_output=True, text=True, timeout=300, check=check).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def wandb_offline_steps(run_dir: Path, run_id: str) -> int:
    """The last step the W&B offline logs of run ``run_id`` hold (-1: none): after a kill its writer may have
    flushed more or less than this process saw logged."""
    return max((r["history"].get("step", {}).get("num", 0)
                for path in sorted(Path(run_dir, "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
                for r in wandb_records(path) if r.get("type") == "history"), default=-1)


class WandB:
    name = "wandb"

    def __init__(self, cfg: RunConfig, resume_step: int, state: dict) -> None:
        import wandb

        # W&B suggests its LLM-tracing product when it sees the openai package (which vLLM imports): not for us
        os.environ.setdefault("WANDB_DISABLE_WEAVE", "true")
        # a W&B service inherited from the launching process (a notebook's, a test's) is not this run's: a resumed
        # run's id may still be open there ("run ID is in use"); W&B starts one of our own instead
        os.environ.pop("WANDB_SERVICE", None)
        lg = cfg.logging
        mode = wandb_mode(cfg)
        resumed = "wandb" in state
        run_id = state.setdefault("wandb", uuid.uuid4().hex[:8])
        # online, the server also refuses steps below its last
        self.held = wandb_offline_steps(Path(cfg.run_dir), run_id) if resumed and mode == "offline" else -1
        self.run = wandb.init(project=lg.project, entity=lg.wandb_entity or None, name=run_name(cfg),
                              group=lg.group or None, tags=list(lg.tags) or None, config=to_dict(cfg), id=run_id,
                              resume="allow" if resumed else None, dir=cfg.run_dir, mode=mode,
                              settings=wandb.Settings(console="off", quiet=True))
        if resumed and mode == "online":
            self.held = self.run.step - 1

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step, commit=True)

    def close(self) -> None:
        self.run.finish()  # what W&B buffered is durable only now


def mlflow_key(key: str) -> str:
    """MLflow names take letters, digits and ``_-. :/``: ``eval/pass@8`` is logged as ``eval/pass_at_8``."""
    return key.replace("@", "_at_")


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def mlflow_uri(cfg: RunConfig) -> str:
    return cfg.logging.mlflow_tracking_uri or f"sqlite:///{(Path(cfg.run_dir) / 'mlflow.db').resolve()}"


class MLflow:
    name = "mlflow"

    def __init__(self, cfg: RunConfig, resume_step: int, state: dict) -> None:
        import logging

        from mlflow import MlflowClient
        from mlflow.entities import Param

        for name in ("mlflow.store.db.utils", "alembic"):  # the SQLite store's table creation, at every new store
            logging.getLogger(name).setLevel(logging.WARNING)
        lg = cfg.logging
        self.client = MlflowClient(mlflow_uri(cfg))
        if "mlflow" in state:
            self.run_id = state["mlflow"]
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            experiment = self.client.get_experiment_by_name(lg.project)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(lg.project)
            tags = {k: v for k, v in (("tags", ",".join(lg.tags)), ("group", lg.group)) if v}
            self.run_id = state["mlflow"] = self.client.create_run(experiment_id, run_name=run_name(cfg),
                                                                   tags=tags).info.run_id
            params = [Param(k, str(v)[:6000]) for k, v in flatten(to_dict(cfg)).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=params[i : i + 100])
        # the steps the store holds already, read from the store itself
        metrics = self.client.get_run(self.run_id).data.metrics
        self.held = max((p.step for key in metrics for p in self.client.get_metric_history(self.run_id, key)),
                        default=-1)

    def log(self, step: int, values: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(mlflow_key(k), float(v), now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


BACKENDS: dict[str, type] = {"tensorboard": TensorBoard, "wandb": WandB, "mlflow": MLflow}


def check_backends(cfg: RunConfig) -> None:
    """Before any process starts: every backend's package imports, and an MLflow URI given explicitly answers."""
    import importlib

    for name in cfg.logging.backends:
        if name in BACKENDS:  # each backend's package is named as the backend
            try:
                importlib.import_module(name)
            except ImportError as e:
                raise UserError(f"logging.backends lists {name}, but its package does not import ({e}); install "
                                "it with pip install -e '.[tracking]' or remove it from logging.backends.") from None
    if "mlflow" in cfg.logging.backends and cfg.logging.mlflow_tracking_uri:
        from mlflow import MlflowClient

        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a wrong address fails now, not in minutes
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        try:
            MlflowClient(cfg.logging.mlflow_tracking_uri).search_experiments(max_results=1)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"logging.mlflow_tracking_uri {cfg.logging.mlflow_tracking_uri!r} does not answer: "
                            f"{first[:300]}; fix the URI or leave it empty for a SQLite store in the run "
                            "directory.") from None


class Trackers:
    """The configured backends other than the JSONL file, as one: started together (a failure stops the run with
    one sentence), logged to together (a failure mid-run drops that backend, said once), closed together."""

    def __init__(self, cfg: RunConfig, resume_step: int) -> None:
        self.path = Path(cfg.run_dir) / STATE_FILE
        self.state: dict = json.loads(self.path.read_text()) if self.path.is_file() else {}  # backend -> run id
        self.backends: list[Backend] = []
        for name in cfg.logging.backends:
            if name in BACKENDS:
                try:
                    self.backends.append(BACKENDS[name](cfg, resume_step, self.state))
                except Exception as e:
                    self.close()
                    raise UserError(f"logging backend {name} did not start: {type(e).__name__}: {e}"[:500]) from None
                write_text_atomic(self.path, json.dumps(self.state, indent=1))  # its run id, before any step

    def log(self, step: int, values: dict[str, float]) -> None:
        for backend in list(self.backends):
            if step <= backend.held:
                continue
            try:
                backend.log(step, values)
                backend.held = step
            except Exception as e:
                self.backends.remove(backend)
                print(f"warning: logging backend {backend.name} failed at step {step} ({type(e).__name__}: {e}); "
                      "it is off for the rest of the run, the other backends and metrics.jsonl go on.",
                      file=sys.stderr, flush=True)

    def close(self) -> None:
        for backend in self.backends:
            try:
                backend.close()
            except Exception as e:
                print(f"warning: logging backend {backend.name} did not close cleanly ({type(e).__name__}: {e}).",
                      file=sys.stderr, flush=True)
        self.backends = []
