"""Audio decoding (wav/flac/ogg via soundfile), mono mix-down and resampling to 16 kHz."""

from __future__ import annotations

from pathlib import Path

import numpy as np

TARGET_SR = 16000


class AudioError(ValueError):
    """An audio file is missing, unreadable, empty or not decodable."""


def resample(wave: np.ndarray, sr: int, target: int = TARGET_SR) -> np.ndarray:
    """Band-limited polyphase resampling (Kaiser-windowed sinc, 16 zero crossings a side).

    Output sample n sits at input position n * sr / target; each of the `up` output phases has its
    own kernel, applied by one strided convolution over the input: the cost is
    O(len(output) * (down + taps)), with no upsampled copy of the signal."""
    if sr == target:
        return wave.astype(np.float32, copy=False)
    from math import ceil, gcd

    import torch

    g = gcd(sr, target)
    up, down = target // g, sr // g
    n_out = int(np.ceil(len(wave) * target / sr))
    cutoff = 0.95 * 0.5 * min(1.0, up / down)  # cycles per input sample
    half = int(ceil(16 / (2 * cutoff)))  # kernel half-width in input samples
    taps = 2 * half + down + 1  # phase p is centred at p * down / up, anywhere in [0, down)
    # Phase p, tap j multiplies input sample q * down + j - half for output q * up + p.
    dist = (np.arange(up)[:, None] * down / up) + half - np.arange(taps)[None, :]
    window = np.where(np.abs(dist) <= half, np.i0(8.6 * np.sqrt(np.clip(1 - (dist / half) ** 2, 0, None))), 0.0)
    kernel = 2 * cutoff * np.sinc(2 * cutoff * dist) * window / np.i0(8.6)
    kernel /= kernel.sum(axis=1, keepdims=True)
    n_q = -(-n_out // up)
    right = max(0, (n_q - 1) * down + taps - half - len(wave))
    x = torch.nn.functional.pad(torch.from_numpy(wave.astype(np.float32))[None, None], (half, right))
    y = torch.nn.functional.conv1d(x, torch.from_numpy(kernel.astype(np.float32))[:, None], stride=down)
    return y[0].t().reshape(-1)[:n_out].numpy().astype(np.float32)


def load_audio(path: str | Path, target_sr: int = TARGET_SR) -> np.ndarray:
    """Decode `path` to float32 mono at `target_sr`. Raises AudioError with the reason and the fix."""
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: audio file not found")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError
        raise AudioError(f"{path}: cannot decode audio ({str(e).splitlines()[0]}); use wav, flac or ogg") from None
    if data.size == 0 or data.shape[0] == 0:
        raise AudioError(f"{path}: audio file holds no samples")
    wave = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    return resample(wave, sr, target_sr)
