"""Deterministic tiny fine-tuning data sets (tones and chirps + transcripts) for tests and demos.

`write_synthetic_dataset(folder, config, n=8)` writes `n` short 16 kHz wav clips (0.5-2 s, each a
different tone, chirp or two-tone mix), and a jsonl in the official fine-tuning format whose audio
messages carry `audio_tokens`: exactly `rows_for_samples(len(clip))` codes in
[kimia_token_offset, vocab_size), derived from the clip itself (zero crossings and energy of each
1280-sample frame), so the same clip always has the same codes. Audio paths in the jsonl are relative
to the jsonl's folder, as a user would write them.

    python -m kimi_lora_cli.data.synthetic OUT_FOLDER MODEL_FOLDER [N]
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from kimi_lora_cli.models.kimi_audio.whisper import SAMPLE_RATE, SAMPLES_PER_ROW, rows_for_samples

ASR_INSTRUCTION = "Please transcribe the spoken content into written text."
WORDS = (
    "the quick brown fox jumps over lazy dog hello world this is a tiny test of audio model she sells sea "
    "shells by shore one two three four five six seven eight nine ten how are you today fine thank speech "
    "small cat sat on warm mat rain old stone house near river"
).split()


def _cfg(config: Any, key: str) -> int:
    if isinstance(config, dict):
        return int(config[key])
    return int(getattr(config, key))


def synthetic_clip(index: int, seed: int = 0, min_seconds: float = 0.5, max_seconds: float = 2.0) -> np.ndarray:
    """Clip `index` of the set: a tone, chirp or two-tone mix with its own length and pitch."""
    rng = np.random.default_rng([seed, index])
    seconds = float(rng.uniform(min_seconds, max_seconds))
    n = int(round(seconds * SAMPLE_RATE))
    t = np.arange(n, dtype=np.float64) / SAMPLE_RATE
    f0 = float(rng.uniform(150.0, 1800.0))
    kind = index % 3
    if kind == 0:  # steady tone
        phase = 2 * np.pi * f0 * t
        wave = np.sin(phase)
    elif kind == 1:  # linear chirp up or down
        f1 = float(rng.uniform(150.0, 3000.0))
        phase = 2 * np.pi * (f0 * t + 0.5 * (f1 - f0) / seconds * t**2)
        wave = np.sin(phase)
    else:  # two tones with a slow amplitude wobble
        f1 = f0 * float(rng.uniform(1.2, 2.5))
        wave = 0.6 * np.sin(2 * np.pi * f0 * t) + 0.4 * np.sin(2 * np.pi * f1 * t)
        wave *= 0.6 + 0.4 * np.sin(2 * np.pi * float(rng.uniform(1.0, 4.0)) * t)
    fade = min(n // 10, 160)
    env = np.ones(n)
    env[:fade] = np.linspace(0.0, 1.0, fade)
    env[n - fade :] = np.linspace(1.0, 0.0, fade)
    wave = 0.5 * wave * env + 0.01 * rng.standard_normal(n)
    # 16-bit values, so the file written holds exactly this waveform (and the same bytes every time:
    # float WAV files carry a time-stamped PEAK chunk).
    return (np.round(wave * 32767.0) / 32767.0).astype(np.float32)


def codes_for_wave(wave: np.ndarray, config: Any) -> list[int]:
    """`rows_for_samples(len(wave))` codes in [kimia_token_offset, vocab_size), one per 1280 samples.

    Each code comes from its frame's zero-crossing count and energy, so the codes follow the sound."""
    offset, vocab = _cfg(config, "kimia_token_offset"), _cfg(config, "vocab_size")
    n_codes = vocab - offset
    if n_codes <= 0:
        raise ValueError(f"vocab_size {vocab} leaves no audio codes above kimia_token_offset {offset}")
    rows = rows_for_samples(len(wave))
    codes = []
    for k in range(rows):
        frame = wave[k * SAMPLES_PER_ROW : (k + 1) * SAMPLES_PER_ROW]
        crossings = int(np.count_nonzero(np.diff(np.signbit(frame)))) if len(frame) > 1 else 0
        energy = int(np.sqrt(np.mean(frame.astype(np.float64) ** 2)) * 40) if len(frame) else 0
        codes.append(offset + (crossings * 7 + energy * 3) % n_codes)
    return codes


