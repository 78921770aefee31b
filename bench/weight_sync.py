"""Weight sync against a raw transfer of the same bytes over the same transport, measured in one run.

Sync: ``WeightSync.send()`` from a Megatron model in this process to a real vLLM engine (gather
through the mapping, bucket packing, vLLM's control-plane calls, the engine's layerwise reload
and ``load_weights``). Raw: the same bucket buffers, already packed, broadcast over a gloo group
to a bare receiver process that does nothing with them. Target: ratio <= 1.5.

    python bench/weight_sync.py [--hidden 512] [--layers 8] [--vocab 32000] [--bucket-mib 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

RECEIVER = """
import sys, json, torch
from flowrl_megatron.rollout.gloo_group import broadcast, join_group
port, sizes, rounds = int(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])
group = join_group("127.0.0.1", port, 1, 2, 600)
for _ in range(rounds):
    for n in sizes:
        broadcast(group, torch.empty(n, dtype=torch.uint8))
"""


def raw_seconds(buffers: list, rounds: int) -> list[float]:
    from flowrl_megatron.rollout.gloo_group import broadcast, gloo_group, rendezvous_store

    store = rendezvous_store("127.0.0.1", 0, 0, 2, 600)
    sizes = json.dumps([b.numel() for b in buffers])
    proc = subprocess.Popen([sys.executable, "-c", RECEIVER, str(store.port), sizes, str(rounds)], cwd=REPO)
    group = gloo_group(store, 0, 2, 600)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for b in buffers:
            broadcast(group, b)
        times.append(time.perf_counter() - start)
    proc.wait(timeout=60)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--bucket-mib", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    from flowrl_megatron.models.arch import load_arch
    from flowrl_megatron.models.gpt import build_gpt_model
    from flowrl_megatron.models.tiny import make_tiny_model
    from flowrl_megatron.rollout.engines import EngineConfig, EngineGroup
    from flowrl_megatron.rollout.weight_buckets import buckets, pack
    from flowrl_megatron.rollout.weight_sync import EnginesClient, MegatronWeightSource, WeightSync
    from flowrl_megatron.runtime import ParallelLayout, init_model_parallel, shutdown

    bucket_bytes = args.bucket_mib * 1024**2
    with tempfile.TemporaryDirectory(prefix="flowrl-bench-sync-") as tmp:
        model_dir = Path(tmp, "model")
        make_tiny_model(model_dir, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, head_dim=64,
                        num_key_value_heads=2, vocab_size=args.vocab)
        arch = load_arch(model_dir)
        init_model_parallel(ParallelLayout(tp=1, pp=1))
        model = build_gpt_model(arch)
        source = MegatronWeightSource(model, arch)
        buffers = [pack(b) for b in buckets(source, bucket_bytes)]
        nbytes = sum(b.numel() for b in buffers)
        with EngineGroup(EngineConfig(model=str(model_dir), max_model_len=256), 1, Path(tmp, "logs")) as group:
            client = EnginesClient([e.url for e in group.engines], [1], group.api_key)
            sync = WeightSync(source, client, backend="gloo", bucket_bytes=bucket_bytes).connect()
            sync.send()  # warm-up
            sync_times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                sync.send()
                sync_times.append(time.perf_counter() - start)
            sync.close()
        raw = raw_seconds(buffers, args.repeats + 1)[1:]
        shutdown()

    s, r = statistics.median(sync_times), statistics.median(raw)
    gb = nbytes / 1e9
    print(f"model {gb:.3f} GB in {len(buffers)} buckets of <= {args.bucket_mib} MiB, median of {args.repeats}")
    print(f"sync {s:.3f} s ({gb / s:.2f} GB/s)   raw gloo broadcast {r:.3f} s ({gb / r:.2f} GB/s)")
    print(f"ratio sync/raw = {s / r:.2f}  (target <= 1.5)")


if __name__ == "__main__":
    main()
