"""Training throughput on CPU, tiny model: micro-batch 8 versus micro-batch 1 (the official limit).

Same data, same model, one process; Whisper features are cached before timing so only training
steps are measured. Prints tokens/s for both and the ratio (target: >= 3x).

    python benchmarks/train_batch.py [--samples 64] [--hidden 64]
"""

from __future__ import annotations

import argparse
import shutil


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=64)
    args = ap.parse_args()

    from _tiny_train import run, workspace

    root, model, data = workspace(args.samples, {"hidden_size": args.hidden, "intermediate_size": 2 * args.hidden})
    cache = root / "features"
    try:
        run(model, data, root / "warm", max_steps=1, per_device_train_batch_size=args.samples,
            feature_cache_dir=str(cache))  # fills the feature cache
        results = {}
        for mb in (1, 8):
            _, res = run(model, data, root / f"mb{mb}", num_train_epochs=1, per_device_train_batch_size=mb,
                         feature_cache_dir=str(cache))
            results[mb] = res.tokens / res.seconds
            print(f"micro-batch {mb}: {res.global_step} steps, {res.tokens} tokens in {res.seconds:.2f} s "
                  f"-> {results[mb]:.0f} tokens/s")
        ratio = results[8] / results[1]
        print(f"ratio micro-batch 8 / micro-batch 1: {ratio:.2f}x (target >= 3x) {'OK' if ratio >= 3 else 'BELOW'}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
