"""Audio in and out of the server: uploads to checked 16 kHz waveforms, waveforms to WAV bytes and PCM16 pieces."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

from kimi_lora_cli.serving.jobs import RequestError

FORMATS = ("wav", "mp3", "flac", "ogg")
ACCEPTED = "wav, mp3, flac or ogg"


class Uploads:
    """A private temporary folder for the audio of requests in progress (removed on close)."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="kimi-lora-serve-"))

    def save(self, data: bytes, suffix: str = "") -> Path:
        suffix = suffix.lower() if suffix.lower().lstrip(".") in FORMATS else ""
        path = self.root / f"{uuid.uuid4().hex}{suffix}"
        path.write_bytes(data)
        return path

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def decode_upload(path: Path, what: str, max_seconds: float) -> Any:
    """The 16 kHz mono float32 waveform of an uploaded file (the loader `infer` uses); 400 with the
    reason when it cannot be decoded, is empty or lasts longer than `max_seconds`."""
    from kimi_lora_cli.data.audio import TARGET_SR, AudioError, load_audio

    try:
        wave = load_audio(path)
    except AudioError as e:
        reason = str(e).removeprefix(f"{path}: ")
        if "cannot decode" in reason:
            reason = reason.split(";")[0] + f"; send {ACCEPTED} audio"
        raise RequestError(400, f"{what}: {reason}", what) from None
    seconds = len(wave) / TARGET_SR
    if seconds > max_seconds:
        raise RequestError(400, f"{what}: the audio lasts {seconds:.1f} s, over this server's limit of "
                                f"{max_seconds:g} s (--max-audio-seconds); send a shorter clip", what)
    return wave


def pcm16(wave: Any) -> Any:
    """float waveform in [-1, 1] (clipped) -> int16 samples, rounded as `infer --audio-dir` writes them."""
    import numpy as np

    return np.round(wave.detach().float().clamp(-1.0, 1.0).cpu().numpy() * 32767).astype(np.int16)


def wav_bytes(wave: Any, rate: int) -> bytes:
    """A 16-bit PCM mono WAV file of `wave`, the same bytes `infer --audio-dir` writes."""
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, pcm16(wave), rate, subtype="PCM_16", format="WAV")
    return buf.getvalue()
