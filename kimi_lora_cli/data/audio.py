"""Audio decoding (wav/flac/ogg via soundfile), mono mix-down and resampling to 16 kHz."""

from __future__ import annotations

from pathlib import Path

import numpy as np

TARGET_SR = 16000


class AudioError(ValueError):
    """An audio file is missing, unreadable, empty or not decodable."""


def resample(wave: np.ndarray, sr: int, target: int = TARGET_SR) -> np.ndarray:
    """Band-limited resampling (windowed-sinc via torch's polyphase path in torchaudio-free form)."""
    if sr == target:
        return wave.astype(np.float32, copy=False)
    from math import gcd

    import torch

    g = gcd(sr, target)
    up, down = target // g, sr // g
    # Kaiser-windowed sinc low-pass at the lower Nyquist, applied by polyphase filtering.
    taps_per_phase = 16
    cutoff = 0.95 * min(1.0, up / down)
    n = np.arange(-taps_per_phase * max(up, down), taps_per_phase * max(up, down) + 1)
    h = cutoff * np.sinc(cutoff * n / up) * np.kaiser(len(n), 8.6)
    h = h / h.sum() * up
    x = torch.from_numpy(wave.astype(np.float32))
    upsampled = torch.zeros(len(x) * up)
    upsampled[::up] = x
    kernel = torch.from_numpy(h.astype(np.float32)).flip(0)[None, None]
    pad = len(h) // 2
    y = torch.nn.functional.conv1d(upsampled[None, None], kernel, padding=pad)[0, 0]
    out = y[::down][: int(np.ceil(len(wave) * target / sr))]
    return out.numpy().astype(np.float32)


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
