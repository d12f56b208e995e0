"""inspect-adapter on a full-size Kimi-Audio adapter (r=64, all targets) vs `python -c "import safetensors"`.

    python benchmarks/inspect_speed.py [--rank 64] [--dtype float32] [--repeat 3]

The adapter is written with safetensors directly (no model): lora_A / lora_B for every linear
layer of the 7B release config (28 main + 6 mimo layers x 7 projections + the vq_adaptor's two).
Target (issue #4): `kimi-lora inspect-adapter ADAPTER` wall time close to importing safetensors,
because it reads adapter_config.json and the safetensors header only. `--stats` (which reads
every tensor) is timed for reference.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _adapter_bench import kimi_linear_shapes, measure, write_random_adapter  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()

    from kimi_lora_cli.models.kimi_audio.configuration import KimiAudioConfig

    work = Path(tempfile.mkdtemp(prefix="inspect-bench-", dir=args.workdir))
    try:
        shapes = kimi_linear_shapes(KimiAudioConfig())
        adapter = write_random_adapter(work / "adapter", shapes, r=args.rank, dtype=args.dtype)
        size = (adapter / "adapter_model.safetensors").stat().st_size
        print(f"adapter: r={args.rank}, {len(shapes)} modules, {size / 2**20:.0f} MB ({args.dtype})", flush=True)
        cli = [sys.executable, "-m", "kimi_lora_cli", "inspect-adapter", str(adapter)]
        base_t, base_rss = measure([sys.executable, "-c", "import safetensors"], repeat=args.repeat)
        bare_t, _ = measure([sys.executable, "-c", "pass"], repeat=args.repeat)
        help_t, _ = measure([sys.executable, "-m", "kimi_lora_cli", "--help"], repeat=args.repeat)
        table_t, table_rss = measure(cli, repeat=args.repeat)
        json_t, _ = measure([*cli, "--json"], repeat=args.repeat)
        stats_t, stats_rss = measure([*cli, "--stats"], repeat=1)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"python -c 'import safetensors': {base_t:.3f} s, peak RSS {base_rss:.0f} MB (bare python {bare_t:.3f} s)")
    print(f"kimi-lora --help:                {help_t:.3f} s")
    print(f"inspect-adapter (table):         {table_t:.3f} s, peak RSS {table_rss:.0f} MB "
          f"-> {table_t / base_t:.2f}x import safetensors")
    print(f"inspect-adapter --json:          {json_t:.3f} s -> {json_t / base_t:.2f}x import safetensors")
    print(f"inspect-adapter --stats:         {stats_t:.3f} s, peak RSS {stats_rss:.0f} MB (reads all tensors)")
    print(f"inspect-adapter beyond `kimi-lora --help` (CLI start-up): {table_t - help_t:+.3f} s")


if __name__ == "__main__":
    main()
