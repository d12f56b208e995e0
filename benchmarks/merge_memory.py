"""kimi-lora merge vs whole-model peft merge vs plain copy, on a synthetic multi-shard checkpoint.

    python benchmarks/merge_memory.py [--size-gb 2.5] [--rank 16] [--workdir DIR]

Builds a Kimi-Audio-shaped bfloat16 checkpoint of about --size-gb (release layout: config, index,
~500 MB shards, whisper-large-v3/, tokenizer) with the tiny builder at larger sizes, plus a random
rank --rank adapter on every linear layer. Then, each in its own process, side by side:
  1. `kimi-lora merge` (streaming),
  2. load the whole model + peft `merge_and_unload` + save the state dict in 5 GB shards,
  3. `cp -r` of the checkpoint folder.
Targets (issue #4): merge peak RSS <= largest shard + adapter + 0.5 GB, >= 3x less than the peft
path, and wall time within 2x of the plain copy.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _adapter_bench import kimi_linear_shapes, measure, warm_page_cache, write_random_adapter  # noqa: E402

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS = 1024, 5376, 8, 2


def build_base(folder: Path, size_gb: float) -> Path:
    from kimi_lora_cli.models.kimi_audio.tiny import TinySpec, build_tiny_checkpoint

    kv = KV_HEADS * HIDDEN // HEADS
    per_layer = 2 * (2 * HIDDEN * HIDDEN + 2 * kv * HIDDEN + 3 * HIDDEN * INTERMEDIATE)  # bf16 bytes
    layers = max(4, round(size_gb * 1e9 / per_layer))
    main = max(3, round(layers * 28 / 34))
    mimo = max(1, layers - main)
    spec = TinySpec(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=main,
                    num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, mimo_layers=mimo,
                    mimo_from_layer=round(main * 21 / 28), audio_codes=16384, whisper_d_model=1280,
                    whisper_heads=20, whisper_ffn=64, dtype="bfloat16",
                    num_shards=math.ceil(size_gb / 0.5) + 1)
    return build_tiny_checkpoint(folder, spec)


def peft_path(base: str, adapter: str, out: str) -> None:
    """What users do today: the whole model in memory, peft merge, save."""
    from huggingface_hub import save_torch_state_dict
    from peft import PeftModel

    from kimi_lora_cli.loading import load_model

    loaded = load_model(base, dtype="bfloat16", load_whisper=False, load_tokenizer_=False)
    model = PeftModel.from_pretrained(loaded.model, adapter).merge_and_unload()
    Path(out).mkdir(parents=True)
    save_torch_state_dict(model.state_dict(), out, max_shard_size="5GB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=2.5)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--peft-path", nargs=3, metavar=("BASE", "ADAPTER", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peft_path:
        peft_path(*args.peft_path)
        return

    from kimi_lora_cli.models.kimi_audio.configuration import KimiAudioConfig

    work = Path(tempfile.mkdtemp(prefix="merge-bench-", dir=args.workdir))
    try:
        print(f"building a {args.size_gb:g} GB synthetic checkpoint in {work} ...", flush=True)
        base = build_base(work / "base", args.size_gb)
        cfg = KimiAudioConfig.from_json_file(base / "config.json")
        adapter = write_random_adapter(work / "adapter", kimi_linear_shapes(cfg), r=args.rank)
        shards = sorted(base.glob("model-*.safetensors"))
        total = sum(f.stat().st_size for f in base.rglob("*") if f.is_file())
        largest = max(f.stat().st_size for f in shards) / 2**20
        adapter_mb = (adapter / "adapter_model.safetensors").stat().st_size / 2**20
        print(f"base: {total / 2**30:.2f} GiB in {len(shards)} shards (largest {largest:.0f} MB), "
              f"{cfg.num_hidden_layers}+{cfg.kimia_mimo_layers} layers, hidden {cfg.hidden_size}; "
              f"adapter r={args.rank} on {len(kimi_linear_shapes(cfg))} modules, {adapter_mb:.0f} MB", flush=True)

        def warm():
            warm_page_cache([base, adapter])

        outs = {k: work / k for k in ("copy", "merge", "peft")}
        results = {}
        cmds = {
            "copy": ["cp", "-r", str(base), str(outs["copy"])],
            "merge": [sys.executable, "-m", "kimi_lora_cli", "merge", "-m", str(base), "-a", str(adapter),
                      "-o", str(outs["merge"])],
            "peft": [sys.executable, __file__, "--peft-path", str(base), str(adapter), str(outs["peft"])],
        }
        for name, cmd in cmds.items():
            results[name] = measure(cmd, before=warm)
            shutil.rmtree(outs[name], ignore_errors=True)
            print(f"  {name:5s}: {results[name][0]:6.1f} s, peak RSS {results[name][1]:7.0f} MB", flush=True)
        torch_t, torch_rss = measure([sys.executable, "-c", "import torch"])
    finally:
        shutil.rmtree(work, ignore_errors=True)

    (ct, crss), (mt, mrss), (pt, prss) = results["copy"], results["merge"], results["peft"]
    budget = largest + adapter_mb + 512
    print()
    print(f"kimi-lora merge:           {mt:6.1f} s  peak RSS {mrss:6.0f} MB")
    print(f"peft merge_and_unload:     {pt:6.1f} s  peak RSS {prss:6.0f} MB")
    print(f"plain copy (cp -r):        {ct:6.1f} s  peak RSS {crss:6.0f} MB")
    print(f"(python -c 'import torch': peak RSS {torch_rss:.0f} MB)")
    print(f"memory: merge {mrss:.0f} MB vs budget largest shard + adapter + 512 MB = {budget:.0f} MB "
          f"-> {'OK' if mrss <= budget else 'OVER'}")
    print(f"memory: peft / merge = {prss / mrss:.1f}x (target >= 3x) -> {'OK' if prss / mrss >= 3 else 'MISS'}")
    print(f"time:   merge / copy = {mt / ct:.2f}x (target <= 2x) -> {'OK' if mt / ct <= 2 else 'MISS'}; "
          f"peft / merge = {pt / mt:.1f}x")
    print(json.dumps({"size_gb": args.size_gb, "copy": results["copy"], "merge": results["merge"],
                      "peft": results["peft"], "largest_shard_mb": largest, "adapter_mb": adapter_mb}))


if __name__ == "__main__":
    main()
