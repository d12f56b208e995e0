"""The audio loader gives the 16 kHz waveform the official pipeline (librosa.load, soxr HQ) gives."""

from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile as sf
import torch

from kimi_lora_cli.data.audio import RESAMPLER, load_audio
from kimi_lora_cli.data.features import FeatureStore, file_sha256
from kimi_lora_cli.data.schema import probe_audio


def write_clip(path, sr: int, channels: int = 1, seed: int = 0, subtype: str = "FLOAT"):
    """0.73 s plus one sample: soxr's output then falls a sample short of the 16 kHz length at
    22.05, 44.1 and 48 kHz, so the length rule is exercised as well as the values."""
    n = int(sr * 0.73) + 1
    t = np.arange(n) / sr
    rng = np.random.default_rng(seed)
    tones = np.stack([0.3 * np.sin(2 * np.pi * (220 + 110 * c) * t) for c in range(channels)], axis=1)
    sf.write(str(path), (tones + 0.05 * rng.standard_normal((n, channels))).astype(np.float32), sr,
             subtype=subtype)
    return path


def librosa_load_spelled_out(path) -> np.ndarray:
    """What librosa.load(path, sr=16000) does, written out: soundfile decodes to float32 (reading
    from where the file opens, no seek), the channels are averaged, soxr resamples at quality HQ,
    and the result is cut or zero-padded to ceil(frames * 16000 / sr) samples."""
    import soxr

    with sf.SoundFile(str(path)) as f:
        sr, x = f.samplerate, f.read(dtype="float32", always_2d=True)
    assert x.shape[1] in (1, 2)
    mono = x[:, 0] if x.shape[1] == 1 else (x[:, 0] + x[:, 1]) / np.float32(2)
    y = soxr.resample(mono, sr, 16000, quality="HQ")
    n = math.ceil(len(mono) * (16000 / sr))
    return np.concatenate([y, np.zeros(n - len(y), np.float32)]) if len(y) < n else y[:n]


@pytest.mark.parametrize("sr,channels,suffix,subtype", [
    (8000, 1, "wav", "PCM_16"),
    (22050, 1, "flac", "PCM_16"),
    (44100, 1, "wav", "FLOAT"),
    (48000, 1, "wav", "FLOAT"),
    (44100, 2, "wav", "PCM_16"),  # stereo: channel mean, then resampling
    # mp3 at an MPEG-2 rate: libsndfile decodes it a float32 step apart after a seek to the start
    # (sf.read does one, librosa does not)
    (24000, 2, "mp3", "MPEG_LAYER_III"),
])
def test_load_audio_equals_soxr_hq_exactly(tmp_path, sr, channels, suffix, subtype):
    if suffix == "mp3" and "MP3" not in sf.available_formats():
        pytest.skip("this libsndfile has no mp3 (libsndfile < 1.1)")
    path = write_clip(tmp_path / f"clip_{sr}_{channels}.{suffix}", sr, channels, subtype=subtype)
    got = load_audio(path)
    expected = librosa_load_spelled_out(path)
    assert got.dtype == np.float32 and got.ndim == 1
    assert np.array_equal(got, expected)
    # the header-only length of the data pre-flight is the length the loader gives
    assert probe_audio(path) == (len(got), None)


def test_16k_audio_is_not_resampled(tmp_path):
    path = write_clip(tmp_path / "native.wav", 16000, subtype="PCM_16")
    x, _ = sf.read(str(path), dtype="float32")
    assert np.array_equal(load_audio(path), x)


def _write_old_entry(store: FeatureStore, path) -> None:
    """Turn the cache entry of `path` into one an earlier version left: no `resampler` in the header,
    and rows unlike today's (as the hand-written resampler's were), so that a reuse would show."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    f = store.cache_file(file_sha256(path))
    with safe_open(str(f), framework="pt") as h:
        meta = dict(h.metadata())
    assert meta.pop("resampler") == RESAMPLER
    save_file({"features": load_file(str(f))["features"] + 1}, str(f), metadata=meta)


def test_features_cached_from_resampled_audio_by_an_older_version_are_recomputed(tiny, tmp_path):
    resampled = write_clip(tmp_path / "at44k.wav", 44100, seed=1)
    native = write_clip(tmp_path / "at16k.wav", 16000, seed=2)
    cache = tmp_path / "features"
    first = FeatureStore(tiny.feature_encoder, cache_dir=cache)
    made = first.rows([resampled, native])
    assert first.stats.computed == 2
    for p in (resampled, native):
        _write_old_entry(first, p)

    store = FeatureStore(tiny.feature_encoder, cache_dir=cache)
    rows = store.rows([resampled, native])
    assert store.stats.computed == 1 and store.stats.disk_hits == 1
    # the 44.1 kHz file's rows come from today's waveform, not from the old entry ...
    torch.testing.assert_close(rows[0], tiny.feature_encoder.encode(load_audio(resampled)))
    # ... while a 16 kHz file was never resampled, so its old entry still stands
    assert torch.equal(rows[1], made[1] + 1)

    # the rewritten entry names the resampler and is read back from now on
    again = FeatureStore(tiny.feature_encoder, cache_dir=cache)
    again.rows([resampled, native])
    assert again.stats.computed == 0 and again.stats.disk_hits == 2

    # `prepare --cache-features` fills the cache the same way
    _write_old_entry(again, resampled)
    assert FeatureStore(tiny.feature_encoder, cache_dir=cache).fill([resampled, native]) == 1


def test_an_older_entry_of_a_16k_mp3_is_recomputed(tiny, tmp_path):
    """Earlier versions decoded mp3 after a seek (a float32 step off at places), so even at 16 kHz
    an mp3's old entry is not today's waveform."""
    if "MP3" not in sf.available_formats():
        pytest.skip("this libsndfile has no mp3 (libsndfile < 1.1)")
    clip = write_clip(tmp_path / "at16k.mp3", 16000, subtype="MPEG_LAYER_III")
    cache = tmp_path / "features"
    FeatureStore(tiny.feature_encoder, cache_dir=cache).rows([clip])
    _write_old_entry(FeatureStore(tiny.feature_encoder, cache_dir=cache), clip)
    store = FeatureStore(tiny.feature_encoder, cache_dir=cache)
    rows = store.rows([clip])
    assert store.stats.computed == 1 and store.stats.disk_hits == 0
    torch.testing.assert_close(rows[0], tiny.feature_encoder.encode(load_audio(clip)))
