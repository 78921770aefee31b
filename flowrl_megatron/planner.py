"""Per-GPU memory of a run, before anything is allocated: ``flowrl plan RECIPE [key=value ...]``.

Trainer ranks (the largest pipeline stage, one tensor-parallel shard): weights in ``model.dtype``; fp32 gradient
buffers (Megatron DDP reduces in fp32); Adam state (fp32 moments, plus fp32 master weights under bf16), divided
by the data-parallel size with the distributed optimizer; the reference model's weights; the Z head; PPO's critic
(weights, gradients and Adam state of the same model without its vocabulary projection; its activations do not
add, its passes come after the policy's with the same micro-batches and no logits); activations
of the micro-batches a 1F1B pipeline keeps in flight (up to PP of them on the first stage), with full recompute
only each layer's input, plus one layer's working set (Korthikanti et al. 2022: 10 + 24/TP bytes per token and
hidden unit at 16 bits with flash attention, plus 5 a s / (h TP) for unfused attention's scores); the last
stage's vocab-parallel logits and their gradient. Engines: weights over the engine's TP, and the KV cache of
full-length sequences in what ``gpu_memory_utilization`` leaves. A layout fails when a trainer rank exceeds the
GPU, or when an engine cannot hold one prompt's ``rollout.n`` full-length sequences.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from flowrl_megatron.config import RunConfig
from flowrl_megatron.models.arch import ModelArch

GIB = 1024**3
CUDA_CONTEXT_GIB = 3.0  # CUDA context, NCCL buffers, allocator fragmentation: measured 2-4 GiB on H100s
ENGINE_UTILIZATION = 0.85  # rollout.engines' gpu_memory_utilization (EngineConfig)


@dataclass(frozen=True)
class Line:
    name: str
    bytes: float
    note: str = ""


def layer_params(arch: ModelArch) -> int:
    h, d = arch.hidden_size, arch.head_dim
    q, kv = arch.num_heads * d, arch.num_kv_heads * d
    attention = h * q + 2 * h * kv + q * h + (q + 2 * kv if arch.qkv_bias else 0) + (2 * d if arch.qk_norm else 0)
    return attention + 3 * h * arch.ffn_hidden_size + 2 * h


def total_params(arch: ModelArch, padded: bool = False) -> int:
    """Every parameter of the model (Qwen2.5-32B: 32,763,876,352 with its 152,064-token vocabulary)."""
    vocab = arch.padded_vocab_size if padded else arch.vocab_size
    embeddings = vocab * arch.hidden_size * (1 if arch.tie_embeddings else 2)
    return arch.num_layers * layer_params(arch) + embeddings + arch.hidden_size


def stage_params(arch: ModelArch, tp: int, pp: int) -> int:
    """Parameters of the largest pipeline stage on one tensor-parallel rank (norms counted as if sharded)."""
    layers = arch.num_layers // pp * layer_params(arch)
    embedding = arch.padded_vocab_size * arch.hidden_size
    if pp == 1:
        stage = layers + embedding * (1 if arch.tie_embeddings else 2) + arch.hidden_size
    else:  # the first stage holds the embedding, the last the output layer (a copy when tied) and the final norm
        stage = layers + embedding + arch.hidden_size
    return stage // tp


def critic_params(arch: ModelArch, tp: int, pp: int) -> int:
    """PPO's critic on the largest stage of one tensor-parallel rank: the policy's stage without a vocabulary
    projection of its own (counted as a tied model's), and the replicated Linear(h, 1) value head on the last
    stage."""
    stage = stage_params(dataclasses.replace(arch, tie_embeddings=True), tp, pp)
    return stage + (arch.hidden_size + 1 if pp == 1 else 0)  # with pp > 1 the embedding's first stage is larger


def z_head_params(arch: ModelArch, cfg: RunConfig) -> int:
    """Two hidden Linear(h, h) blocks (each with a LayerNorm in the authors' variant) and Linear(h, 1)."""
    h = arch.hidden_size
    norms = 2 * 2 * h if cfg.z_head.variant == "authors" else 0
    return 2 * (h * h + h) + norms + h + 1 if cfg.algorithm.needs_log_z else 0


def trainer_lines(cfg: RunConfig, arch: ModelArch, attention: str = "flash") -> list[Line]:
    m, t, ro = cfg.model, cfg.train, cfg.rollout
    tp, pp = m.tp, m.pp
    width = 2 if m.dtype == "bfloat16" else 4
    params = stage_params(arch, tp, pp)
    adam = (12 if m.dtype == "bfloat16" else 8) / (cfg.dp if t.distributed_optimizer else 1)
    z = z_head_params(arch, cfg)
    seq = cfg.data.max_prompt_tokens + ro.max_response_tokens
    tokens = t.max_tokens_per_micro_batch or seq * t.micro_batch_size
    h = arch.hidden_size
    layers = arch.num_layers // pp
    scale = width / 2  # the activation constants are for 16-bit activations
    # unfused attention (megatron-core's local spec, as on CPU) also keeps the score matrices: 5 a s / h more
    scores = 5 * arch.num_heads * seq / h if attention == "unfused" else 0.0
    working = tokens * h * (10 + 24 / tp + scores / tp) * scale
    stored = layers * (tokens * h * width if t.recompute == "full" else working)
    rows = t.mini_batch_prompts * ro.n // cfg.dp
    micro_batches = rows if t.max_tokens_per_micro_batch else rows // t.micro_batch_size  # a budget: at worst 1 each
    in_flight = min(pp, micro_batches)
    vocab = arch.padded_vocab_size // tp
    lines = [
        Line("weights", params * width, f"{params / 1e9:.2f}B parameters in {m.dtype}"),
        Line("gradients", params * 4, "fp32 buffers"),
        Line("optimizer", params * adam,
             "Adam" + (f", distributed over dp={cfg.dp}" if t.distributed_optimizer else ", not distributed")),
    ]
    if cfg.algorithm.needs_log_z or cfg.algorithm.kl_coef or cfg.eval.every:
        lines.append(Line("reference model", params * width, "weights only"))
    if z:
        lines.append(Line("Z head", z * (width + 4 + adam), "weights, gradients, optimizer"))
    if cfg.algorithm.needs_critic:
        critic = critic_params(arch, tp, pp)
        lines.append(Line("critic", critic * (width + 4 + adam),
                          f"{critic / 1e9:.2f}B parameters: weights, gradients, optimizer"))
    lines += [
        Line("activations", in_flight * stored + working,
             f"{in_flight} micro-batch(es) in flight x {layers} layers, recompute={t.recompute}, "
             f"{tokens} tokens per micro-batch"),
        Line("logits", tokens * vocab * (width + 4), f"vocab shard {vocab}, and its fp32 gradient"),
        Line("CUDA context and workspace", CUDA_CONTEXT_GIB * GIB),
    ]
    return lines


def engine_lines(cfg: RunConfig, arch: ModelArch, gpu_gib: float) -> tuple[list[Line], float]:
    """Per-GPU lines of one rollout engine, and how many full-length sequences its KV cache holds."""
    etp = cfg.rollout.engine_tp
    weights = total_params(arch, padded=False) * 2 / etp  # bf16 serving
    kv_heads = max(arch.num_kv_heads // etp, 1)
    per_token = 2 * arch.num_layers * kv_heads * arch.head_dim * 2
    seq = cfg.data.max_prompt_tokens + cfg.rollout.max_response_tokens
    budget = ENGINE_UTILIZATION * gpu_gib * GIB - weights - CUDA_CONTEXT_GIB * GIB
    capacity = max(budget, 0) / (per_token * seq)
    lines = [Line("engine weights", weights, f"bf16, engine TP {etp}"),
             Line("KV cache per sequence", per_token * seq, f"{seq} tokens x {per_token / 1024:.0f} KiB"),
             Line("KV cache space", max(budget, 0), f"{ENGINE_UTILIZATION:.0%} of the GPU less weights and context")]
    return lines, capacity


@dataclass
class Plan:
    trainer: list[Line]
    engine: list[Line]
    sequences_per_engine: float
    gpu_gib: float
    n: int
    recompute: str

    @property
    def trainer_total(self) -> float:
        return sum(line.bytes for line in self.trainer)

    def problems(self) -> list[str]:
        out = []
        if self.trainer_total > self.gpu_gib * GIB:
            largest = max(self.trainer, key=lambda line: line.bytes)
            recompute = "" if self.recompute == "full" else " set train.recompute=full,"
            out.append(f"a trainer rank needs {self.trainer_total / GIB:.1f} GiB of a {self.gpu_gib:.0f} GiB GPU "
                       f"(largest: {largest.name}, {largest.bytes / GIB:.1f} GiB); raise model.tp or model.pp,"
                       f"{recompute} or lower train.micro_batch_size (or max_tokens_per_micro_batch).")
        if self.sequences_per_engine < self.n:
            out.append(f"a rollout engine's KV cache holds {self.sequences_per_engine:.1f} full-length sequences, "
                       f"fewer than one prompt's rollout.n={self.n}; raise rollout.engine_tp or shorten "
                       "the sequences.")
        return out

    def render(self) -> str:
        rows = [f"trainer rank (largest stage), GPU {self.gpu_gib:.0f} GiB:"]
        rows += [f"  {line.name:<28}{line.bytes / GIB:9.2f} GiB  {line.note}" for line in self.trainer]
        rows.append(f"  {'total':<28}{self.trainer_total / GIB:9.2f} GiB")
        rows.append("rollout engine, per GPU:")
        rows += [f"  {line.name:<28}{line.bytes / GIB:9.2f} GiB  {line.note}" for line in self.engine]
        rows.append(f"  {'full-length sequences':<28}{self.sequences_per_engine:9.1f}      (rollout.n = {self.n})")
        return "\n".join(rows)


def plan(cfg: RunConfig, arch: ModelArch, gpu_gib: float = 80.0, attention: str = "flash") -> Plan:
    """``attention``: "flash" (transformer-engine on GPU) or "unfused" (the local layer spec)."""
    engine, capacity = engine_lines(cfg, arch, gpu_gib)
    return Plan(trainer_lines(cfg, arch, attention), engine, capacity, gpu_gib, cfg.rollout.n, cfg.train.recompute)
