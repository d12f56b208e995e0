"""Small ASR-style jsonl + wav files for the infer tests and benchmarks (no dependency on train code)."""

from __future__ import annotations

import json
from pathlib import Path

TRANSCRIPTS = [
    "the quick brown fox",
    "hello world",
    "she sells sea shells by the sea shore",
    "one two three",
    "a small cat sat on the warm mat",
    "how are you today",
    "thank you",
    "speech recognition turns audio into text",
]
INSTRUCTION = "please transcribe the spoken content into written text."


def write_asr_data(folder: Path, config, n: int = 4, task_type: str = "understanding",
                   with_tokens: bool = True, name: str = "data.jsonl") -> Path:
    """`n` lines: user instruction, user audio (wav beside the jsonl, relative path), assistant text.

    Clip k lasts (k + 2) * 1280 samples, so its audio_tokens count (k + 2) equals its Whisper rows."""
    import numpy as np
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)
    offset, codebook = config.kimia_token_offset, config.vocab_size - config.kimia_token_offset
    lines = []
    for k in range(n):
        samples = (k % 5 + 2) * 1280
        t = np.arange(samples) / 16000.0
        wave = (0.3 * np.sin(2 * np.pi * (220 + 40 * k) * t) + 0.01 * rng.randn(samples)).astype("float32")
        sf.write(str(folder / f"clip{k}.wav"), wave, 16000)
        audio = {"role": "user", "message_type": "audio", "content": f"clip{k}.wav"}
        if with_tokens:
            audio["audio_tokens"] = [offset + int(c) for c in rng.randint(0, codebook, size=k % 5 + 2)]
        lines.append({
            "id": f"utt{k}",
            "task_type": task_type,
            "conversation": [
                {"role": "user", "message_type": "text", "content": INSTRUCTION},
                audio,
                {"role": "assistant", "message_type": "text", "content": TRANSCRIPTS[k % len(TRANSCRIPTS)]},
            ],
        })
    path = folder / name
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path
