"""Per-process host memory of multi-process LoRA training on the CPU: FSDP vs DDP vs one process.

    python benchmarks/train_fsdp_memory.py [--size-gb 1.0] [--steps 4] [--workdir DIR] [--no-gradient-checkpointing]

Builds a Kimi-Audio-shaped float32 checkpoint of about --size-gb (release layout, the tiny builder at
larger sizes) and a small synthetic dataset, then trains LoRA for --steps with the same global batch
(4 samples) and gradient checkpointing three ways, each in fresh processes, side by side:
  1. one process (micro-batch 2 x 2 accumulation steps),
  2. two processes, DDP (torchrun, micro-batch 2),
  3. two processes, FSDP (torchrun, `--fsdp`, micro-batch 2).
Reports the peak RSS of the largest process of each run (the launcher's own process is smaller) and
steps/s after the first step (from the run's metrics). Target (issue #14): the FSDP per-process peak
at most 0.6x the DDP one.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _adapter_bench import measure, warm_page_cache  # noqa: E402

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS = 1024, 2816, 8, 2


def build_base(folder: Path, size_gb: float) -> Path:
    from kimi_lora_cli.models.kimi_audio.tiny import TinySpec, build_tiny_checkpoint

    kv = KV_HEADS * HIDDEN // HEADS
    per_layer = 4 * (2 * HIDDEN * HIDDEN + 2 * kv * HIDDEN + 3 * HIDDEN * INTERMEDIATE)  # float32 bytes
    layers = max(4, round(size_gb * 1e9 / per_layer))
    main = max(3, round(layers * 28 / 34))
    spec = TinySpec(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=main,
                    num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, mimo_layers=max(1, layers - main),
                    mimo_from_layer=round(main * 21 / 28), num_shards=5)
    return build_tiny_checkpoint(folder, spec)


def steps_per_second(folder: Path) -> float:
    records = [json.loads(x) for x in (folder / "logs" / "metrics.jsonl").read_text().splitlines()]
    times = [r["elapsed_seconds"] for r in records if "loss" in r]
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else float("nan")


def setup_runs(work: Path, size_gb: float, steps: int, checkpointing: bool) -> tuple[Path, list[str], list[str]]:
    """The ~size_gb checkpoint and data in `work`, the `train` arguments every compared run shares (LoRA,
    CPU, micro-batch 2; gradient checkpointing, what one uses when memory is short) and the 2-process
    torchrun prefix. Shared with train_deepspeed_memory.py."""
    from kimi_lora_cli.data.synthetic import write_synthetic_dataset
    from kimi_lora_cli.models.kimi_audio.configuration import KimiAudioConfig

    print(f"building a {size_gb:g} GB synthetic checkpoint in {work} ...", flush=True)
    base = build_base(work / "base", size_gb)
    cfg = KimiAudioConfig.from_json_file(base / "config.json")
    data = write_synthetic_dataset(work / "data", cfg.to_dict(), n=8, seed=0, task="mixed")
    size = sum(f.stat().st_size for f in base.glob("model-*.safetensors"))
    print(f"base: {size / 2**30:.2f} GiB float32, {cfg.num_hidden_layers}+{cfg.kimia_mimo_layers} layers, "
          f"hidden {cfg.hidden_size}", flush=True)
    train = ["train", "--model-name-or-path", str(base), "--data-path", str(data), "--use-lora",
             "--lora-dropout", "0", "--max-steps", str(steps), "--logging-steps", "1", "--save-steps",
             "100000", "--device", "cpu", "--per-device-train-batch-size", "2"]
    if checkpointing:
        train.append("--gradient-checkpointing")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "kimi_lora_cli"]
    return base, train, torchrun


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--no-gradient-checkpointing", action="store_true",
                    help="keep every layer's activations (all three runs)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fsdp-bench-", dir=args.workdir))
    try:
        base, train, torchrun = setup_runs(work, args.size_gb, args.steps, not args.no_gradient_checkpointing)
        size = sum(f.stat().st_size for f in base.glob("model-*.safetensors"))
        runs = {
            "one process": [sys.executable, "-m", "kimi_lora_cli", *train, "--gradient-accumulation-steps", "2"],
            "2 x DDP": [*torchrun, *train],
            "2 x FSDP": [*torchrun, *train, "--fsdp"],
        }
        results = {}
        for name, cmd in runs.items():
            out = work / name.replace(" ", "-")
            seconds, rss = measure([*cmd, "--output-dir", str(out)], before=lambda: warm_page_cache([base]))
            results[name] = {"peak_rss_mb": rss, "steps_per_s": steps_per_second(out), "wall_s": seconds}
            print(f"  {name:12s}: peak RSS per process {rss:7.0f} MB, {results[name]['steps_per_s']:.3f} steps/s, "
                  f"{seconds:.1f} s in all", flush=True)
            shutil.rmtree(out, ignore_errors=True)
        _, torch_rss = measure([sys.executable, "-c", "import torch, transformers, peft, accelerate"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    fsdp, ddp = results["2 x FSDP"]["peak_rss_mb"], results["2 x DDP"]["peak_rss_mb"]
    ratio = fsdp / ddp
    print()
    print(f"(imports alone: peak RSS {torch_rss:.0f} MB per process; above that FSDP {fsdp - torch_rss:.0f} MB vs DDP "
          f"{ddp - torch_rss:.0f} MB = {(fsdp - torch_rss) / (ddp - torch_rss):.2f}x)")
    print(f"FSDP / DDP peak RSS per process = {ratio:.3f}x (target <= 0.6x) -> {'OK' if ratio <= 0.6 else 'MISS'}")
    print(json.dumps({"size_gb": round(size / 2**30, 3), "gradient_checkpointing": not args.no_gradient_checkpointing,
                      "imports_rss_mb": torch_rss, **results}))


if __name__ == "__main__":
    main()
