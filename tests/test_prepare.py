"""`kimi-lora prepare`: tokens added and loadable, checks with line numbers, resume, rejects, cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from kimi_lora_cli.data.audio import load_audio
from kimi_lora_cli.data.prepare import DataProblems, PrepareSpec, prepare
from kimi_lora_cli.errors import ConfigError
from kimi_lora_cli.loading import load_speech_tokenizer
from kimi_lora_cli.models.kimi_audio.whisper import rows_for_samples
from kimi_lora_cli.models.speech_tokenizer.tiny import build_tiny_speech_tokenizer, synthetic_speech


@pytest.fixture(scope="module")
def st_dir(tmp_path_factory):
    # 128 codes: the tiny Kimi checkpoint's audio vocabulary.
    return build_tiny_speech_tokenizer(tmp_path_factory.mktemp("glm") / "glm-4-voice-tokenizer", vocab=128)


@pytest.fixture(scope="module")
def st(st_dir):
    return load_speech_tokenizer(st_dir)


@pytest.fixture(scope="module")
def offset(tiny_dir):
    return json.loads((tiny_dir / "config.json").read_text())["kimia_token_offset"]


def asr_line(audio, **extra) -> str:
    return json.dumps({"task_type": "understanding", "conversation": [
        {"role": "user", "message_type": "text", "content": "Please transcribe the spoken content."},
        {"role": "user", "message_type": "audio", "content": str(audio), **extra},
        {"role": "assistant", "message_type": "text", "content": "the quick brown fox"},
    ]})


@pytest.fixture()
def corpus(tmp_path):
    """data/ with wav (16 kHz), flac (22.05 kHz, stereo) and broken files, jsonl beside them."""
    audio = tmp_path / "data" / "audio"
    audio.mkdir(parents=True)
    sf.write(audio / "a.wav", synthetic_speech(2.0, seed=1), 16000)
    stereo = np.stack([synthetic_speech(1.5, seed=2, sr=22050), synthetic_speech(1.5, seed=3, sr=22050)], 1)
    sf.write(audio / "b.flac", stereo, 22050)
    sf.write(audio / "c.wav", synthetic_speech(3.1, seed=4), 16000)
    (audio / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" * 8)
    (audio / "empty.wav").write_bytes(b"")
    sf.write(audio / "zero.wav", np.zeros(0, np.float32), 16000)
    return tmp_path / "data"


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def expected_tokens(st, path: Path, offset: int) -> list[int]:
    return [c + offset for c in st.tokenize(load_audio(path))]


def test_prepare_adds_tokens_that_train_can_use(corpus, tiny_dir, tiny, st_dir, st, offset, tmp_path):
    from kimi_lora_cli.data.conversation import tokenize_conversation

    data = write_jsonl(corpus / "train.jsonl", [asr_line("audio/a.wav"), asr_line("audio/b.flac"),
                                                asr_line(corpus / "audio" / "c.wav")])
    out = tmp_path / "elsewhere" / "train.prepared.jsonl"
    result = prepare(PrepareSpec(model=tiny_dir, data=data, output=out, speech_tokenizer=st_dir, batch_size=2))
    assert result.lines_written == 3 and result.audio_tokenized == 3 and result.lines_rejected == 0
    rows = read_jsonl(out)
    originals = read_jsonl(data)
    for row, orig, name in zip(rows, originals, ["a.wav", "b.flac", "c.wav"]):
        path = corpus / "audio" / name
        msg = row["conversation"][1]
        assert msg["audio_tokens"] == expected_tokens(st, path, offset)
        assert len(msg["audio_tokens"]) == rows_for_samples(len(load_audio(path)))
        # The relative path now reads the same file from the output's folder; the rest is untouched.
        assert (out.parent / msg["content"]).resolve() == path.resolve()
        assert row["conversation"][0] == orig["conversation"][0] and row["conversation"][2] == orig["conversation"][2]
        seq = tokenize_conversation(row["conversation"], tiny.tokenizer, tiny.config, "text")
        assert seq.media[0].length == len(msg["audio_tokens"])
    assert not list(out.parent.glob("*.partial*"))


def test_audio_text_history_gets_tokens(corpus, tiny_dir, tiny, st_dir, st, offset, tmp_path):
    from kimi_lora_cli.data.conversation import tokenize_conversation

    line = json.dumps({"task_type": "speech_conversation", "conversation": [
        {"role": "user", "message_type": "audio", "content": "audio/a.wav"},
        {"role": "assistant", "message_type": "audio-text", "content": ["audio/c.wav", "hello there"]},
    ]})
    data = write_jsonl(corpus / "at.jsonl", [line])
    out = tmp_path / "at.out.jsonl"
    assert prepare(PrepareSpec(model=tiny_dir, data=data, output=out, speech_tokenizer=st_dir)).audio_tokenized == 2
    conv = read_jsonl(out)[0]["conversation"]
    assert conv[1]["audio_tokens"] == expected_tokens(st, corpus / "audio" / "c.wav", offset)
    assert (out.parent / conv[1]["content"][0]).resolve() == (corpus / "audio" / "c.wav").resolve()
    assert conv[1]["content"][1] == "hello there"
    seq = tokenize_conversation(conv, tiny.tokenizer, tiny.config, "both")
    assert sum(seq.audio_ids[i] >= offset for i in range(len(seq))) == sum(len(m["audio_tokens"]) for m in conv)


def test_existing_tokens_kept_unless_recompute(corpus, tiny_dir, st_dir, st, offset, tmp_path):
    path = corpus / "audio" / "a.wav"
    n = rows_for_samples(len(load_audio(path)))
    given = [offset + (i % 7) for i in range(n)]
    data = write_jsonl(corpus / "given.jsonl", [asr_line("audio/a.wav", audio_tokens=given)])
    # Complete data: no speech tokenizer needed, the checks still run and the line is copied.
    checked = prepare(PrepareSpec(model=tiny_dir, data=data, output=corpus / "checked.jsonl"))
    assert checked.audio_kept == 1 and checked.audio_tokenized == 0
    assert read_jsonl(corpus / "checked.jsonl") == read_jsonl(data)
    kept = prepare(PrepareSpec(model=tiny_dir, data=data, output=tmp_path / "kept.jsonl", speech_tokenizer=st_dir))
    assert read_jsonl(tmp_path / "kept.jsonl")[0]["conversation"][1]["audio_tokens"] == given
    assert any("not needed" in note for note in kept.notes)
    prepare(PrepareSpec(model=tiny_dir, data=data, output=tmp_path / "re.jsonl", speech_tokenizer=st_dir,
                        recompute=True))
    assert read_jsonl(tmp_path / "re.jsonl")[0]["conversation"][1]["audio_tokens"] == expected_tokens(st, path, offset)
    with pytest.raises(ConfigError, match="--recompute needs --speech-tokenizer"):
        prepare(PrepareSpec(model=tiny_dir, data=data, output=tmp_path / "x.jsonl", recompute=True))


def test_bad_lines_all_reported_with_line_numbers(corpus, tiny_dir, st_dir, cli, offset):
    lines = [
        asr_line("audio/a.wav"),
        asr_line("audio/missing.wav"),
        asr_line("audio/empty.wav"),
        asr_line("audio/corrupt.wav"),
        asr_line("audio/zero.wav"),
        "{not json",
        json.dumps({"conversation": [{"role": "robot", "message_type": "audio"}]}),
        asr_line("audio/a.wav", audio_tokens=[offset + 1, 5]),
        asr_line("audio/a.wav", audio_tokens=[offset + 1] * 3),
    ]
    data = write_jsonl(corpus / "bad.jsonl", lines)
    out = corpus / "out.jsonl"
    code, stdout, stderr = cli("prepare", "--model", tiny_dir, "--speech-tokenizer", st_dir, "--data", data,
                               "--output", out)
    assert code == 1
    flat = " ".join(stderr.split())
    for expected in [
        "bad.jsonl:2: message 1: audio file 'audio/missing.wav' not found",
        "bad.jsonl:3: message 1: audio file 'audio/empty.wav' is empty (0 bytes)",
        "bad.jsonl:4: message 1: audio file 'audio/corrupt.wav' cannot be decoded",
        "bad.jsonl:5: message 1: audio file 'audio/zero.wav' holds no samples",
        "bad.jsonl:6: invalid JSON",
        "bad.jsonl:7: message 0: missing key content",
        "bad.jsonl:7: message 0: unknown role 'robot'",
        "bad.jsonl:7: no assistant message",
        f"bad.jsonl:8: message 1: audio token 5 outside [{offset},",
        "bad.jsonl:9: message 1: 3 audio_tokens but the audio (2.00 s) yields 25",
        "Error: ",
        "10 problems in 8 lines",
    ]:
        assert expected in flat, expected
    assert "bad.jsonl:1:" not in flat
    assert "Traceback" not in stderr
    assert not out.exists() and not list(corpus.glob("out.jsonl*"))


def test_missing_file_and_missing_tokens_are_two_findings(corpus, tiny_dir):
    data = write_jsonl(corpus / "two.jsonl", [asr_line("audio/a.wav"), asr_line("audio/nope.wav")])
    with pytest.raises(DataProblems) as info:
        prepare(PrepareSpec(model=tiny_dir, data=data, output=corpus / "o.jsonl"))
    rendered = [f.render("two.jsonl") for f in info.value.findings]
    assert rendered[0].startswith("two.jsonl:1: message 1: no audio_tokens; pass --speech-tokenizer")
    assert [r.split(": ")[0] for r in rendered] == ["two.jsonl:1", "two.jsonl:2", "two.jsonl:2"]
    assert "not found" in rendered[1] and "no audio_tokens" in rendered[2]


def test_skip_bad_writes_rejects_and_never_empty_tokens(corpus, tiny_dir, st_dir, cli):
    lines = [asr_line("audio/a.wav"), asr_line("audio/missing.wav"), asr_line("audio/corrupt.wav"),
             asr_line("audio/c.wav"), "[1, 2]"]
    data = write_jsonl(corpus / "mixed.jsonl", lines)
    out = corpus / "mixed.out.jsonl"
    code, stdout, stderr = cli("prepare", "-m", tiny_dir, "--speech-tokenizer", st_dir, "-d", data, "-o", out,
                               "--skip-bad", "--json")
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["lines_written"] == 2 and summary["lines_rejected"] == 3
    rows = read_jsonl(out)
    assert [r["conversation"][1]["content"] for r in rows] == ["audio/a.wav", "audio/c.wav"]
    assert all(r["conversation"][1]["audio_tokens"] for r in rows)
    rejects = read_jsonl(corpus / "mixed.out.rejects.jsonl")
    assert summary["rejects"] == str(corpus / "mixed.out.rejects.jsonl")
    assert [r["line"] for r in rejects] == [2, 3, 5]
    assert "not found" in rejects[0]["problems"][0] and "cannot be decoded" in rejects[1]["problems"][0]
    assert json.loads(rejects[0]["text"]) == json.loads(lines[1])


def test_resume_continues_after_interruption(corpus, tiny_dir, st_dir, tmp_path):
    names = ["a.wav", "b.flac", "c.wav", "a.wav", "c.wav"]
    data = write_jsonl(corpus / "resume.jsonl", [asr_line(f"audio/{n}") for n in names])
    full = corpus / "full.jsonl"
    prepare(PrepareSpec(model=tiny_dir, data=data, output=full, speech_tokenizer=st_dir, batch_size=1))

    out = corpus / "resume.out.jsonl"
    spec = PrepareSpec(model=tiny_dir, data=data, output=out, speech_tokenizer=st_dir, batch_size=1)
    calls = []

    def crash_on_third_batch(p):
        calls.append(p.files_done)
        if p.stage == "prepare" and p.files_done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare(spec, progress=crash_on_third_batch)
    assert not out.exists(), "the output appears only when complete"
    partial = Path(str(out) + ".partial")
    assert len(partial.read_text().splitlines()) == 2

    seen = []
    result = prepare(spec, progress=lambda p: seen.append((p.stage, p.files_total)))
    assert result.resumed_at_line == 3
    assert ("prepare", 3) in seen  # only lines 3-5 were left to tokenize
    assert result.audio_tokenized == 5 and result.lines_written == 5  # counters carry over
    assert out.read_text() == full.read_text()
    assert not partial.exists() and not Path(str(out) + ".partial.json").exists()


def test_resume_starts_over_after_a_run_of_an_older_resampler(corpus, tiny_dir, st_dir, tmp_path):
    """Lines an earlier version coded (other 16 kHz waveforms for b.flac at 22.05 kHz) are not kept."""
    data = write_jsonl(corpus / "old.jsonl", [asr_line(f"audio/{n}") for n in ("b.flac", "a.wav", "c.wav")])
    full = tmp_path / "full.jsonl"
    prepare(PrepareSpec(model=tiny_dir, data=data, output=full, speech_tokenizer=st_dir, batch_size=1))
    out = tmp_path / "old.out.jsonl"
    spec = PrepareSpec(model=tiny_dir, data=data, output=out, speech_tokenizer=st_dir, batch_size=1)

    def stop_after_two(p):
        if p.stage == "prepare" and p.files_done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare(spec, progress=stop_after_two)
    state_file = Path(str(out) + ".partial.json")
    state = json.loads(state_file.read_text())
    assert state["next_line"] > 1 and state["options"].pop("resampler")
    state_file.write_text(json.dumps(state))  # what the version before soxr left
    result = prepare(spec)
    assert result.resumed_at_line == 0 and result.audio_tokenized == 3
    assert out.read_text() == full.read_text()


def test_resume_starts_over_when_done_lines_changed(corpus, tiny_dir, st_dir):
    data = write_jsonl(corpus / "edit.jsonl", [asr_line("audio/a.wav"), asr_line("audio/c.wav"),
                                               asr_line("audio/missing.wav")])
    out = corpus / "edit.out.jsonl"
    spec = PrepareSpec(model=tiny_dir, data=data, output=out, speech_tokenizer=st_dir, batch_size=1)
    with pytest.raises(DataProblems):
        prepare(spec)  # line 3 is bad: nothing written yet, fix it and rerun
    assert not Path(str(out) + ".partial").exists()
    # A file whose header reads but whose samples do not fails while writing: lines 1-2 are kept.
    good = corpus / "audio" / "late.flac"
    sf.write(good, synthetic_speech(2.0, seed=5), 16000)
    raw = good.read_bytes()
    good.write_bytes(raw[:300])  # STREAMINFO intact, frames cut
    lines = data.read_text().splitlines()
    lines[2] = asr_line("audio/late.flac")
    write_jsonl(data, lines)
    with pytest.raises(DataProblems) as info:
        prepare(spec)
    assert [f.line for f in info.value.findings] == [3]
    assert "cannot decode audio" in info.value.findings[0].message
    assert len(Path(str(out) + ".partial").read_text().splitlines()) == 2
    good.write_bytes(raw)
    logs: list[str] = []
    assert prepare(spec, log=logs.append).resumed_at_line == 3 and not logs
    # Editing a line that was already written makes the rerun of an interrupted run start over.
    out.unlink()

    def stop_after_two(p):
        if p.stage == "prepare" and p.files_done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare(spec, progress=stop_after_two)
    lines[0] = asr_line("audio/c.wav")
    write_jsonl(data, lines)
    result = prepare(spec, log=logs.append)
    assert result.resumed_at_line == 0 and result.audio_tokenized == 3
    assert "changed since the interrupted run; starting over" in logs[0]
    assert read_jsonl(out)[0]["conversation"][1]["content"] == "audio/c.wav"


def test_cache_features_keyed_by_content(corpus, tiny_dir, tiny, st_dir, tmp_path):
    import torch
    from safetensors import safe_open

    from kimi_lora_cli.data.features import FeatureStore, file_sha256

    data = write_jsonl(corpus / "feat.jsonl", [asr_line("audio/a.wav"), asr_line("audio/b.flac"),
                                               asr_line("audio/a.wav")])
    cache = tmp_path / "features"
    spec = PrepareSpec(model=tiny_dir, data=data, output=tmp_path / "f.jsonl", speech_tokenizer=st_dir,
                       cache_features=cache)
    result = prepare(spec)
    assert result.features_written == 2 and result.features_reused == 1  # a.wav twice, one file
    files = sorted(p.name for p in cache.iterdir())
    assert files == sorted(f"{file_sha256(corpus / 'audio' / n)}.safetensors" for n in ("a.wav", "b.flac"))
    store = FeatureStore(tiny.feature_encoder, cache_dir=cache)
    with safe_open(str(cache / files[0]), framework="pt") as f:
        assert f.keys() == ["features"] and f.metadata()["whisper_fingerprint"] == store.fingerprint
    rows = read_jsonl(tmp_path / "f.jsonl")
    paths = [corpus / "audio" / name for name in ("a.wav", "b.flac")]
    for row, feats, path in zip(rows, store.rows(paths), paths):
        assert feats.shape == (len(row["conversation"][1]["audio_tokens"]), tiny.feature_encoder.row_dim)
        torch.testing.assert_close(feats, tiny.feature_encoder.encode(load_audio(path)))
    assert store.stats.disk_hits == 2 and store.stats.computed == 0
    store.fingerprint = "another-encoder"  # entries made by other Whisper weights are not used
    assert store._read_disk(file_sha256(paths[0]), paths[0]) is None
    again = prepare(PrepareSpec(**{**spec.__dict__, "overwrite": True}))
    assert again.features_written == 0 and again.features_reused == 3


def test_train_reuses_the_features_prepare_cached(corpus, tiny_dir, tiny, st_dir, tmp_path, cli):
    """prepare --cache-features DIR, then train --cache-features DIR: Whisper never runs in train."""
    from kimi_lora_cli.training.config import TrainConfig
    from kimi_lora_cli.training.reporting import Reporter
    from kimi_lora_cli.training.trainer import Trainer

    data = write_jsonl(corpus / "reuse.jsonl", [asr_line("audio/a.wav"), asr_line("audio/b.flac"),
                                                asr_line("audio/c.wav"), asr_line("audio/a.wav")])
    cache, prepared = tmp_path / "features", tmp_path / "prepared.jsonl"
    code, _, stderr = cli("prepare", "-m", tiny_dir, "--speech-tokenizer", st_dir, "-d", data, "-o", prepared,
                          "--cache-features", cache)
    assert code == 0, stderr
    assert len(list(cache.glob("*.safetensors"))) == 3
    cfg = TrainConfig.build(flag_values=dict(data_path=str(prepared), model_name_or_path=str(tiny_dir),
                                             output_dir=str(tmp_path / "run"), use_lora=True, max_steps=2,
                                             per_device_train_batch_size=2, device="cpu", cache_features=str(cache)))
    trainer = Trainer(cfg, Reporter(enabled=False))
    trainer.setup()
    encoder = trainer.loaded.feature_encoder
    calls = []
    real = encoder.encode_batch
    encoder.encode_batch = lambda waves, **kw: calls.append(len(waves)) or real(waves, **kw)
    result = trainer.run()
    assert result.global_step == 2 and not result.interrupted
    assert calls == [] and trainer.store.stats.computed == 0
    assert trainer.store.stats.disk_hits == 3  # one read per file; later batches hit memory

def test_refusals(corpus, tiny_dir, tmp_path):
    big = build_tiny_speech_tokenizer(tmp_path / "big", vocab=256)
    data = write_jsonl(corpus / "r.jsonl", [asr_line("audio/a.wav")])
    with pytest.raises(ConfigError, match="256 codes \\+ kimia_token_offset .* exceed the model's vocab_size"):
        prepare(PrepareSpec(model=tiny_dir, data=data, output=tmp_path / "o.jsonl", speech_tokenizer=big))
    with pytest.raises(ConfigError, match="--output must differ from --data"):
        prepare(PrepareSpec(model=tiny_dir, data=data, output=data))
    (tmp_path / "done.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match="already exists and is not a file `kimi-lora prepare` wrote"):
        prepare(PrepareSpec(model=tiny_dir, data=data, output=tmp_path / "done.jsonl", speech_tokenizer=big))


@pytest.mark.parametrize("layout", ["release", "finetune"])
def test_feature_encoder_alone_matches_load_model(tmp_path, layout, corpus):
    """prepare reads only the Whisper encoder (no LM); it must be the encoder load_model gives."""
    import torch

    from kimi_lora_cli.loading import load_feature_encoder, load_model
    from kimi_lora_cli.models.kimi_audio.tiny import build_tiny_checkpoint

    folder = build_tiny_checkpoint(tmp_path / layout, layout=layout)
    enc = load_feature_encoder(folder, dtype="float32")
    wave = load_audio(corpus / "audio" / "a.wav")
    full = load_model(folder, dtype="float32", load_tokenizer_=False).feature_encoder
    torch.testing.assert_close(enc.encode(wave), full.encode(wave), rtol=0, atol=0)


def test_skip_bad_with_every_line_bad_fails_and_names_the_rejects(corpus, tiny_dir, st_dir, cli):
    data = write_jsonl(corpus / "allbad.jsonl", [asr_line("audio/missing.wav"), asr_line("audio/corrupt.wav")])
    out = corpus / "allbad.out.jsonl"
    code, stdout, stderr = cli("prepare", "-m", tiny_dir, "--speech-tokenizer", st_dir, "-d", data, "-o", out,
                               "--skip-bad")
    said = " ".join(stderr.split())
    assert code == 1 and "Traceback" not in stderr
    rejects = corpus / "allbad.out.rejects.jsonl"
    assert "none of its 2 lines is usable" in said and str(rejects) in said
    assert "was not needed" not in said + stdout  # the speech tokenizer was needed; no line reached it
    assert not out.exists() and [r["line"] for r in read_jsonl(rejects)] == [1, 2]
    code, _, stderr = cli("prepare", "-m", tiny_dir, "--speech-tokenizer", st_dir, "-d", data, "-o", out,
                          "--skip-bad", "--overwrite")
    assert code == 1 and "none of its 2 lines is usable" in " ".join(stderr.split())
