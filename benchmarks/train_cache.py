"""Epoch 2 versus epoch 1 of training: Whisper features are computed once (epoch 1) and cached.

Two epochs of LoRA training on the tiny model in one run; epoch times come from the run's own
metrics (elapsed seconds at each step). Prints both times and the ratio.

    python benchmarks/train_cache.py [--samples 32]
"""

from __future__ import annotations

import argparse
import json
import shutil


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()

    from _tiny_train import run, workspace

    root, model, data = workspace(args.samples)
    try:
        trainer, res = run(model, data, root / "out", num_train_epochs=2, per_device_train_batch_size=args.batch)
        records = [json.loads(x) for x in (root / "out" / "logs" / "metrics.jsonl").read_text().splitlines()]
        per_epoch = trainer.steps_per_epoch
        t1 = records[per_epoch - 1]["elapsed_seconds"]
        t2 = records[2 * per_epoch - 1]["elapsed_seconds"] - t1
        stats = trainer.store.stats
        print(f"{args.samples} samples, {per_epoch} steps per epoch")
        print(f"epoch 1: {t1:.2f} s (features computed for {stats.computed} files in {stats.seconds_computing:.2f} s)")
        print(f"epoch 2: {t2:.2f} s ({stats.hits} cache hits, nothing recomputed)")
        print(f"epoch 1 / epoch 2: {t1 / t2:.2f}x")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
