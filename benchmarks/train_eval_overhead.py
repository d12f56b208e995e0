"""Cost of decoding during evaluation: `--eval-generate 32` at `--eval-steps 50`, tiny model, CPU.

Two runs side by side on the same data and seed, both evaluating the eval loss every 50 steps (and at
the end); the second also greedy-decodes 32 eval conversations each time (eval_wer / eval_cer). The
overhead is the extra wall time as a percentage of the run without decoding. Features are cached
before timing. Decoding runs in batches of 16 (the default `--per-device-eval-batch-size` for
decoding); the loss evaluation uses the training micro-batch (4).

    python benchmarks/train_eval_overhead.py [--steps 200] [--samples 64] [--eval 32]
"""

from __future__ import annotations

import argparse
import shutil
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--eval", type=int, default=32)
    args = ap.parse_args()

    from _tiny_train import run, workspace

    from kimi_lora_cli.data.synthetic import write_synthetic_dataset
    from kimi_lora_cli.loading import inspect_folder

    root, model, data = workspace(args.samples)
    eval_data = write_synthetic_dataset(root / "eval", inspect_folder(model).config, n=args.eval, seed=1,
                                        task="understanding")
    cache = root / "features"
    common = dict(max_steps=args.steps, per_device_train_batch_size=4, eval_data_path=str(eval_data),
                  eval_steps=50, logging_steps=10, feature_cache_dir=str(cache))
    try:
        run(model, data, root / "warm", max_steps=1, eval_data_path=str(eval_data), feature_cache_dir=str(cache))
        seconds = {}
        for name, extra in (("eval loss only", {}), (f"+ --eval-generate {args.eval}", {"eval_generate": str(args.eval)})):
            start = time.perf_counter()
            _, res = run(model, data, root / name.replace(" ", "_"), **common, **extra)
            seconds[name] = time.perf_counter() - start
            print(f"{name:28s} {res.global_step} steps in {seconds[name]:6.2f} s (loop {res.seconds:.2f} s), "
                  f"last eval {({k: round(v, 4) for k, v in res.last_eval.items()})}")
        base, gen = seconds.values()
        print(f"overhead of decoding {args.eval} conversations every 50 steps: {100 * (gen - base) / base:.1f}% "
              "of the training time")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
