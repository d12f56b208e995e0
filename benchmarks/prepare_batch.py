"""Speech tokenizer throughput on CPU: audio seconds tokenized per wall second, batch 8 vs batch 1.

    python benchmarks/prepare_batch.py [--files 16] [--repeat 2]

Uses the seeded tiny GLM-4-Voice tokenizer (real folder layout, real loader) on synthetic speech of
mixed lengths (2-40 s, so some files span two 30 s pieces). Both runs must give the same codes;
the ratio is batch-8 throughput / batch-1 throughput, measured side by side in this process.
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
    ap.add_argument("--files", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = ap.parse_args()

    import torch

    from kimi_lora_cli.loading import load_speech_tokenizer
    from kimi_lora_cli.models.speech_tokenizer.tiny import build_tiny_speech_tokenizer, synthetic_speech

    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = [2 + (i * 7.3) % 38 for i in range(args.files)]
    waves = [synthetic_speech(s, seed=i) for i, s in enumerate(lengths)]
    audio_s = sum(len(w) for w in waves) / 16000
    with tempfile.TemporaryDirectory() as tmp:
        tok = load_speech_tokenizer(build_tiny_speech_tokenizer(Path(tmp) / "glm-4-voice-tokenizer"))
    tok.tokenize(waves[0][:16000])  # warm-up (mel filters, kernels)

    def best(batch: int) -> tuple[float, list[list[int]]]:
        times, codes = [], []
        for _ in range(args.repeat):
            start = time.perf_counter()
            if batch == 1:
                codes = [tok.tokenize(w) for w in waves]
            else:
                codes = tok.tokenize_batch(waves, batch_size=batch)
            times.append(time.perf_counter() - start)
        return min(times), codes

    t1, c1 = best(1)
    t8, c8 = best(8)
    if c1 != c8:
        raise SystemExit("codes differ between batch 1 and batch 8")
    print(f"{args.files} files, {audio_s:.0f} s of audio, tiny tokenizer, {torch.get_num_threads()} threads")
    print(f"batch 1: {audio_s / t1:8.1f} audio s per wall s ({t1:.2f} s)")
    print(f"batch 8: {audio_s / t8:8.1f} audio s per wall s ({t8:.2f} s)")
    print(f"ratio batch 8 / batch 1: {t1 / t8:.2f}x (codes identical)")


if __name__ == "__main__":
    main()
