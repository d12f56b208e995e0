"""Benchmark: decode tokens/s at 64 versus 512 generated tokens (CPU, tiny model).

    python benchmarks/infer_decode.py [--short 64] [--long 512] [--threads 1] [--no-recompute]

With the KV cache each step feeds one (audio, text) pair, so the per-token rate stays nearly
flat as the output grows (only attention over the cache gets longer). The same is measured
with full recomputation (no cache) as the contrast, where the per-step cost grows with length.
Prefill is timed apart and excluded from the decode rate.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--short", type=int, default=64)
    ap.add_argument("--long", type=int, default=512)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--no-recompute", action="store_true", help="skip the no-cache contrast")
    args = ap.parse_args()

    import torch

    from kimi_lora_cli.inference.generation import GenerationConfig, StreamTokens, generate
    from kimi_lora_cli.inference.prompts import build_prompts
    from kimi_lora_cli.loading import load_model
    from kimi_lora_cli.models.kimi_audio.tiny import build_tiny_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_model(build_tiny_checkpoint(Path(tmp) / "tiny"), dtype="float32")
    tok, cfg = loaded.tokenizer, loaded.config
    st = StreamTokens.from_model(tok, cfg)
    conv = [{"role": "user", "message_type": "text", "content": "please transcribe the spoken content into written text."}]
    prompts = build_prompts([conv], tok, cfg, None, "text")

    def rate(n: int, cache: bool) -> tuple[float, int]:
        gcfg = GenerationConfig("text", max_new_tokens=n, use_cache=cache)
        t0 = time.perf_counter()
        generate(loaded.model, prompts, GenerationConfig("text", max_new_tokens=1, use_cache=cache), st)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        [r] = generate(loaded.model, prompts, gcfg, st)
        dt = time.perf_counter() - t0 - prefill
        return (r.steps - 1) / dt, r.steps

    rate(16, True)  # warm-up
    print(f"infer_decode: prompt {len(prompts[0])} positions, batch 1, CPU tiny model, {torch.get_num_threads()} threads")
    print(f"{'mode':>10} {'tokens':>7} {'tokens/s':>10}")
    results = {}
    for cache in (True, False) if not args.no_recompute else (True,):
        for n in (args.short, args.long):
            tps, steps = rate(n, cache)
            results[(cache, n)] = tps
            note = "" if steps == n else f" (stopped at eos after {steps})"
            print(f"{'kv-cache' if cache else 'recompute':>10} {n:>7} {tps:>10.1f}{note}")
    flat = results[(True, args.long)] / results[(True, args.short)]
    print(f"kv-cache: tokens/s at {args.long} / at {args.short} = {flat:.2f} (1.0 = perfectly flat)")
    if not args.no_recompute:
        print(f"recompute: tokens/s at {args.long} / at {args.short} = "
              f"{results[(False, args.long)] / results[(False, args.short)]:.2f}")


if __name__ == "__main__":
    main()
