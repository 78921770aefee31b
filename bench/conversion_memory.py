"""Peak memory of checkpoint conversion as the model grows: evidence that conversion streams.

For models that differ only in layer count, each conversion runs in a fresh process that,
after its imports, resets the kernel's peak-RSS mark (/proc/self/clear_refs) and reports how
far above its starting RSS the peak went (VmHWM - VmRSS; imports spike higher than a small
conversion, so the plain process peak would hide it). If conversion streams, peak memory stays flat while the model
grows; if it held the whole model, the peak would grow by at least the added model size.

    python bench/conversion_memory.py --layers 2 8 32
    python bench/conversion_memory.py --layers 2 12 --max-growth 0.25   # exits 1 above the bound

Printed "growth" = (peak at most layers - peak at fewest) / (model size difference), per
direction. Streaming means growth near 0; holding the model means growth >= 1.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MB = 1024**2


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def probe(mode: str, src: str, dst: str, shard_mb: int) -> None:
    """Run one conversion and print how many bytes its peak RSS rose above the RSS it started at."""
    from flowrl_megatron.conversion.convert import hf_to_megatron, megatron_to_hf

    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    start = _status_kb("VmRSS")
    if mode == "hf_to_megatron":
        hf_to_megatron(src, dst, tp=2, pp=1)
    else:
        megatron_to_hf(src, dst, max_shard_bytes=shard_mb * MB)
    print(json.dumps({"peak_rise": (_status_kb("VmHWM") - start) * 1024}))


def measure(mode: str, src: Path, dst: Path, shard_mb: int) -> int:
    cmd = [sys.executable, __file__, "--probe", mode, str(src), str(dst), "--shard-mb", str(shard_mb)]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rise"]


def run(layers: list[int], hidden: int, ffn: int, shard_mb: int) -> dict[str, float]:
    from flowrl_megatron.models.tiny import make_tiny_model

    rows = []
    with tempfile.TemporaryDirectory(prefix="flowrl-convmem-") as tmp:
        for n in layers:
            root = Path(tmp) / f"l{n}"
            src = make_tiny_model(root / "hf", num_hidden_layers=n, hidden_size=hidden, intermediate_size=ffn,
                                  num_attention_heads=hidden // 64, num_key_value_heads=2, head_dim=64,
                                  vocab_size=4096)
            model_bytes = (src / "model.safetensors").stat().st_size
            to_m = measure("hf_to_megatron", src, root / "mcore", shard_mb)
            to_h = measure("megatron_to_hf", root / "mcore", root / "back", shard_mb)
            rows.append((n, model_bytes, to_m, to_h))
    largest = 2 * ffn * hidden * 4
    print(f"hidden {hidden}, ffn {ffn}, fp32; largest single tensor (fused gate/up) {largest / MB:.1f} MB; "
          f"output shards {shard_mb} MB")
    header = f"{'layers':>6} {'model MB':>9} {'hf->megatron peak MB':>21} {'megatron->hf peak MB':>21}"
    print(header + "  (rise above start)")
    for n, size, a, b in rows:
        print(f"{n:>6} {size / MB:>9.1f} {a / MB:>21.1f} {b / MB:>21.1f}")
    (_, s0, a0, b0), (_, s1, a1, b1) = rows[0], rows[-1]
    growth = {"hf_to_megatron": (a1 - a0) / (s1 - s0), "megatron_to_hf": (b1 - b0) / (s1 - s0)}
    print("growth of peak per byte of model added: "
          + ", ".join(f"{k} {v:.3f}" for k, v in growth.items()) + "  (streaming ~0, whole model >= 1)")
    return growth


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[2, 8, 32], help="layer counts to compare")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=1536)
    p.add_argument("--shard-mb", type=int, default=16, help="output safetensors shard size for megatron_to_hf")
    p.add_argument("--max-growth", type=float, help="exit 1 if either direction's growth exceeds this")
    p.add_argument("--probe", nargs=3, metavar=("MODE", "SRC", "DST"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.probe:
        probe(*args.probe, shard_mb=args.shard_mb)
        return
    growth = run(sorted(args.layers), args.hidden, args.ffn, args.shard_mb)
    if args.max_growth is not None and max(growth.values()) > args.max_growth:
        print(f"FAIL: growth above {args.max_growth}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
