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

from flowrl_megatron.errors import UserError


@dataclass(frozen=True)
class Bounds:
    """The valid range of a number setting: each given bound must hold."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def holds(self, value: float) -> bool:
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def __str__(self) -> str:
        low = f"[{self.ge:g}" if self.ge is not None else f"({self.gt:g}" if self.gt is not None else None
        high = f"{self.le:g}]" if self.le is not None else f"{self.lt:g})" if self.lt is not None else None
        if low and high:
            return f"in {low}, {high}"
        if low:
            return (">= " if low[0] == "[" else "> ") + low[1:]
        return ("<= " if high[-1] == "]" else "< ") + high[:-1] if high else ""


def setting(default: Any, doc: str, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
            lt: float | None = None, nonempty: bool = False) -> Any:
    """A config field with its meaning and valid range, declared once: the loader checks every value against it
    and ``flowrl train --help`` lists it."""
    meta = {"doc": doc, "bounds": Bounds(ge, gt, le, lt), "nonempty": nonempty}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


Algorithm = Literal["flowrl", "grpo", "reinforce_pp", "gspo", "ppo"]
ImportanceWeight = Literal["clip", "cap", "none", "mask"]
RewardNormalization = Literal["group", "batch", "none"]
DEFAULT_CLIP = 0.2  # PPO's, the FlowRL paper's and GRPO's
GSPO_CLIP = (3e-4, 4e-4)  # the GSPO paper's (low, high): sequence ratios are length-normalised, so they stay near 1


@dataclass
class ModelConfig:
    path: str = setting("", "Hugging Face directory: config, tokenizer, and the weights engines start from")
    megatron_checkpoint: str = setting("", "its Megatron conversion; empty: converted into the run directory at "
                                       "start")
    tp: int = setting(1, "tensor-parallel size of the trainer", ge=1)
    pp: int = setting(1, "pipeline-parallel size of the trainer", ge=1)
    dtype: Literal["float32", "bfloat16"] = setting("float32", "parameter and compute dtype of the trainer")
    attention: Literal["default", "sdpa"] = setting(
        "default", "default: transformer-engine's layers when it imports on a GPU, else megatron-core's local ones; "
        "sdpa: the local layers with torch's scaled_dot_product_attention (fused kernels without "
        "transformer-engine)")


@dataclass
class DataConfig:
    train_files: list[str] = setting([], "parquet / jsonl / json files, or one saved dataset directory")
    prompt_key: str = setting("prompt", "the prompt field (text, or a list of chat messages); a.b reaches nested "
                              "fields", nonempty=True)
    answer_key: str = setting("answer", "the reference answer field the reward compares with", nonempty=True)
    template: Literal["dapo", "chat", "raw"] = setting("dapo", "dapo: the DAPO math instruction around the prompt, "
                                                       "in the chat template; chat: the chat template; raw: the "
                                                       "prompt text as is")
    max_prompt_tokens: int = setting(2048, "longer prompts are left out (and counted)", ge=1)
    shuffle: bool = setting(True, "a new seeded order every epoch")


@dataclass
class RewardConfig:
    name: str = setting("math", "math, answer_set, code, or package.module:function(response, answer) -> number",
                        nonempty=True)
    workers: int = setting(2, "reward worker processes", ge=1)
    timeout_s: float = setting(10.0, "per sample; a timeout scores as wrong and is counted", gt=0)
    overlong_buffer: int = setting(0, "DAPO's overlong reward shaping: a response within this many tokens of "
                                   "rollout.max_response_tokens loses overlong_penalty x its share of the buffer "
                                   "used (all of it at the limit); 0: off", ge=0)
    overlong_penalty: float = setting(1.0, "overlong_buffer: the penalty at the response limit", ge=0)


@dataclass
class RolloutConfig:
    engines: int = setting(1, "vLLM engines", ge=1)
    engine_tp: int = setting(1, "tensor-parallel size of each engine", ge=1)
    n: int = setting(8, "responses per prompt", ge=1)
    max_response_tokens: int = setting(8192, "response length limit", ge=1)
    temperature: float = setting(1.0, "sampling temperature", gt=0, le=10)
    top_p: float = setting(1.0, "nucleus sampling mass", gt=0, le=1)
    max_concurrency: int = setting(256, "requests in flight per engine", ge=1)
    bucket_mib: int = setting(256, "weight-sync bucket size in MiB", ge=1)
    engine_hang_s: float = setting(60.0, "an engine with requests in flight that answers no health probe for this "
                                   "long is given up and restarted (its requests are retried)", gt=0)
    engine_restarts: int = setting(2, "times in one step the trainer restarts lost engines (killed, hung, or failing "
                                   "a weight sync) and sends them the weights again before the run stops", ge=0)
    engine_urls: list[str] = setting([], "engines started elsewhere (`flowrl serve`, e.g. under srun) instead of by "
                                     "the trainer, one URL per engine; their key comes from FLOWRL_API_KEY")
    sync_address: str = setting("127.0.0.1", "where engines reach trainer rank 0 for weight sync (its node, "
                                "multi-node)", nonempty=True)
    max_mismatch: float = setting(0.05, "stop when the mean |train - rollout| log-prob of sampled tokens exceeds "
                                  "this (asynchronous runs: also of the probe prompts every engine scores after each "
                                  "weight update)", gt=0)
    max_staleness: int = setting(0, "0: synchronous, on-policy. k >= 1: the engines keep generating while the "
                                 "trainer trains, at most k weight versions ahead; samples are trained at most k "
                                 "versions after the one that sampled their first token, with the engines' log-probs "
                                 "as the importance weights' denominator", ge=0)
    weight_update: Literal["keep", "drain"] = setting("keep", "asynchronous runs: how weights reach engines with "
                                                      "requests in flight. keep: pause them, update, continue them "
                                                      "with the new weights; drain: wait until they finish")


@dataclass(frozen=True)
class AlgorithmConfig:
    name: Algorithm = setting("flowrl", "the objective: FlowRL, or the GRPO / REINFORCE++ / GSPO / PPO baselines "
                              "(GSPO: the length-normalised sequence ratio, clipped per sequence; PPO: token "
                              "advantages by GAE from a learned critic, see the critic section)")
    beta: float = setting(15.0, "FlowRL reward temperature (the paper's best; the authors' code hard-codes 15)",
                          gt=0)
    importance_weight: ImportanceWeight = setting(
        "clip", "paper: clip; authors' current code: cap; at publication: none; mask: clip, and sequences whose "
        "per-token geometric-mean ratio leaves [1 - mask_eps, 1 + mask_eps] get weight 0")
    clip_eps: float | None = setting(None, "ratios (FlowRL: importance weights) are clipped to [1 - clip_eps, 1 + "
                                     "clip_eps_high]; empty: the algorithm's own, 0.2 (GSPO: 3e-4)", gt=0, lt=1)
    clip_eps_high: float | None = setting(None, "the upper clip range; above clip_eps it is DAPO's clip-higher (e.g. "
                                          "0.28 with clip_eps 0.2); empty: clip_eps (GSPO: 4e-4)", gt=0)
    weight_cap: float = setting(10.0, "importance_weight=cap: the largest weight", gt=0)
    mask_eps: float = setting(0.1, "importance_weight=mask: the band a sequence's ratio must stay in", gt=0, lt=1)
    reward_normalization: RewardNormalization | None = setting(
        None, "empty: the algorithm's own (group for FlowRL, GRPO and GSPO, batch for REINFORCE++, none for PPO, "
        "whose critic is the baseline)")
    gamma: float = setting(1.0, "PPO: GAE's discount (1.0: an outcome reward counts fully at every token)", ge=0, le=1)
    lam: float = setting(1.0, "PPO: GAE's lambda (1.0: advantage = reward - value, no bootstrapping)", ge=0, le=1)
    whiten_advantages: bool = setting(True, "PPO: token advantages to mean 0, std 1 over the step's batch")
    kl_coef: float = setting(0.0, "GRPO / REINFORCE++ / PPO: k3 KL-to-reference penalty per token", ge=0)
    mask_truncated: bool = setting(False, "DAPO's overlong filtering: responses cut at rollout.max_response_tokens "
                                   "are left out of the loss (and of its average)")
    dynamic_sampling: bool = setting(False, "DAPO's dynamic sampling (a baseline option: FlowRL's ratio-restoring "
                                     "force acts in the all-correct groups): groups whose rewards are all equal are "
                                     "dropped and more prompts sampled until the batch is full")
    dynamic_sampling_rounds: int = setting(4, "dynamic_sampling: sampling rounds per step at most (the first "
                                           "included) before the run stops saying the data is too easy or too hard",
                                           ge=1)

    @property
    def clip_low(self) -> float:
        if self.clip_eps is not None:
            return self.clip_eps
        return GSPO_CLIP[0] if self.name == "gspo" else DEFAULT_CLIP

    @property
    def clip_high(self) -> float:
        if self.clip_eps_high is not None:
            return self.clip_eps_high
        return GSPO_CLIP[1] if self.name == "gspo" and self.clip_eps is None else self.clip_low

    @property
    def normalization(self) -> RewardNormalization:
        if self.reward_normalization is not None:
            return self.reward_normalization
        return {"reinforce_pp": "batch", "ppo": "none"}.get(self.name, "group")

    @property
    def needs_log_z(self) -> bool:
        return self.name == "flowrl"

    @property
    def needs_critic(self) -> bool:
        return self.name == "ppo"


@dataclass(frozen=True)
class CriticConfig:
    lr: float = setting(1e-5, "PPO: the critic's peak learning rate (Adam; warm-up, weight decay and gradient clip "
                        "as train's)", gt=0)
    value_clip: float = setting(0.5, "PPO: a new value stays within this of the value the step started with, in the "
                                "value loss's clipped term", gt=0)


@dataclass(frozen=True)
class ZHeadConfig:
    variant: Literal["paper", "authors"] = setting("paper", "paper: Linear-GELU-Linear-GELU-Linear; authors: each "
                                                   "hidden block also has LayerNorm and Dropout")
    dropout: float = setting(0.1, "variant=authors: dropout probability", ge=0, lt=1)
    detach_input: bool = setting(False, "true: the Z loss does not reach the LLM through the pooled states (the "
                                 "authors' code lets it; detaching lowered accuracy)")
    lr_mult: float = setting(1.0, "the Z head's learning rate as a multiple of train.lr", gt=0)
    init_seed: int = setting(4321, "seed of the head's initial weights (the same for every layout)", ge=0)


@dataclass
class TrainConfig:
    steps: int = setting(100, "rollout-and-train steps", ge=1)
    prompts_per_step: int = setting(512, "prompts per step (each sampled rollout.n times)", ge=1)
    mini_batch_prompts: int = setting(32, "prompts per optimizer step; divides prompts_per_step", ge=1)
    epochs: int = setting(1, "passes over each rollout batch", ge=1)
    micro_batch_size: int = setting(8, "sequences per forward/backward on one data-parallel rank", ge=1)
    max_tokens_per_micro_batch: int = setting(0, "> 0: micro-batches by token budget instead (as many samples as "
                                              "fit, longest first; data-parallel ranks get equal token loads)", ge=0)
    pack_sequences: bool = setting(True, "samples end to end in one row (THD), no padding, where the attention "
                                   "takes it (transformer-engine on GPU, model.attention=sdpa); else padded rows")
    lr: float = setting(1e-6, "peak learning rate (Adam)", gt=0)
    weight_decay: float = setting(0.1, "AdamW weight decay", ge=0)
    warmup_steps: int = setting(10, "linear warm-up, in optimizer steps", ge=0)
    grad_clip: float = setting(1.0, "global gradient-norm clip; 0: none", ge=0)
    stop_after_nonfinite: int = setting(3, "an update whose loss or gradient is not finite is skipped (counted in "
                                        "optim/skipped_updates); at this many in a row the run stops", ge=1)
    seed: int = setting(1, "seed of data order, sampling and dropout", ge=0)
    recompute: Literal["none", "full"] = setting("none", "full: keep each layer's input only, recompute the rest")
    distributed_optimizer: bool = setting(False, "shard the Adam state over data-parallel ranks; refused for now: "
                                          "megatron-core 0.16.1 does not resume it exactly here")


@dataclass
class EvalConfig:
    every: int = setting(0, "steps between evaluations (also before the first and after the last); 0: never", ge=0)
    files: list[str] = setting([], "prompts and answers, read like data.train_files")
    max_prompts: int = setting(0, "the first this many prompts; 0: all", ge=0)
    n: int = setting(16, "samples per prompt: pass@k for k up to n, distinct answers among n", ge=1)
    temperature: float = setting(1.0, "1.0: kl_ref estimates KL(policy || reference) exactly in expectation", gt=0,
                                 le=10)
    top_p: float = setting(1.0, "nucleus sampling mass", gt=0, le=1)


@dataclass
class CheckpointConfig:
    every: int = setting(50, "steps between checkpoints; 0: only at the end", ge=0)
    keep: int = setting(2, "checkpoints kept (the latest always is)", ge=1)


@dataclass
class LoggingConfig:
    backends: list[Literal["jsonl", "tensorboard", "wandb", "mlflow"]] = setting(
        ["jsonl", "tensorboard"], "where each step's scalars go; jsonl (RUN_DIR/metrics.jsonl) is always written: "
        "flowrl plot, flowrl compare and resuming read it")
    project: str = setting("flowrl", "W&B project and MLflow experiment", nonempty=True)
    name: str = setting("", "the run's name in W&B and MLflow; empty: the run directory's name")
    group: str = setting("", "W&B group (MLflow: a tag), e.g. one per comparison")
    tags: list[str] = setting([], "W&B tags (MLflow: one tag listing them)")
    wandb_entity: str = setting("", "W&B team or user; empty: the key's default")
    wandb_mode: Literal["auto", "online", "offline"] = setting(
        "auto", "auto: online when W&B has a key here (WANDB_API_KEY or `wandb login`), else offline: the run is "
        "written under RUN_DIR/wandb, to upload later with `wandb sync`")
    mlflow_tracking_uri: str = setting("", "an MLflow tracking server or store; empty: a SQLite store, "
                                       "RUN_DIR/mlflow.db")


@dataclass
class RunConfig:
    run_dir: str = setting("runs/flowrl", "checkpoints, metrics, logs and the resolved config.yaml", nonempty=True)
    dp: int = setting(1, "data-parallel size: the run has model.tp x model.pp x dp ranks", ge=1)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    z_head: ZHeadConfig = field(default_factory=ZHeadConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def world_size(self) -> int:
        return self.model.tp * self.model.pp * self.dp


def _allowed(hint: Any, f: dataclasses.Field) -> str:
    """What a field accepts, in words: its type, set or range."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    if origin in (types.UnionType, typing.Union):
        inner = next(a for a in typing.get_args(hint) if a is not type(None))
        return _allowed(inner, f) + ", or empty"
    if origin is list:
        item = typing.get_args(hint)[0]
        return "list, each " + (_allowed(item, f) if typing.get_origin(item) is Literal else item.__name__)
    bounds = str(f.metadata.get("bounds", ""))
    if f.metadata.get("nonempty"):
        bounds = ", not empty"
    return f"{hint.__name__} {bounds}".replace(" ,", ",").strip()


