"""Resampling 44.1 kHz audio to 16 kHz: the old hand-written Kaiser-sinc resampler vs soxr HQ.

    python benchmarks/resample_speed.py [--minutes 1] [--repeat 5] [--threads 0]

Issue #25: kimi-lora's loader now resamples with `soxr.resample(x, sr, 16000, quality="HQ")`,
what librosa.load (and so every official Kimi-Audio entry point) does. The old resampler (a torch
strided convolution of per-phase Kaiser-windowed sinc kernels) survives only here, copied from the
version before the change, so both run side by side on the same speech-like 44.1 kHz signal.
Printed: best-of-`repeat` milliseconds per minute of 44.1 kHz audio for each, the ratio, and how
far apart the two 16 kHz waveforms are (soxr's is the one librosa gives).
"""

from __future__ import annotations

import argparse
import sys
import time
from math import ceil, gcd
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package

import numpy as np  # noqa: E402

SR = 44100


def old_resample(wave: np.ndarray, sr: int, target: int = 16000) -> np.ndarray:
    """kimi-lora's resampler before issue #25 (Kaiser-windowed sinc, 16 zero crossings a side,
    one strided convolution over the input per output phase), kept for this comparison only."""
    import torch

    if sr == target:
        return wave.astype(np.float32, copy=False)
    g = gcd(sr, target)
    up, down = target // g, sr // g
    n_out = int(np.ceil(len(wave) * target / sr))
    cutoff = 0.95 * 0.5 * min(1.0, up / down)
    half = int(ceil(16 / (2 * cutoff)))
    taps = 2 * half + down + 1
    dist = (np.arange(up)[:, None] * down / up) + half - np.arange(taps)[None, :]
    window = np.where(np.abs(dist) <= half, np.i0(8.6 * np.sqrt(np.clip(1 - (dist / half) ** 2, 0, None))), 0.0)
    kernel = 2 * cutoff * np.sinc(2 * cutoff * dist) * window / np.i0(8.6)
    kernel /= kernel.sum(axis=1, keepdims=True)
    n_q = -(-n_out // up)
    right = max(0, (n_q - 1) * down + taps - half - len(wave))
    x = torch.nn.functional.pad(torch.from_numpy(wave.astype(np.float32))[None, None], (half, right))
    y = torch.nn.functional.conv1d(x, torch.from_numpy(kernel.astype(np.float32))[:, None], stride=down)
    return y[0].t().reshape(-1)[:n_out].numpy().astype(np.float32)


def best_ms(fn, wave: np.ndarray, repeat: int) -> tuple[float, np.ndarray]:
    out = fn(wave[:SR], SR)  # warm-up (imports, kernels, allocator)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn(wave, SR)
        times.append(time.perf_counter() - start)
    return min(times) * 1e3, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=1.0, help="length of the test signal")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads for the old resampler (0: leave as is)")
    args = ap.parse_args()

    import soxr
    import torch

    from kimi_lora_cli.data.audio import resample
    from kimi_lora_cli.models.speech_tokenizer.tiny import synthetic_speech

    if args.threads:
        torch.set_num_threads(args.threads)
    wave = synthetic_speech(args.minutes * 60, seed=0, sr=SR)
    t_old, y_old = best_ms(old_resample, wave, args.repeat)
    t_new, y_new = best_ms(resample, wave, args.repeat)
    per_min = 60 * SR / len(wave)
    ref = soxr.resample(wave, SR, 16000, quality="HQ")  # then zero-padded to the length, as librosa does
    same = np.array_equal(y_new[:len(ref)], ref) and not y_new[len(ref):].any()
    diff = y_old - y_new
    print(f"{len(wave) / SR:.0f} s of 44.1 kHz speech-like audio -> 16 kHz, best of {args.repeat}, "
          f"torch {torch.get_num_threads()} threads, soxr {soxr.__version__}")
    print(f"old hand-written Kaiser sinc (torch): {t_old * per_min:8.1f} ms per minute of audio")
    print(f"soxr HQ (kimi-lora now):              {t_new * per_min:8.1f} ms per minute of audio")
    print(f"ratio old / soxr: {t_old / t_new:.1f}x; soxr output equals soxr.resample(quality='HQ'): {same}")
    print(f"old vs soxr waveform: max abs difference {np.abs(diff).max():.1e}, "
          f"rms relative {np.sqrt(np.mean(diff**2) / np.mean(y_new**2)):.1e}")


if __name__ == "__main__":
    main()