def _words(rng: np.random.Generator, lo: int = 2, hi: int = 5) -> str:
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), size=int(rng.integers(lo, hi + 1))))


def _write_wav(path: Path, wave: np.ndarray) -> None:
    import soundfile as sf

    tmp = path.with_name(path.name + ".tmp")
    sf.write(str(tmp), wave, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    os.replace(tmp, path)


def _read_back(path: Path) -> np.ndarray:
    """The clip as a reader decodes it (codes follow the file, not the float waveform before writing)."""
    from kimi_lora_cli.data.audio import load_audio

    return load_audio(path)


def synthetic_sample(
    index: int, folder: Path, config: Any, seed: int = 0, task: str = "understanding", audio_dir: str = "audio"
) -> dict[str, Any]:
    """One jsonl object; writes the clip(s) it refers to under `folder / audio_dir`."""
    rng = np.random.default_rng([seed, index, 7])
    (folder / audio_dir).mkdir(parents=True, exist_ok=True)
    wave = synthetic_clip(index, seed)
    rel = f"{audio_dir}/clip_{index:04d}.wav"
    _write_wav(folder / rel, wave)
    user_audio = {"role": "user", "message_type": "audio", "content": rel,
                  "audio_tokens": codes_for_wave(_read_back(folder / rel), config)}
    if task == "understanding":
        return {
            "task_type": "understanding",
            "conversation": [
                {"role": "user", "message_type": "text", "content": ASR_INSTRUCTION},
                user_audio,
                {"role": "assistant", "message_type": "text", "content": _words(rng)},
            ],
        }
    # "both": a spoken question answered in text and speech (audio loss on the answer's codes).
    answer = synthetic_clip(10_000 + index, seed, 0.5, 1.0)
    rel_answer = f"{audio_dir}/answer_{index:04d}.wav"
    _write_wav(folder / rel_answer, answer)
    return {
        "task_type": "speech_conversation",
        "conversation": [
            user_audio,
            {"role": "assistant", "message_type": "text", "content": _words(rng, 1, 3)},
            {"role": "assistant", "message_type": "audio", "content": rel_answer,
             "audio_tokens": codes_for_wave(_read_back(folder / rel_answer), config)},
        ],
    }


def write_synthetic_dataset(
    folder: str | Path,
    config: Any,
    n: int = 8,
    seed: int = 0,
    task: str = "understanding",
    name: str = "train.jsonl",
) -> Path:
    """Write `n` samples (clips + `name` jsonl) into `folder`; returns the jsonl path.

    `config` is a KimiAudioConfig or a config.json dict (only kimia_token_offset and vocab_size are
    read). `task`: "understanding" (ASR), "both" (text + speech answers) or "mixed" (alternating)."""
    if task not in ("understanding", "both", "mixed"):
        raise ValueError(f"task must be understanding, both or mixed, not {task!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        kind = task if task != "mixed" else ("understanding" if i % 2 == 0 else "both")
        rows.append(synthetic_sample(i, folder, config, seed=seed, task=kind))
    path = folder / name
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)
    return path


if __name__ == "__main__":
    import sys

    if len(sys.argv) < 3:
        sys.exit("usage: python -m kimi_lora_cli.data.synthetic OUT_FOLDER MODEL_FOLDER [N] [understanding|both|mixed]")
    cfg = json.loads((Path(sys.argv[2]) / "config.json").read_text())
    count = int(sys.argv[3]) if len(sys.argv) > 3 else 8
    print(write_synthetic_dataset(sys.argv[1], cfg, n=count, task=sys.argv[4] if len(sys.argv) > 4 else "understanding"))