def settings_help(width: int = 100) -> str:
    """Every setting with its default, what it accepts and what it means, from the declarations above."""
    import textwrap

    lines: list[str] = []

    def section(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                continue
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            head = f"  {prefix}{f.name} = {default!r}  ({_allowed(hints[f.name], f)})"
            lines.append(head)
            lines.extend(textwrap.wrap(f.metadata["doc"], width, initial_indent=" " * 6, subsequent_indent=" " * 6))
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                section(hints[f.name], f"{prefix}{f.name}.")

    section(RunConfig, "")
    return "\n".join(lines)


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


def _check_range(where: str, f: dataclasses.Field, value: Any) -> Any:
    """``value`` if it lies in the field's declared range, else a UserError saying what is allowed."""
    bounds = f.metadata.get("bounds")
    if isinstance(value, int | float) and not isinstance(value, bool) and bounds and not bounds.holds(value):
        raise UserError(f"{where} must be {bounds}, got {value!r}.")
    if f.metadata.get("nonempty") and not value:
        raise UserError(f"{where} must not be empty.")
    return value


def _apply(obj: Any, path: str, values: dict[str, Any]) -> None:
    hints = typing.get_type_hints(type(obj))
    fields = {f.name: f for f in dataclasses.fields(obj)}
    names = list(fields)
    for key, value in values.items():
        where = f"{path}{key}"
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {path}{close[0]}?)" if close else f"; valid keys: {', '.join(names)}"
            raise UserError(f"unknown setting {where}{hint}.")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                first = dataclasses.fields(current)[0].name
                raise UserError(f"{where} is a section; set its keys, e.g. {where}.{first}=...")
            nested = dataclasses.replace(current)  # a copy: the defaults of other configs stay untouched
            _apply(nested, f"{where}.", value)
            object.__setattr__(obj, key, nested)
        else:  # object.__setattr__: some sections (AlgorithmConfig, ZHeadConfig) are frozen
            object.__setattr__(obj, key, _check_range(where, fields[key], _check_value(where, hints[key], value)))


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


