"""The one audio loader: decode with soundfile, mix to mono, resample to 16 kHz as librosa.load does."""

from __future__ import annotations

from pathlib import Path

import numpy as np

TARGET_SR = 16000
# Names the resampling in feature-cache entries (data/features.py): an entry made from audio that
# another resampler brought to 16 kHz holds other features and is recomputed.
RESAMPLER = "soxr-HQ"


class AudioError(ValueError):
    """An audio file is missing, unreadable, empty or not decodable."""


def resampled_length(frames: int, sr: float, target: int = TARGET_SR) -> int:
    """How many samples at `target` come from `frames` samples at `sr`: the ceiling of frames *
    (target / sr), with the ratio as a float the way librosa computes it, so lengths agree to the
    sample with librosa.load (and the header-only length check in data/schema.py uses this too)."""
    if sr == target:
        return int(frames)
    return int(np.ceil(frames * (float(target) / sr)))


def resample(wave: np.ndarray, sr: int, target: int = TARGET_SR) -> np.ndarray:
    """float32 `wave` at `sr` to `target` Hz with soxr at quality "HQ" (librosa's default
    `res_type="soxr_hq"`, which every official Kimi-Audio entry point uses through librosa.load)."""
    wave = np.ascontiguousarray(wave, dtype=np.float32)
    if sr == target:
        return wave
    import soxr

    out = soxr.resample(wave, sr, target, quality="HQ")
    n = resampled_length(len(wave), sr, target)
    # soxr may stop a sample or two short of that length; librosa pads the end with zeros (and
    # would cut a longer output), so the two agree on length as well as on values.
    if len(out) < n:
        out = np.concatenate([out, np.zeros(n - len(out), dtype=out.dtype)])
    return out[:n]


def load_audio(path: str | Path, target_sr: int = TARGET_SR) -> np.ndarray:
    """Decode `path` to float32 mono at `target_sr`, sample for sample what `librosa.load(path,
    sr=target_sr)` returns: soundfile decodes to float32, the channels are averaged, soxr HQ
    resamples. Raises AudioError with the file, the reason and the fix."""
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: audio file not found")
    try:
        # Opened and read from where it opens, as librosa does: sf.read seeks to the start first,
        # which makes libsndfile's mp3 decoder give values one float32 step away at places.
        with sf.SoundFile(str(path)) as f:
            sr = f.samplerate
            data = f.read(dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError
        raise AudioError(f"{path}: cannot decode audio ({str(e).splitlines()[0]}); use wav, flac or ogg") from None
    if data.size == 0 or data.shape[0] == 0:
        raise AudioError(f"{path}: audio file holds no samples")
    # librosa's to_mono: the float32 mean over channels (a mono file is taken as it is).
    wave = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    try:
        return resample(wave, sr, target_sr)
    except (ValueError, RuntimeError) as e:  # soxr refuses rates it cannot convert
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise AudioError(f"{path}: cannot resample {sr} Hz to {target_sr} Hz ({reason}); "
                         f"convert it to {target_sr} Hz first") from None
