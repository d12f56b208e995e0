"""Train straight from a CSV, a Kaldi folder and a saved Hugging Face dataset: the same losses as
training on the jsonl `prepare` converts the CSV into; prepare's summary table, --dry-run and --json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXTS = ["hello world", "good morning", "the cat sat", "on the mat"]


@pytest.fixture(scope="module")
def byo(tmp_path_factory):
    root = tmp_path_factory.mktemp("byo")
    (root / "wavs").mkdir()
    clips = []
    for i, _ in enumerate(TEXTS):
        p = root / "wavs" / f"u{i}.wav"
        rate = (16000, 22050, 44100, 8000)[i]  # any rate: the one loader resamples
        sf.write(p, np.random.default_rng(i).uniform(-0.3, 0.3, int(rate * (0.6 + 0.2 * i))).astype(np.float32), rate)
        clips.append(p)
    (root / "m.csv").write_text("path,sentence\n" + "".join(f"wavs/u{i}.wav,{t}\n" for i, t in enumerate(TEXTS)))
    kaldi = root / "kaldi"
    kaldi.mkdir()
    (kaldi / "wav.scp").write_text("".join(f"u{i} ../wavs/u{i}.wav\n" for i in range(len(TEXTS))))
    (kaldi / "text").write_text("".join(f"u{i} {t}\n" for i, t in enumerate(TEXTS)))
    return root, clips


def _losses(out: Path) -> list[float]:
    rows = [json.loads(x) for x in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _train(cli, tiny_dir, data, out, *extra):
    code, stdout, stderr = cli("train", "--model-name-or-path", tiny_dir, "--data-path", data, "--output-dir", out,
                               "--use-lora", "--lora-rank", "2", "--lora-target", "q_proj,v_proj", "--max-steps", "3",
                               "--logging-steps", "1", "--save-steps", "100", "--learning-rate", "1e-2",
                               "--device", "cpu", *extra)
    assert code == 0, stderr
    return _losses(out)


def test_train_on_csv_kaldi_and_hf_equals_the_converted_jsonl(byo, cli, tiny_dir, tiny_speech_tokenizer_dir,
                                                             tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("KIMI_LORA_CACHE", str(tmp_path / "cache"))
    root, clips = byo
    st = str(tiny_speech_tokenizer_dir)
    code, stdout, stderr = cli("prepare", "-m", tiny_dir, "--speech-tokenizer", st, "-d", root / "m.csv",
                               "-o", tmp_path / "conv.jsonl")
    assert code == 0, stderr
    assert "samples" in stdout and "tokens per sample" in stdout and "(csv)" in stdout
    lines = [json.loads(x) for x in (tmp_path / "conv.jsonl").read_text().splitlines()]
    assert [m["content"] for m in lines[0]["conversation"][::2]] == [
        "Please transcribe the spoken content into written text.", "hello world"]
    assert all(ln["conversation"][1]["audio_tokens"] for ln in lines)
    reference = _train(cli, tiny_dir, tmp_path / "conv.jsonl", tmp_path / "ref")
    assert len(reference) == 3 and all(np.isfinite(reference))
    assert _train(cli, tiny_dir, root / "m.csv", tmp_path / "csv", "--speech-tokenizer", st) == reference
    assert _train(cli, tiny_dir, root / "kaldi", tmp_path / "kaldi", "--speech-tokenizer", st) == reference
    ds = datasets.Dataset.from_dict({"audio": [str(c) for c in clips], "text": TEXTS})
    ds.cast_column("audio", datasets.Audio()).save_to_disk(str(tmp_path / "hf"))
    assert _train(cli, tiny_dir, tmp_path / "hf", tmp_path / "hfrun", "--speech-tokenizer", st) == reference
    assert any((tmp_path / "cache" / "clips").glob("*.wav"))  # the dataset's rows, written once as clips


def test_prepare_summary_dry_run_and_json(byo, cli, tiny_dir, tmp_path):
    root, clips = byo
    code, stdout, stderr = cli("prepare", "-m", tiny_dir, "-d", root / "kaldi", "--dry-run", "--task", "tts")
    assert code == 0, stderr
    assert "(kaldi)" in stdout and "Dry run: 4 samples would be written" in stdout
    assert not list(tmp_path.iterdir())
    code, stdout, stderr = cli("prepare", "-m", tiny_dir, "-d", root / "m.csv", "--dry-run", "--json",
                               "--model-max-length", "40")
    assert code == 0, stderr
    s = json.loads(stdout)["summary"]
    assert s["format"] == "csv" and s["samples"] == 4 and s["clips"] == 4
    assert s["duration_s"]["min"] == pytest.approx(0.6) and s["duration_s"]["max"] == pytest.approx(1.2)
    assert s["hours"] == pytest.approx((0.6 + 0.8 + 1.0 + 1.2) / 3600)
    longest = s["tokens_per_sample"]["max"]
    assert longest >= s["tokens_per_sample"]["median"] > 20 and s["over_max_length"] == 0
    assert 0 < s["packed_fill"] <= 1
    assert s["clips_over_30s"] == 0 and s["skipped"] == 0 and s["model_max_length"] == 40
    code, stdout, _ = cli("prepare", "-m", tiny_dir, "-d", root / "m.csv", "--dry-run", "--json",
                          "--model-max-length", str(longest - 1))
    assert json.loads(stdout)["summary"]["over_max_length"] >= 1


def test_prepare_skip_bad_counts_reasons_and_resumes_a_manifest(byo, cli, tiny_dir, tiny_speech_tokenizer_dir,
                                                               tmp_path):
    root, clips = byo
    manifest = tmp_path / "nemo.json"
    rows = [{"audio_filepath": str(c), "text": t, "duration": 1.0} for c, t in zip(clips, TEXTS)]
    rows.insert(1, {"audio_filepath": "gone.wav", "text": "x"})
    rows.insert(3, {"audio_filepath": str(clips[0]), "text": ""})
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, stdout, stderr = cli("prepare", "-m", tiny_dir, "--speech-tokenizer", tiny_speech_tokenizer_dir,
                               "-d", manifest, "-o", tmp_path / "out.jsonl", "--skip-bad", "--json")
    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["lines_written"] == 4 and result["lines_rejected"] == 2
    assert result["summary"]["skipped"] == 2 and len(result["summary"]["skipped_reasons"]) == 2
    rejects = [json.loads(x) for x in Path(result["rejects"]).read_text().splitlines()]
    assert [r["line"] for r in rejects] == [2, 4] and "empty transcript" in rejects[1]["problems"][0]


def test_infer_reads_a_csv_with_its_transcripts_as_references(byo, cli, tiny_dir, tiny_speech_tokenizer_dir,
                                                              tmp_path):
    root, clips = byo
    code, stdout, stderr = cli("infer", "-m", tiny_dir, "-d", root / "m.csv", "--speech-tokenizer",
                               tiny_speech_tokenizer_dir, "--max-new-tokens", "2", "--device", "cpu",
                               "-o", tmp_path / "preds.jsonl", "--json")
    assert code == 0, stderr
    preds = [json.loads(x) for x in (tmp_path / "preds.jsonl").read_text().splitlines()]
    assert [p["reference"] for p in preds] == TEXTS
    assert json.loads(stdout)["samples"] == 4