def _read_recipe(path: Path, children: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A recipe's sections. ``base: other.yaml`` (a path relative to the recipe) starts from that recipe's sections
    and sets only what differs, so a baseline states its difference from the run it is compared with."""
    if not path.is_file():
        raise UserError(f"recipe {path} does not exist; see recipes/ for examples.")
    if path.resolve() in children:
        chain = " -> ".join(str(c) for c in (*children, path))
        raise UserError(f"recipe {path} is its own base ({chain}); remove one of the base: lines.")
    try:
        values = _load_yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"recipe {path} is not valid YAML: {e}".replace("\n", " ")) from None
    if not isinstance(values, dict):
        raise UserError(f"recipe {path} must be a mapping of sections (model:, data:, train: ...).")
    base = values.pop("base", None)
    if base is None:
        return values
    if not isinstance(base, str):
        raise UserError(f"base: in recipe {path} must be the path of another recipe, relative to it; got {base!r}.")
    return _merge(_read_recipe(path.parent / base, (*children, path.resolve())), values)


def load_config(recipe: str | Path | None, overrides: list[str] = (), check: bool = True) -> RunConfig:
    """Recipe file + overrides -> a ``RunConfig``, validated unless ``check`` is False (types always are)."""
    values = _read_recipe(Path(recipe)) if recipe is not None else {}
    for text in overrides:
        values = _merge(values, parse_override(text))
    cfg = RunConfig()
    _apply(cfg, "", values)
    if check:
        validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Every inconsistency between settings a run would hit later, now, in one sentence each (each setting's own
    range is checked as it is read)."""
    from flowrl_megatron.models.arch import load_arch

    m, d, r, t, ro = cfg.model, cfg.data, cfg.reward, cfg.train, cfg.rollout
    if not m.path:
        raise UserError("model.path is not set; point it at a Hugging Face model directory (config.json, tokenizer).")
    if not Path(m.path, "config.json").is_file():
        raise UserError(f"model.path {m.path} has no config.json; it must be a Hugging Face model directory.")
    if m.megatron_checkpoint and not Path(m.megatron_checkpoint, "flowrl_checkpoint.json").is_file():
        raise UserError(f"model.megatron_checkpoint {m.megatron_checkpoint} is not a converted checkpoint; make one "
                        "with python -m checkpoints_tools.hf_to_megatron, or leave it empty to convert at start.")
    arch = load_arch(m.path)
    arch.check_layout(m.tp, m.pp)
    if not d.train_files:
        raise UserError("data.train_files is empty; list parquet/jsonl/json files or a saved dataset directory.")
    for f in d.train_files:
        if not Path(f).exists():
            raise UserError(f"data file {f} does not exist.")
    from flowrl_megatron.rewards import check_reward_name

    check_reward_name(r.name)
    if ro.n < 2 and cfg.algorithm.normalization == "group":
        raise UserError(f"rollout.n={ro.n}: group-normalised rewards need at least 2 responses per prompt.")
    algo = cfg.algorithm
    if algo.kl_coef and algo.name not in ("grpo", "reinforce_pp", "ppo"):
        raise UserError(f"algorithm.kl_coef is a per-token penalty of grpo, reinforce_pp and ppo, not of {algo.name}; "
                        "set it to 0 (FlowRL's objective already holds the policy to the reference).")
    if r.overlong_buffer >= ro.max_response_tokens:
        raise UserError(f"reward.overlong_buffer={r.overlong_buffer} must be below rollout.max_response_tokens="
                        f"{ro.max_response_tokens} (DAPO: 4096 of 20480).")
    if t.prompts_per_step % t.mini_batch_prompts:
        raise UserError(f"train.prompts_per_step={t.prompts_per_step} is not a multiple of "
                        f"train.mini_batch_prompts={t.mini_batch_prompts}.")
    rows = t.mini_batch_prompts * ro.n
    longest = d.max_prompt_tokens + ro.max_response_tokens
    if 0 < t.max_tokens_per_micro_batch < longest:
        raise UserError(f"train.max_tokens_per_micro_batch={t.max_tokens_per_micro_batch} is below the longest "
                        f"sample (data.max_prompt_tokens + rollout.max_response_tokens = {longest}); raise it, or "
                        "set 0 for micro_batch_size samples per micro-batch.")
    if t.max_tokens_per_micro_batch and rows < cfg.dp:
        raise UserError(f"a mini-batch has {rows} sequences (mini_batch_prompts x n), fewer than dp={cfg.dp} ranks.")
    if not t.max_tokens_per_micro_batch and rows % (cfg.dp * t.micro_batch_size):
        raise UserError(f"a mini-batch has {rows} sequences (mini_batch_prompts x n), which does not split into "
                        f"dp={cfg.dp} ranks x micro_batch_size={t.micro_batch_size}; change one of them.")
    if longest > arch.max_position_embeddings:
        raise UserError(f"data.max_prompt_tokens + rollout.max_response_tokens = {longest} exceeds the model's "
                        f"max_position_embeddings ({arch.max_position_embeddings}); lower one of them.")
    if ro.engine_urls and len(ro.engine_urls) != ro.engines:
        raise UserError(f"rollout.engine_urls lists {len(ro.engine_urls)} engines but rollout.engines="
                        f"{ro.engines}; make them agree.")
    if t.distributed_optimizer:
        raise UserError("train.distributed_optimizer=true is not supported yet: its megatron-core 0.16.1 checkpoints "
                        "do not resume exactly; leave it false (Adam state then lives on every data-parallel rank).")
    backends = cfg.logging.backends
    if "jsonl" not in backends or len(set(backends)) < len(backends):
        raise UserError(f"logging.backends={backends} must list jsonl (flowrl plot, compare and resume read it) and "
                        "each backend once, e.g. [jsonl, tensorboard, wandb].")
    ev = cfg.eval
    if ev.every and not ev.files:
        raise UserError("eval.every is set but eval.files is empty; list the evaluation prompt files (the training "
                        "files work too) or set eval.every=0.")
    for f in ev.files:
        if not Path(f).exists():
            raise UserError(f"eval file {f} does not exist.")


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def write_run_config(cfg: RunConfig) -> Path:
    """The resolved config, saved in the run directory: what torchrun's ranks load, and the run's record."""
    from flowrl_megatron.files import write_text_atomic

    return write_text_atomic(Path(cfg.run_dir) / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
