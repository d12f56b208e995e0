"""`kimi-lora demo` end to end; its claims are checked from the files it wrote."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.mark.slow
def test_demo_runs_and_its_claims_hold(cli, tmp_path):
    from kimi_lora_cli.inference.metrics import score
    from kimi_lora_cli.loading import load_model

    work = tmp_path / "demo"
    code, out, err = cli("demo", "--workdir", work)
    assert code == 0, err
    for step in ("prepare", "list-modules", "train", "inspect-adapter", "merge", "infer"):
        assert f"$ kimi-lora {step} " in err  # each step shows its standalone command
    said = " ".join(err.split())
    assert f"Demo folder: {work.resolve()}" in said and f"is in {work.resolve()}" in " ".join(out.split())
    # prepare turned the raw clips (no audio_tokens) into the training data with the tiny speech tokenizer
    raw = [json.loads(x) for x in (work / "data" / "raw.jsonl").read_text().splitlines()]
    prepared = [json.loads(x) for x in (work / "data" / "train.jsonl").read_text().splitlines()]
    assert len(raw) == len(prepared) == 8
    assert not any("audio_tokens" in m for r in raw for m in r["conversation"])
    assert all(m["audio_tokens"] for r in prepared for m in r["conversation"] if m["message_type"] == "audio")
    assert f"--speech-tokenizer {work / 'glm-4-voice-tokenizer-tiny'}" in said

    # the spoken answer: a 24 kHz 16-bit WAV of 4 x 480 samples per audio code, named in its jsonl
    import soundfile as sf

    answer = json.loads((work / "spoken.jsonl").read_text())
    wav = work / "spoken" / "prompt.base.wav"
    assert answer["audio_path"] == str(wav) and len(answer["audio_tokens"]) > 0
    info = sf.info(str(wav))
    assert (info.samplerate, info.subtype, info.frames) == (24000, "PCM_16", len(answer["audio_tokens"]) * 1920)
    assert "spoken answer:" in out and "noise" in out

    # loss fell (from the training log)
    metrics = [json.loads(x) for x in (work / "adapter" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["loss"] < 0.1 * metrics[0]["loss"]

    # WER from the predictions file, recomputed here
    per: dict[str, list[int]] = {}
    for line in (work / "predictions.jsonl").read_text().splitlines():
        rec = json.loads(line)
        c = score(rec["reference"], rec["prediction"])
        e = per.setdefault(rec["adapter"], [0, 0])
        e[0] += c.word_errors
        e[1] += c.ref_words
    assert per["base"][0] / per["base"][1] > 0.8
    assert per["demo"][0] / per["demo"][1] <= 0.05

    # merged folder loads strictly and equals base + adapter on a probe
    model_dir = work / "Kimi-Audio-tiny"
    merged = load_model(work / "merged", dtype="float32", load_whisper=False)
    tuned = load_model(model_dir, dtype="float32", load_whisper=False, adapters=[("demo", work / "adapter")])
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        a, b = merged.model(ids, text_input_ids=ids), tuned.model(ids, text_input_ids=ids)
    torch.testing.assert_close(a.text_logits, b.text_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a.audio_logits, b.audio_logits, atol=1e-4, rtol=1e-4)

    summary = json.loads((work / "demo_summary.json").read_text())
    assert summary["wer"]["demo"] == pytest.approx(per["demo"][0] / per["demo"][1])


def test_demo_refuses_a_folder_it_did_not_make(cli, tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    code, _, err = cli("demo", "--workdir", tmp_path)
    assert code != 0 and "not made by `kimi-lora demo`" in err
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_the_default_demo_folder_is_ignored_by_git():
    """`kimi-lora demo` run from the checkout (the quickstart) leaves no untracked folder behind."""
    from pathlib import Path

    from kimi_lora_cli.cli.demo import DEFAULT_WORKDIR

    ignored = (Path(__file__).resolve().parents[1] / ".gitignore").read_text().splitlines()
    assert f"/{DEFAULT_WORKDIR}/" in ignored
