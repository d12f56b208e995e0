"""WER/CER speed: kimi-lora's scorer (rapidfuzz edit distance) vs the pure-Python dynamic programme it
replaced, side by side on the same pairs; both must give identical counts.

    python benchmarks/wer_speed.py

Cases: one 3,000-word pair (a long-form transcript with ~10% errors) and 500 short pairs (~12 words).
"""

from __future__ import annotations

import random
import time

from kimi_lora_cli.inference import metrics


def python_edit_distance(ref, hyp) -> int:
    if len(ref) < len(hyp):
        ref, hyp = hyp, ref
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def noisy(words, rng, rate=0.1):
    out = []
    for w in words:
        u = rng.random()
        if u < rate / 3:
            continue
        out.append(rng.choice(VOCAB) if u < 2 * rate / 3 else w)
        if rate * 2 / 3 <= u < rate:
            out.append(rng.choice(VOCAB))
    return out


VOCAB = [f"word{i}" for i in range(2000)] + ["the", "a", "of", "and", "to", "in"]


def timed(fn, pairs):
    start = time.perf_counter()
    counts = [fn(r, h) for r, h in pairs]
    return time.perf_counter() - start, counts


def scorer(distance):
    def run(ref, hyp):
        r, h = metrics.normalize_text(ref), metrics.normalize_text(hyp)
        return distance(r.split(), h.split()), distance(r.replace(" ", ""), h.replace(" ", ""))
    return run


def main() -> None:
    rng = random.Random(0)
    long_ref = [rng.choice(VOCAB) for _ in range(3000)]
    cases = {
        "one 3,000-word pair": [(" ".join(long_ref), " ".join(noisy(long_ref, rng)))],
        "500 short pairs": [],
    }
    for _ in range(500):
        ref = [rng.choice(VOCAB) for _ in range(12)]
        cases["500 short pairs"].append((" ".join(ref), " ".join(noisy(ref, rng))))
    print(f"{'case':22s} {'pure Python':>12s} {'kimi-lora':>10s} {'speed-up':>9s}  same counts")
    for name, pairs in cases.items():
        slow, slow_counts = timed(scorer(python_edit_distance), pairs)
        fast, fast_counts = timed(scorer(metrics.edit_distance), pairs)
        print(f"{name:22s} {slow:11.3f}s {fast:9.4f}s {slow / fast:8.0f}x  {slow_counts == fast_counts}")


if __name__ == "__main__":
    main()
