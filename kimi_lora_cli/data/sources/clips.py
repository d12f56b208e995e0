"""Clips that are not files of their own (a segment of a recording, audio held in a dataset row) are
written once as 16 kHz float wav files, named by what they come from, so every later step reads a file."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np

from kimi_lora_cli.data.audio import TARGET_SR, AudioError, load_audio, resample
from kimi_lora_cli.errors import DataError

MARKER = ".kimi-lora-clips"


def default_clip_dir() -> Path:
    """The user's cache: $KIMI_LORA_CACHE/clips, else $XDG_CACHE_HOME (or ~/.cache)/kimi-lora/clips."""
    root = os.environ.get("KIMI_LORA_CACHE")
    if root:
        return Path(root).expanduser() / "clips"
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "kimi-lora" / "clips"


class ClipStore:
    """Writes clips into `folder` (created with a marker file; a folder without the marker that holds
    other files is someone else's and refused). A clip already there is never decoded again."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder).expanduser()
        self._ready = False
        self._last: tuple[str, np.ndarray] | None = None  # the recording segments were last cut from

    def _prepare(self) -> None:
        if self._ready:
            return
        f = self.folder
        if f.exists() and not (f / MARKER).exists() and any(f.iterdir()):
            raise DataError(f"{f}: already holds files kimi-lora did not write; clips cut from the data go into a "
                            "folder of their own: choose another one (or remove that folder)")
        f.mkdir(parents=True, exist_ok=True)
        (f / MARKER).touch()
        self._ready = True

    def path_for(self, key: str) -> Path:
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()[:40]}.wav"

    def _write(self, target: Path, wave: np.ndarray) -> None:
        import soundfile as sf

        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        try:
            # float32 wav at 16 kHz: load_audio reads back exactly these samples (no resampling).
            sf.write(str(tmp), np.asarray(wave, dtype=np.float32), TARGET_SR, subtype="FLOAT", format="WAV")
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    def segment(self, recording: Path, start: float, end: float | None) -> str:
        """The clip [start, end) seconds of `recording` (end None: to its end), cut from the 16 kHz
        waveform the one audio loader gives. Raises AudioError / DataError for a bad file or span."""
        recording = Path(recording).resolve()
        st = recording.stat()
        key = f"segment:{recording}:{st.st_size}:{st.st_mtime_ns}:{start!r}:{end!r}"
        target = self.path_for(key)
        if target.exists():
            return str(target)
        self._prepare()
        if self._last is None or self._last[0] != str(recording):
            self._last = (str(recording), load_audio(recording))
        wave = self._last[1]
        a = int(round(start * TARGET_SR))
        b = len(wave) if end is None else int(round(end * TARGET_SR))
        if a < 0 or b <= a or a >= len(wave):
            raise AudioError(f"{recording}: the span {start:g} s to {'its end' if end is None else f'{end:g} s'} is "
                             f"outside the recording ({len(wave) / TARGET_SR:.2f} s) or empty")
        self._write(target, wave[a:min(b, len(wave))])
        return str(target)

    def encoded(self, data: bytes, name: str = "audio") -> str:
        """A clip given as the bytes of an audio file (wav, flac, mp3, ogg ...)."""
        target = self.path_for("bytes:" + hashlib.sha256(data).hexdigest())
        if target.exists():
            return str(target)
        self._prepare()
        self._write(target, decode_bytes(data, name))
        return str(target)

    def waveform(self, array, rate: int, name: str = "audio") -> str:
        """A clip given as samples at `rate` (channels last or first are averaged), resampled like a file."""
        wave = np.asarray(array, dtype=np.float32)
        if wave.ndim == 2:  # (frames, channels) or (channels, frames): average the shorter axis
            wave = wave.mean(axis=1 if wave.shape[1] <= wave.shape[0] else 0).astype(np.float32)
        if wave.ndim != 1 or wave.size == 0:
            raise AudioError(f"{name}: expected a non-empty 1-D (or frames x channels) array of samples")
        if not rate or rate <= 0:
            raise AudioError(f"{name}: sampling rate {rate!r} is not a positive number")
        digest = hashlib.sha256(wave.tobytes()).hexdigest()
        target = self.path_for(f"array:{digest}:{int(rate)}")
        if target.exists():
            return str(target)
        self._prepare()
        self._write(target, resample(wave, int(rate)))
        return str(target)


def decode_bytes(data: bytes, name: str) -> np.ndarray:
    """An encoded audio file held in memory -> float32 mono at 16 kHz, as load_audio does for a file."""
    import soundfile as sf

    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            sr = f.samplerate
            frames = f.read(dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError
        raise AudioError(f"{name}: cannot decode audio ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                         "; use wav, flac, mp3 or ogg") from None
    if frames.size == 0:
        raise AudioError(f"{name}: audio holds no samples")
    wave = frames.mean(axis=1) if frames.shape[1] > 1 else frames[:, 0]
    return resample(wave, sr)
