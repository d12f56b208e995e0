"""The synthetic data set: deterministic, official format, codes that match the audio length."""

from __future__ import annotations

import json

from kimi_lora_cli.data.audio import load_audio
from kimi_lora_cli.data.conversation import output_type_for_task, tokenize_conversation
from kimi_lora_cli.data.synthetic import write_synthetic_dataset
from kimi_lora_cli.models.kimi_audio.whisper import rows_for_samples


def test_synthetic_dataset_is_valid_and_deterministic(tmp_path, tiny):
    cfg = tiny.config
    a = write_synthetic_dataset(tmp_path / "a", cfg, n=6, seed=3, task="mixed")
    b = write_synthetic_dataset(tmp_path / "b", cfg, n=6, seed=3, task="mixed")
    assert a.read_text() == b.read_text()
    assert (a.parent / "audio" / "clip_0001.wav").read_bytes() == (b.parent / "audio" / "clip_0001.wav").read_bytes()
    rows = [json.loads(line) for line in a.read_text().splitlines()]
    assert [r["task_type"] for r in rows[:2]] == ["understanding", "speech_conversation"]
    lengths = set()
    for row in rows:
        for msg in row["conversation"]:
            if msg["message_type"] != "audio":
                continue
            assert not msg["content"].startswith("/")
            wave = load_audio(a.parent / msg["content"])
            assert 0.5 <= len(wave) / 16000 <= 2.0
            lengths.add(len(wave))
            assert len(msg["audio_tokens"]) == rows_for_samples(len(wave))
            assert all(cfg.kimia_token_offset <= c < cfg.vocab_size for c in msg["audio_tokens"])
        seq = tokenize_conversation(row["conversation"], tiny.tokenizer, cfg, output_type_for_task(row["task_type"]))
        assert any(seq.text_loss)
        assert any(seq.audio_loss) == (row["task_type"] != "understanding")
    assert len(lengths) >= 5  # every clip is different
    other = write_synthetic_dataset(tmp_path / "c", cfg, n=6, seed=4, task="mixed")
    assert other.read_text() != a.read_text()
