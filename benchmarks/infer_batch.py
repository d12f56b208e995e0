"""Benchmark: `infer` samples/s at batch 8 versus batch 1 on the same jsonl (CPU, tiny model).

    python benchmarks/infer_batch.py [--samples 16] [--steps 32] [--threads 1]

Each run goes through the `infer` core (`run_inference`: Whisper features, prompts, generation,
scoring) on one loaded tiny checkpoint, with the same greedy budget, so each sample generates
the same tokens at either batch size. Target: batch 8 at least 4x the samples/s of batch 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package

TARGET = 4.0


def write_data(folder: Path, config, n: int) -> Path:
    """ASR-style lines (instruction + audio with codes + answer) and text-only lines, mixed lengths."""
    import numpy as np
    import soundfile as sf

    rng = np.random.RandomState(0)
    offset, codebook = config.kimia_token_offset, config.vocab_size - config.kimia_token_offset
    lines = []
    for k in range(n):
        conv = [{"role": "user", "message_type": "text",
                 "content": "please transcribe the spoken content into written text." + " the" * (k % 7)}]
        if k % 2 == 0:
            rows = 4 + k % 9
            wave = (0.1 * rng.randn(rows * 1280)).astype("float32")
            sf.write(str(folder / f"clip{k}.wav"), wave, 16000)
            conv.append({"role": "user", "message_type": "audio", "content": f"clip{k}.wav",
                         "audio_tokens": [offset + int(c) for c in rng.randint(0, codebook, size=rows)]})
        conv.append({"role": "assistant", "message_type": "text", "content": "the quick brown fox"})
        lines.append({"id": f"s{k}", "task_type": "understanding", "conversation": conv})
    path = folder / "bench.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per batch size (best one counts)")
    args = ap.parse_args()

    import torch

    from kimi_lora_cli.inference.runner import InferSpec, run_inference
    from kimi_lora_cli.loading import load_model
    from kimi_lora_cli.models.kimi_audio.tiny import build_tiny_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = build_tiny_checkpoint(tmp / "tiny")
        loaded = load_model(ckpt, dtype="float32", device="cpu")
        data = write_data(tmp, loaded.config, args.samples)
        rows = {}
        outputs = {}
        for k, bs in enumerate([1, 8] * (args.repeats + 1)):  # interleaved; the first pair warms up
            spec = InferSpec(model=ckpt, data=data, batch_size=bs, max_new_tokens=args.steps, device="cpu")
            t0 = time.perf_counter()
            report = run_inference(spec, loaded=loaded)
            dt = time.perf_counter() - t0
            if k >= 2 and (bs not in rows or dt < rows[bs][2]):
                rows[bs] = (len(report.records) / dt, sum(r["new_tokens"] for r in report.records) / dt, dt)
            outputs[bs] = {r["id"]: r["text_tokens"] for r in report.records}
    print(f"infer_batch: {args.samples} samples (half with audio), {args.steps} greedy steps each, CPU tiny "
          f"model, {torch.get_num_threads()} threads, best of {args.repeats}")
    print(f"{'batch':>5} {'seconds':>8} {'samples/s':>10} {'tokens/s':>10}")
    for bs, (sps, tps, dt) in rows.items():
        print(f"{bs:>5} {dt:>8.3f} {sps:>10.2f} {tps:>10.1f}")
    ratio = rows[8][0] / rows[1][0]
    same = outputs[1] == outputs[8]
    print(f"batch 8 / batch 1 samples/s: {ratio:.2f}x (target >= {TARGET}x): {'PASS' if ratio >= TARGET else 'FAIL'}")
    print(f"identical predictions at both batch sizes: {same}")


if __name__ == "__main__":
    main()
