"""One typed run configuration: YAML recipes, ``key=value`` overrides, validation before any model is built.

A recipe is a YAML file whose top-level sections are the fields of ``RunConfig``; an override
``train.lr=1e-6`` sets one leaf (its value parsed as YAML). Unknown keys, wrong types and settings
that contradict each other are ``UserError``s that name the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from flowrl_megatron.algorithms.losses import AlgorithmConfig
from flowrl_megatron.errors import UserError
from flowrl_megatron.models.z_head import ZHeadConfig


@dataclass
class ModelConfig:
    path: str = ""  # Hugging Face directory: config, tokenizer, and the weights engines start from
    megatron_checkpoint: str = ""  # its Megatron conversion; empty: converted into the run directory at start
    tp: int = 1
    pp: int = 1
    dtype: Literal["float32", "bfloat16"] = "float32"
    # default: transformer-engine's layers when it imports on a GPU, else megatron-core's local ones;
    # sdpa: the local layers with torch's scaled_dot_product_attention (fused kernels without transformer-engine)
    attention: Literal["default", "sdpa"] = "default"


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)  # parquet / jsonl / json files, or one saved dataset dir
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    template: Literal["dapo", "chat", "raw"] = "dapo"  # raw: the prompt text as is
    max_prompt_tokens: int = 2048
    shuffle: bool = True


@dataclass
class RewardConfig:
    name: str = "math"  # see flowrl_megatron.rewards.REWARDS, or package.module:function
    workers: int = 2
    timeout_s: float = 10.0  # per sample; a timeout scores as wrong and is counted


@dataclass
class RolloutConfig:
    engines: int = 1
    engine_tp: int = 1
    n: int = 8  # responses per prompt
    max_response_tokens: int = 8192
    temperature: float = 1.0
    top_p: float = 1.0
    max_concurrency: int = 256
    bucket_mib: int = 256  # weight-sync bucket size
    # Engines started elsewhere (`flowrl serve`, e.g. under srun) instead of by the trainer: their URLs, one per
    # engine; the API key comes from the FLOWRL_API_KEY environment variable.
    engine_urls: list[str] = field(default_factory=list)
    sync_address: str = "127.0.0.1"  # where engines reach trainer rank 0 for weight sync (its node, multi-node)
    # Stop when the mean |train - rollout| log-prob of sampled tokens exceeds this (asynchronous runs: also of the
    # probe prompts every engine scores after each weight update).
    max_mismatch: float = 0.05
    # 0: synchronous, on-policy (the engines wait while the trainer trains). k >= 1: the engines keep generating
    # while the trainer trains, at most k weight versions ahead; samples are trained at most k versions after the
    # one that sampled their first token, with the engines' log-probs as the importance weights' denominator.
    max_staleness: int = 0
    # Asynchronous runs: how weights reach engines with requests in flight. keep: pause them, update, continue
    # them with the new weights (caches recomputed); drain: wait until they finish, then update.
    weight_update: Literal["keep", "drain"] = "keep"


@dataclass
class TrainConfig:
    steps: int = 100
    prompts_per_step: int = 512
    mini_batch_prompts: int = 32  # prompts per optimizer step
    epochs: int = 1  # passes over each rollout batch
    micro_batch_size: int = 8  # sequences per forward/backward on one data-parallel rank
    # > 0: micro-batches by token budget instead (as many samples as fit, longest first; data-parallel ranks get
    # equal token loads); micro_batch_size is then unused.
    max_tokens_per_micro_batch: int = 0
    # Samples end to end in one row (THD), no padding, where the attention takes it (transformer-engine on GPU,
    # model.attention=sdpa); else padded rows.
    pack_sequences: bool = True
    lr: float = 1e-6
    weight_decay: float = 0.1
    warmup_steps: int = 10  # optimizer steps
    grad_clip: float = 1.0
    # An update whose loss or gradient is not finite is skipped (counted in optim/skipped_updates); at this many
    # in a row the run stops.
    stop_after_nonfinite: int = 3
    seed: int = 1
    recompute: Literal["none", "full"] = "none"  # full: keep each layer's input only, recompute the rest
    # Shard the Adam state over data-parallel ranks. Refused for now: megatron-core 0.16.1 cannot save it in its
    # default checkpoint format here, and its dp_reshardable format did not resume exactly (docs/training.md).
    distributed_optimizer: bool = False


@dataclass
class EvalConfig:
    every: int = 0  # steps between evaluations (also before the first and after the last); 0 = never
    files: list[str] = field(default_factory=list)  # prompts and answers, read like data.train_files
    max_prompts: int = 0  # the first this many prompts; 0 = all
    n: int = 16  # samples per prompt: pass@k for k up to n, distinct answers among n
    temperature: float = 1.0  # 1.0: kl_ref estimates KL(policy || reference) exactly in expectation
    top_p: float = 1.0


@dataclass
class CheckpointConfig:
    every: int = 50  # steps; 0 = only at the end
    keep: int = 2


@dataclass
class RunConfig:
    run_dir: str = "runs/flowrl"
    dp: int = 1
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    z_head: ZHeadConfig = field(default_factory=ZHeadConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def world_size(self) -> int:
        return self.model.tp * self.model.pp * self.dp


def _check_value(where: str, hint: Any, value: Any) -> Any:
    """``value`` converted to ``hint`` (int -> float allowed), or a UserError naming ``where``."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise UserError(f"{where} must be one of {list(typing.get_args(hint))}, got {value!r}.")
        return value
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return None if value is None else _check_value(where, args[0], value)
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise UserError(f"{where} must be a list, got {value!r}.")
        return [_check_value(f"{where}[{i}]", typing.get_args(hint)[0], v) for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise UserError(f"{where} must be a list, got {value!r}.")
        return tuple(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (not isinstance(value, hint) or (hint is int and isinstance(value, bool))):
        raise UserError(f"{where} must be {hint.__name__}, got {value!r}.")
    return value


def _apply(obj: Any, path: str, values: dict[str, Any]) -> None:
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in values.items():
        where = f"{path}{key}"
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {path}{close[0]}?)" if close else f"; valid keys: {', '.join(names)}"
            raise UserError(f"unknown setting {where}{hint}.")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise UserError(f"{where} is a section; set its keys, e.g. {where}.{names[0]}=...")
            nested = dataclasses.replace(current)  # a copy: the defaults of other configs stay untouched
            _apply(nested, f"{where}.", value)
            object.__setattr__(obj, key, nested)
        else:  # object.__setattr__: some sections (AlgorithmConfig, ZHeadConfig) are frozen
            object.__setattr__(obj, key, _check_value(where, hints[key], value))


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2 floats: PyYAML (YAML 1.1) reads ``1e-6`` (no dot) as a string."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
               r"|[0-9][0-9_]*[eE][-+]?[0-9]+|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no arbitrary objects


def parse_override(text: str) -> dict[str, Any]:
    """``a.b.c=value`` -> {"a": {"b": {"c": value}}}, the value parsed as YAML (numbers, lists, true/false)."""
    if "=" not in text:
        raise UserError(f"override {text!r} is not key=value (e.g. train.lr=1e-6).")
    key, raw = text.split("=", 1)
    try:
        value = _load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    out: dict[str, Any] = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(recipe: str | Path | None, overrides: list[str] = (), check: bool = True) -> RunConfig:
    """Recipe file + overrides -> a ``RunConfig``, validated unless ``check`` is False (types always are)."""
    values: dict[str, Any] = {}
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise UserError(f"recipe {path} does not exist; see recipes/ for examples.")
        try:
            values = _load_yaml(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"recipe {path} is not valid YAML: {e}".replace("\n", " ")) from None
        if not isinstance(values, dict):
            raise UserError(f"recipe {path} must be a mapping of sections (model:, data:, train: ...).")
    for text in overrides:
        values = _merge(values, parse_override(text))
    cfg = RunConfig()
    _apply(cfg, "", values)
    if check:
        validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Every inconsistency a run would hit later, now, in one sentence each."""
    from flowrl_megatron.models.arch import load_arch

    m, d, r, t, ro = cfg.model, cfg.data, cfg.reward, cfg.train, cfg.rollout
    if not m.path:
        raise UserError("model.path is not set; point it at a Hugging Face model directory (config.json, tokenizer).")
    if not Path(m.path, "config.json").is_file():
        raise UserError(f"model.path {m.path} has no config.json; it must be a Hugging Face model directory.")
    if m.megatron_checkpoint and not Path(m.megatron_checkpoint, "flowrl_checkpoint.json").is_file():
        raise UserError(f"model.megatron_checkpoint {m.megatron_checkpoint} is not a converted checkpoint; make one "
                        "with python -m checkpoints_tools.hf_to_megatron, or leave it empty to convert at start.")
    for name, value in (("model.tp", m.tp), ("model.pp", m.pp), ("dp", cfg.dp), ("rollout.engines", ro.engines),
                        ("rollout.engine_tp", ro.engine_tp), ("train.steps", t.steps), ("reward.workers", r.workers),
                        ("train.micro_batch_size", t.micro_batch_size), ("train.epochs", t.epochs),
                        ("train.stop_after_nonfinite", t.stop_after_nonfinite),
                        ("rollout.max_response_tokens", ro.max_response_tokens)):
        if value < 1:
            raise UserError(f"{name} must be >= 1, got {value}.")
    arch = load_arch(m.path)
    arch.check_layout(m.tp, m.pp)
    if not d.train_files:
        raise UserError("data.train_files is empty; list parquet/jsonl/json files or a saved dataset directory.")
    for f in d.train_files:
        if not Path(f).exists():
            raise UserError(f"data file {f} does not exist.")
    from flowrl_megatron.rewards import REWARDS, resolve_reward

    try:
        resolve_reward(r.name)
    except (KeyError, ImportError, AttributeError):
        raise UserError(f"reward.name {r.name!r} is unknown; use one of {', '.join(sorted(REWARDS))} or "
                        "package.module:function.") from None
    if ro.n < 2 and cfg.algorithm.normalization == "group":
        raise UserError(f"rollout.n={ro.n}: group-normalised rewards need at least 2 responses per prompt.")
    if t.prompts_per_step % t.mini_batch_prompts:
        raise UserError(f"train.prompts_per_step={t.prompts_per_step} is not a multiple of "
                        f"train.mini_batch_prompts={t.mini_batch_prompts}.")
    rows = t.mini_batch_prompts * ro.n
    longest = d.max_prompt_tokens + ro.max_response_tokens
    if t.max_tokens_per_micro_batch < 0 or 0 < t.max_tokens_per_micro_batch < longest:
        raise UserError(f"train.max_tokens_per_micro_batch={t.max_tokens_per_micro_batch} is below the longest "
                        f"sample (data.max_prompt_tokens + rollout.max_response_tokens = {longest}); raise it, or "
                        "set 0 for micro_batch_size samples per micro-batch.")
    if t.max_tokens_per_micro_batch and rows < cfg.dp:
        raise UserError(f"a mini-batch has {rows} sequences (mini_batch_prompts x n), fewer than dp={cfg.dp} ranks.")
    if not t.max_tokens_per_micro_batch and rows % (cfg.dp * t.micro_batch_size):
        raise UserError(f"a mini-batch has {rows} sequences (mini_batch_prompts x n), which does not split into "
                        f"dp={cfg.dp} ranks x micro_batch_size={t.micro_batch_size}; change one of them.")
    if not 0 < ro.temperature <= 10 or not 0 < ro.top_p <= 1:
        raise UserError("rollout.temperature must be in (0, 10] and rollout.top_p in (0, 1].")
    if d.max_prompt_tokens + ro.max_response_tokens > arch.max_position_embeddings:
        raise UserError(f"data.max_prompt_tokens + rollout.max_response_tokens = "
                        f"{d.max_prompt_tokens + ro.max_response_tokens} exceeds the model's "
                        f"max_position_embeddings ({arch.max_position_embeddings}); lower one of them.")
    if ro.engine_urls and len(ro.engine_urls) != ro.engines:
        raise UserError(f"rollout.engine_urls lists {len(ro.engine_urls)} engines but rollout.engines="
                        f"{ro.engines}; make them agree.")
    if t.distributed_optimizer:
        raise UserError("train.distributed_optimizer=true is not supported yet: its megatron-core 0.16.1 checkpoints "
                        "do not resume exactly; leave it false (Adam state then lives on every data-parallel rank).")
    ev = cfg.eval
    if ro.max_staleness < 0:
        raise UserError(f"rollout.max_staleness must be >= 0 (0: synchronous), got {ro.max_staleness}.")
    if cfg.algorithm.importance_weight == "mask" and not 0 < cfg.algorithm.mask_eps < 1:
        raise UserError(f"algorithm.mask_eps must be in (0, 1), got {cfg.algorithm.mask_eps}.")
    if ev.every < 0 or ev.max_prompts < 0 or ev.n < 1:
        raise UserError("eval.every and eval.max_prompts must be >= 0 and eval.n >= 1.")
    if ev.every and not ev.files:
        raise UserError("eval.every is set but eval.files is empty; list the evaluation prompt files (the training "
                        "files work too) or set eval.every=0.")
    for f in ev.files:
        if not Path(f).exists():
            raise UserError(f"eval file {f} does not exist.")
    if not 0 < ev.temperature <= 10 or not 0 < ev.top_p <= 1:
        raise UserError("eval.temperature must be in (0, 10] and eval.top_p in (0, 1].")
    if cfg.checkpoint.keep < 1:
        raise UserError("checkpoint.keep must be >= 1 (the latest checkpoint is always kept).")


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def write_run_config(cfg: RunConfig) -> Path:
    """The resolved config, saved in the run directory: what torchrun's ranks load, and the run's record."""
    from flowrl_megatron.files import write_text_atomic

    return write_text_atomic(Path(cfg.run_dir) / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
