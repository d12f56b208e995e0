"""`kimi-lora infer --audio-dir`: spoken answers as WAV files, on the tiny release folder with detokenizer."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import soundfile as sf
from _infer_data import write_asr_data

SAMPLING = ("--max-new-tokens", "30", "--audio-temperature", "1.0", "--audio-top-k", "0", "--seed", "3")


@pytest.fixture(scope="module")
def speech_model(tiny_dir, tmp_path_factory):
    """The tiny release folder plus audio_detokenizer/ and vocoder/."""
    from kimi_lora_cli.models.kimi_audio.tiny import add_tiny_detokenizer

    target = tmp_path_factory.mktemp("speech") / "Kimi-Audio-tiny"
    shutil.copytree(tiny_dir, target)
    return add_tiny_detokenizer(target)


@pytest.fixture(scope="module")
def speech_data(tiny, tmp_path_factory):
    return write_asr_data(tmp_path_factory.mktemp("tts"), tiny.config, n=3, task_type="speech_conversation")


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_spoken_answers_become_wav_files_named_in_the_predictions(cli, speech_model, speech_data, tmp_path):
    import torch

    from kimi_lora_cli.inference.speech import noise_generator
    from kimi_lora_cli.loading import load_detokenizer

    preds, wavs = tmp_path / "preds.jsonl", tmp_path / "wavs"
    code, out, err = cli("infer", "-m", speech_model, "-d", speech_data, "-o", preds, "--audio-dir", wavs,
                         "--batch-size", "3", *SAMPLING)
    assert code == 0, err
    assert "audio (s)" in out and f"spoken answers in {wavs}" in out.replace("\n", "")
    records = _records(preds)
    assert len(records) == 3 and any(r["audio_tokens"] for r in records)
    detok = load_detokenizer(speech_model, dtype="float32")
    for r in records:
        if not r["audio_tokens"]:
            assert r["audio_path"] is None
            continue
        path = wavs / f"{r['id']}.base.wav"
        assert r["audio_path"] == str(path)
        info = sf.info(str(path))
        n = len(r["audio_tokens"])
        assert (info.samplerate, info.channels, info.subtype) == (24000, 1, "PCM_16")
        assert info.frames == n * 4 * 480 and r["audio_seconds"] == pytest.approx(n * 4 * 480 / 24000)
        data, _ = sf.read(str(path), dtype="int16")
        wav = detok.detokenize(r["audio_tokens"], generator=noise_generator(3, r["id"]))
        want = np.round(wav.clamp(-1, 1).numpy() * 32767).astype(np.int16)
        assert np.array_equal(data, want) and np.abs(data).max() > 0
        assert torch.isfinite(wav).all()
    assert sorted(p.name for p in wavs.iterdir()) == sorted(
        [".kimi-lora-audio"] + [f"{r['id']}.base.wav" for r in records if r["audio_tokens"]])

    # batch size 1 (a fresh folder) gives the same files byte for byte
    preds1, wavs1 = tmp_path / "one.jsonl", tmp_path / "wavs1"
    code, _, err = cli("infer", "-m", speech_model, "-d", speech_data, "-o", preds1, "--audio-dir", wavs1,
                       "--batch-size", "1", *SAMPLING)
    assert code == 0, err
    for r in records:
        if r["audio_tokens"]:
            name = f"{r['id']}.base.wav"
            assert (wavs1 / name).read_bytes() == (wavs / name).read_bytes()

    # --resume keeps the WAVs (not rewritten) and cleans what a killed run left half-written
    stamps = {p.name: p.stat().st_mtime_ns for p in wavs.iterdir()}
    (wavs / ".utt9.base.wav.partial-123").write_bytes(b"torn")
    code, out, err = cli("infer", "-m", speech_model, "-d", speech_data, "-o", preds, "--audio-dir", wavs,
                         "--resume", *SAMPLING)
    assert code == 0, err
    assert "3 already in" in out.replace("\n", "")
    assert {p.name: p.stat().st_mtime_ns for p in wavs.iterdir()} == stamps
    assert _records(preds) == records


def test_a_separate_detokenizer_folder_and_the_json_report(cli, tiny_dir, tiny_detok_dir, speech_data, tmp_path):
    wavs = tmp_path / "wavs"
    code, out, err = cli("infer", "-m", tiny_dir, "-d", speech_data, "--audio-dir", wavs, "--detokenizer",
                         tiny_detok_dir, "--ode-steps", "4", "--json", *SAMPLING)
    assert code == 0, err
    payload = json.loads(out)
    assert payload["audio_dir"] == str(wavs)
    # the only note: answers cut by the 30-step budget (no detokenizer or WAV problem)
    assert all("reached --max-new-tokens 30 before ending" in n for n in payload["notes"])
    spoken = [r for r in payload["predictions"] if r["audio_tokens"]]
    assert spoken and all(sf.info(r["audio_path"]).frames == len(r["audio_tokens"]) * 1920 for r in spoken)


@pytest.mark.parametrize("extra, message", [
    (("--output-type", "text"), "--audio-dir writes spoken answers, but --output-type text"),
    (("--ode-steps", "1"), "--ode-steps must be >= 2"),
])
def test_option_conflicts_are_one_line_errors(cli, speech_model, speech_data, tmp_path, extra, message):
    code, _, err = cli("infer", "-m", speech_model, "-d", speech_data, "--audio-dir", tmp_path / "w", *extra)
    assert code == 1 and message in err and "Traceback" not in err


def test_missing_detokenizer_and_foreign_folders_are_refused_before_loading(cli, tiny_dir, speech_model, speech_data,
                                                                          tiny, tmp_path):
    code, _, err = cli("infer", "-m", tiny_dir, "-d", speech_data, "--audio-dir", tmp_path / "w")
    assert code == 1 and "audio_detokenizer: not found" in err and "--detokenizer" in err
    asr = write_asr_data(tmp_path / "asr", tiny.config, n=1)  # task_type understanding: text answers only
    code, _, err = cli("infer", "-m", speech_model, "-d", asr, "--audio-dir", tmp_path / "w")
    assert code == 1 and "no sample answers in speech" in err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "song.wav").write_bytes(b"keep")
    code, _, err = cli("infer", "-m", speech_model, "-d", speech_data, "--audio-dir", mine, *SAMPLING)
    assert code == 1 and "was not made by `kimi-lora infer`" in err
    assert [p.name for p in mine.iterdir()] == ["song.wav"] and (mine / "song.wav").read_bytes() == b"keep"


def test_no_wav_at_all_is_said_with_the_reason(cli, speech_model, speech_data, tmp_path):
    """One step is less than the audio delay: no answer can hold an audio code, so no WAV is written."""
    wavs = tmp_path / "wavs"
    code, out, err = cli("infer", "-m", speech_model, "-d", speech_data, "--audio-dir", wavs, "--max-new-tokens", "1")
    assert code == 0, err
    said = " ".join(out.split())
    assert "spoken answers in" not in said and "no spoken answer" in said
    assert f"no spoken answer was produced, so {wavs} holds no WAV" in said and "raise --max-new-tokens" in said
    assert not list(wavs.glob("*.wav"))
    code, out, err = cli("infer", "-m", speech_model, "-d", speech_data, "--audio-dir", tmp_path / "w2",
                         "--max-new-tokens", "1", "--json")
    payload = json.loads(out)
    assert payload["spoken_answers"] == 0 and any("no spoken answer was produced" in n for n in payload["notes"])
