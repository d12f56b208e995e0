"""Per-process host memory and speed of two-process LoRA training on the CPU: DeepSpeed ZeRO-3 vs DDP vs
FSDP (and ZeRO-2), on the same checkpoint.

    python benchmarks/train_deepspeed_memory.py [--size-gb 1.0] [--steps 4] [--workdir DIR]
                                                [--no-gradient-checkpointing] [--runs ddp,fsdp,zero2,zero3]

The setup of benchmarks/train_fsdp_memory.py: a Kimi-Audio-shaped float32 checkpoint of about --size-gb
(release layout) and a small synthetic dataset; LoRA for --steps with a global batch of 4 samples
(2 processes x micro-batch 2) and gradient checkpointing, each run in fresh processes under torchrun.
Reports the peak RSS of the largest process of each run and steps/s after the first step (from the
run's metrics), side by side. ZeRO-3 builds each layer, keeps this process's half and frees the rest
(kimi-lora's partitioned build), so its peak should sit near FSDP's, well under DDP's whole copy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _adapter_bench import measure, warm_page_cache  # noqa: E402
from train_fsdp_memory import setup_runs, steps_per_second  # noqa: E402

ENGINES = {"ddp": ("2 x DDP", []), "fsdp": ("2 x FSDP", ["--fsdp"]), "zero2": ("2 x ZeRO-2", ["--deepspeed", "zero2"]),
           "zero3": ("2 x ZeRO-3", ["--deepspeed", "zero3"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--no-gradient-checkpointing", action="store_true", help="keep every layer's activations")
    ap.add_argument("--runs", default="ddp,fsdp,zero2,zero3", help="comma list of " + ", ".join(ENGINES))
    args = ap.parse_args()

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    work = Path(tempfile.mkdtemp(prefix="deepspeed-bench-", dir=args.workdir))
    results = {}
    try:
        base, train, torchrun = setup_runs(work, args.size_gb, args.steps, not args.no_gradient_checkpointing)
        size = sum(f.stat().st_size for f in base.glob("model-*.safetensors"))
        for key in args.runs.split(","):
            name, extra = ENGINES[key.strip()]
            out = work / key
            seconds, rss = measure([*torchrun, *train, *extra, "--output-dir", str(out)],
                                   before=lambda: warm_page_cache([base]))
            results[name] = {"peak_rss_mb": rss, "steps_per_s": steps_per_second(out), "wall_s": seconds}
            print(f"  {name:11s}: peak RSS per process {rss:7.0f} MB, {results[name]['steps_per_s']:.3f} steps/s, "
                  f"{seconds:.1f} s in all", flush=True)
            shutil.rmtree(out, ignore_errors=True)
        _, imports_rss = measure([sys.executable, "-c", "import torch, transformers, peft, accelerate, deepspeed"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(f"(imports alone, deepspeed included: peak RSS {imports_rss:.0f} MB per process)")
    if "2 x DDP" in results:
        ddp = results["2 x DDP"]
        for name, r in results.items():
            print(f"{name:11s}: {r['peak_rss_mb'] / ddp['peak_rss_mb']:.2f}x DDP's peak RSS per process, "
                  f"{r['steps_per_s'] / ddp['steps_per_s']:.2f}x its steps/s")
    print(json.dumps({"size_gb": round(size / 2**30, 3), "gradient_checkpointing": not args.no_gradient_checkpointing,
                      "imports_rss_mb": imports_rss, **results}))


if __name__ == "__main__":
    main()
