"""Bring your own data: the same clips and transcripts written in every format the source layer reads
give the same official conversations (one golden list), read by `open_source`, train's reader and
`prepare`; detection, --format, --columns, --task/--language/--instruction and streaming.

Clip files are compared by their decoded 16 kHz samples (the one audio loader), so a clip a source
had to write (a segment of a recording, a dataset row) counts as equal to the file it came from."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from kimi_lora_cli.data.audio import load_audio, resample
from kimi_lora_cli.data.sources import SourceOptions, detect_format, open_source
from kimi_lora_cli.errors import ConfigError, DataError

EN = "Please transcribe the spoken content into written text."
ZH = "请将音频内容转换为文字。"
TEXTS = ["hello world", "good morning to you", "the cat sat on the mat"]
IDS = ["1-10-0000", "1-10-0001", "1-10-0002"]
LENGTHS = [8000, 9600, 11200]  # samples at 16 kHz


def _wave(i: int, n: int) -> np.ndarray:
    # on the 16-bit grid, so a FLOAT wav and a 16-bit flac of it decode to the same samples
    return (np.round(np.random.default_rng(i).standard_normal(n) * 3276.8) / 32768 + 0.0).astype(np.float32)  # no -0.0


def digest(path: str | Path) -> str:
    return hashlib.sha256(load_audio(path).tobytes()).hexdigest()


def golden(clips: list[Path], instruction: str = EN) -> list[dict]:
    """The official conversations of the three clips: user instruction, user audio, assistant transcript."""
    return [{"task_type": "understanding", "conversation": [
        {"role": "user", "message_type": "text", "content": instruction},
        {"role": "user", "message_type": "audio", "content": digest(c)},
        {"role": "assistant", "message_type": "text", "content": t}]} for c, t in zip(clips, TEXTS)]


def normalised(source) -> list[dict]:
    """The source's records with each audio content replaced by the digest of its samples."""
    out = []
    for rec in source:
        assert rec.error is None, f"{rec.where}: {rec.error}"
        obj = json.loads(json.dumps(rec.obj))
        for m in obj["conversation"]:
            if m["message_type"] == "audio":
                p = Path(m["content"])
                m["content"] = digest(p if p.is_absolute() else source.base_dir / p)
        out.append(obj)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Three 16 kHz float clips, a recording that is the three end to end, and every format."""
    root = tmp_path_factory.mktemp("sources")
    clips_dir = root / "clips"
    clips_dir.mkdir()
    clips = []
    for i, n in enumerate(LENGTHS):
        p = clips_dir / f"c{i}.wav"
        sf.write(p, _wave(i, n), 16000, subtype="FLOAT")
        clips.append(p)
    rec = root / "rec.wav"
    sf.write(rec, np.concatenate([_wave(i, n) for i, n in enumerate(LENGTHS)]), 16000, subtype="FLOAT")
    starts = [float(s) for s in np.cumsum([0, *LENGTHS])[:-1] / 16000]
    f = {}
    # official jsonl
    f["jsonl"] = root / "official.jsonl"
    f["jsonl"].write_text("".join(json.dumps({"task_type": "understanding", "conversation": [
        {"role": "user", "message_type": "text", "content": EN},
        {"role": "user", "message_type": "audio", "content": f"clips/c{i}.wav"},
        {"role": "assistant", "message_type": "text", "content": t}]}) + "\n" for i, t in enumerate(TEXTS)))
    # NeMo: plain files, and offsets into the recording
    f["nemo"] = root / "manifest.json"
    f["nemo"].write_text("".join(json.dumps({"audio_filepath": f"clips/c{i}.wav", "text": t,
                                             "duration": LENGTHS[i] / 16000}) + "\n" for i, t in enumerate(TEXTS)))
    f["nemo_offset"] = root / "offsets.jsonl"
    f["nemo_offset"].write_text("".join(json.dumps({"audio_filepath": "rec.wav", "text": t, "offset": starts[i],
                                                    "duration": LENGTHS[i] / 16000, "lang": "en"}) + "\n"
                                        for i, t in enumerate(TEXTS)))
    # CSV (generic names), Common Voice TSV (path relative to clips/)
    f["csv"] = root / "manifest.csv"
    f["csv"].write_text("file,transcript,speaker\n" + "".join(f"clips/c{i}.wav,{t},s{i}\n" for i, t in enumerate(TEXTS)))
    cv = root / "cv"
    (cv / "clips").mkdir(parents=True)
    for c in clips:
        (cv / "clips" / c.name).write_bytes(c.read_bytes())
    f["tsv"] = cv / "train.tsv"
    f["tsv"].write_text("client_id\tpath\tsentence\tup_votes\n" + "".join(f"x\tc{i}.wav\t{t}\t2\n" for i, t in enumerate(TEXTS)))
    f["columns"] = root / "custom.csv"
    f["columns"].write_text("wavfile;words\n".replace(";", ",") + "".join(f"clips/c{i}.wav,{t}\n" for i, t in enumerate(TEXTS)))
    # Kaldi: plain wav.scp, and segments of the recording
    kaldi = root / "kaldi"
    kaldi.mkdir()
    (kaldi / "wav.scp").write_text("".join(f"u{i} {c}\n" for i, c in enumerate(clips)))
    (kaldi / "text").write_text("".join(f"u{i} {t}\n" for i, t in enumerate(TEXTS)))
    f["kaldi"] = kaldi
    seg = root / "kaldi_seg"
    seg.mkdir()
    (seg / "wav.scp").write_text("rec1 ../rec.wav\n")
    (seg / "segments").write_text("".join(f"u{i} rec1 {starts[i]!r} {starts[i] + LENGTHS[i] / 16000!r}\n"
                                          for i in range(3)))
    (seg / "text").write_text("".join(f"u{i} {t}\n" for i, t in enumerate(TEXTS)))
    f["kaldi_seg"] = seg
    # folder of audio + .txt / .lab, and a LibriSpeech tree
    folder = root / "folder"
    folder.mkdir()
    for i, (c, t) in enumerate(zip(clips, TEXTS)):
        (folder / c.name).write_bytes(c.read_bytes())
        (folder / f"c{i}{'.lab' if i == 1 else '.txt'}").write_text(t + "\n")
    f["folder"] = folder
    libri = root / "LibriSpeech" / "dev-clean" / "1" / "10"
    libri.mkdir(parents=True)
    for c, u in zip(clips, IDS):
        data, _ = sf.read(c, dtype="float32")
        sf.write(libri / f"{u}.flac", data, 16000, subtype="PCM_16")
    (libri / "1-10.trans.txt").write_text("".join(f"{u} {t}\n" for u, t in zip(IDS, TEXTS)))
    f["librispeech"] = root / "LibriSpeech"
    # chat JSON: LLaMA-Factory sharegpt (from/value, dataset_info.json), ms-swift, OpenAI parts, alpaca
    lf = root / "lf"
    lf.mkdir()
    (lf / "asr.json").write_text(json.dumps([{"conversations": [
        {"from": "human", "value": f"{EN}<audio>"}, {"from": "gpt", "value": t}],
        "audios": [str(c)]} for c, t in zip(clips, TEXTS)]))
    (lf / "dataset_info.json").write_text(json.dumps({"asr": {
        "file_name": "asr.json", "formatting": "sharegpt", "columns": {"messages": "conversations", "audios": "audios"},
        "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt"}}}))
    f["llamafactory"] = lf / "asr.json"
    f["swift"] = root / "swift.jsonl"
    f["swift"].write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"{EN}<audio>"}, {"role": "assistant", "content": t}],
        "audios": [f"clips/c{i}.wav"]}) + "\n" for i, t in enumerate(TEXTS)))
    f["openai"] = root / "openai.jsonl"
    f["openai"].write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": [{"type": "text", "text": EN},
                                     {"type": "input_audio", "input_audio": {
                                         "data": base64.b64encode(c.read_bytes()).decode(), "format": "wav"}}]},
        {"role": "assistant", "content": [{"type": "text", "text": t}]}]}) + "\n" for c, t in zip(clips, TEXTS)))
    f["alpaca"] = root / "alpaca.json"
    f["alpaca"].write_text(json.dumps([{"instruction": f"{EN}<audio>", "input": "", "output": t,
                                        "audios": [f"clips/c{i}.wav"]} for i, t in enumerate(TEXTS)]))
    return root, clips, f


FORMATS = {"jsonl": "jsonl", "nemo": "nemo", "nemo_offset": "nemo", "csv": "csv", "tsv": "tsv", "kaldi": "kaldi",
           "kaldi_seg": "kaldi", "folder": "folder", "librispeech": "librispeech", "llamafactory": "chat",
           "swift": "chat", "openai": "chat", "alpaca": "chat"}


@pytest.mark.parametrize("name", list(FORMATS))
def test_every_format_gives_the_golden_conversations(world, name, tmp_path):
    root, clips, files = world
    assert detect_format(str(files[name]))[0] == FORMATS[name]
    source = open_source(files[name], SourceOptions(clip_dir=tmp_path / "clips"))
    assert normalised(source) == golden(clips)
    # --format forces the same reader
    forced = open_source(files[name], SourceOptions(format=FORMATS[name], clip_dir=tmp_path / "clips"))
    assert normalised(forced) == golden(clips)


def test_columns_language_instruction_and_tts(world, tmp_path):
    root, clips, files = world
    with pytest.raises(DataError, match=r"custom\.csv: looks like a CSV with columns wavfile, words .*"
                                        r"--format csv --columns audio=wavfile,text=words"):
        open_source(files["columns"])
    opts = SourceOptions(columns="audio=wavfile,text=words", language="zh")
    assert normalised(open_source(files["columns"], opts)) == golden(clips, ZH)
    own = SourceOptions(instruction="Write down what you hear.")
    assert normalised(open_source(files["csv"], own)) == golden(clips, "Write down what you hear.")
    tts = normalised(open_source(files["kaldi"], SourceOptions(task="tts")))
    assert tts == [{"task_type": "speech_conversation", "conversation": [
        {"role": "user", "message_type": "text", "content": t},
        {"role": "assistant", "message_type": "audio", "content": digest(c)}]} for c, t in zip(clips, TEXTS)]
    for bad, words in [(dict(columns="audio=x,text"), "expected audio=COLUMN,text=COLUMN"),
                       (dict(task="asr2"), "--task 'asr2' is unknown"), (dict(language="fr"), "--language 'fr'"),
                       (dict(format="xml"), "--format 'xml' is unknown")]:
        with pytest.raises(ConfigError, match=words):
            open_source(files["csv"], SourceOptions(**bad))
    with pytest.raises(DataError, match=r"--columns audio=nope: no such column \(columns: file, transcript, speaker\)"):
        open_source(files["csv"], SourceOptions(columns="audio=nope"))


def test_any_rate_and_channels_go_through_the_one_loader(tmp_path):
    """A 44.1 kHz stereo clip in a CSV is read as load_audio reads it: librosa.load(sr=16000)'s samples."""
    stereo = np.stack([_wave(7, 44100), _wave(8, 44100)], axis=1)
    sf.write(tmp_path / "s.flac", stereo, 44100)
    (tmp_path / "m.tsv").write_text("path\tsentence\ns.flac\thi there\n")
    (rec,) = list(open_source(tmp_path / "m.tsv"))
    audio = rec.obj["conversation"][1]["content"]
    data, sr = sf.read(tmp_path / "s.flac", dtype="float32")
    np.testing.assert_array_equal(load_audio(audio), resample(data.mean(axis=1), sr))


def test_hugging_face_datasets_save_to_disk_parquet_streaming_and_arrays(world, tmp_path):
    datasets = pytest.importorskip("datasets")
    root, clips, files = world
    ds = datasets.Dataset.from_dict({"audio": [str(c) for c in clips], "sentence": TEXTS})
    ds = ds.cast_column("audio", datasets.Audio())
    ds.save_to_disk(str(tmp_path / "saved"))
    opts = SourceOptions(clip_dir=tmp_path / "cache")
    assert detect_format(str(tmp_path / "saved"))[0] == "hf"
    assert normalised(open_source(tmp_path / "saved", opts)) == golden(clips)
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dict"))
    assert normalised(open_source(tmp_path / "dict", opts)) == golden(clips)
    (tmp_path / "pq").mkdir()
    ds.to_parquet(str(tmp_path / "pq" / "train-00000.parquet"))
    assert normalised(open_source(tmp_path / "pq" / "train-00000.parquet", opts)) == golden(clips)
    assert normalised(open_source(tmp_path / "pq", opts)) == golden(clips)  # a folder of parquet files
    # arrays at any rate (22.05 kHz): resampled like a file
    waves = [resample(_wave(i, n), 16000, 22050) for i, n in enumerate(LENGTHS)]
    arr = datasets.Dataset.from_dict({"speech": [{"array": w, "sampling_rate": 22050} for w in waves],
                                      "text": TEXTS})
    arr.save_to_disk(str(tmp_path / "arrays"))
    recs = list(open_source(tmp_path / "arrays", SourceOptions(columns="audio=speech", clip_dir=tmp_path / "c2")))
    for rec, w in zip(recs, waves):
        np.testing.assert_array_equal(load_audio(rec.obj["conversation"][1]["content"]), resample(w, 22050))
    assert [r.where for r in recs] == [f"{tmp_path / 'arrays'}[{i}]" for i in range(3)]


def test_a_streamed_source_is_an_iterator_not_a_list(world, tmp_path):
    """Sources hand out one record at a time: a 100,000-line manifest is never read whole."""
    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:
        for i in range(100_000):
            f.write(json.dumps({"audio_filepath": f"clips/c{i % 3}.wav", "text": "x"}) + "\n")
    rows = iter(open_source(path))
    first = next(rows)
    assert first.number == 1 and first.obj["conversation"][2]["content"] == "x"
    assert not isinstance(open_source(path).rows(), list)


def test_per_row_problems_are_records_with_their_place(world, tmp_path):
    root, clips, files = world
    (tmp_path / "m.csv").write_text(f"audio,text\n{clips[0]},\n{clips[1]},ok\n")
    recs = list(open_source(tmp_path / "m.csv"))
    assert recs[0].where == f"{tmp_path / 'm.csv'}:2" and "empty transcript" in recs[0].error
    assert recs[1].error is None
    k = tmp_path / "k"
    k.mkdir()
    (k / "wav.scp").write_text(f"a {clips[0]}\nb sox x.wav -t wav - |\nc gunzip -c x.gz |\n")
    (k / "text").write_text("a hi\n")
    with pytest.raises(DataError, match=r"wav\.scp:2: 2 lines \(2, 3\) are shell pipelines .* never runs a command"):
        list(open_source(k))
    chat = tmp_path / "c.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "<audio><audio>hi"},
                                             {"role": "assistant", "content": "x"}], "audios": ["a.wav"]}) + "\n"
                    + json.dumps({"messages": [{"role": "user", "content": "<audio>"}, {"role": "bot", "content": "x"}],
                                  "audios": [str(clips[0])]}) + "\n")
    a, b = list(open_source(chat))
    assert a.error == "2 <audio> placeholders in the messages but 1 entry in audios; put one <audio> where each " \
                      "audio file is heard" and a.where == f"{chat}:1"
    assert "message 1: unknown role 'bot'" in b.error


def test_without_datasets_one_line_names_the_extra(world, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    root, clips, files = world
    ds = datasets.Dataset.from_dict({"audio": [str(clips[0])], "text": ["hi"]})
    ds.save_to_disk(str(tmp_path / "saved"))
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)  # as if it were not installed
    with pytest.raises(DataError, match=r"saved: reading a Hugging Face dataset needs the `datasets` package: "
                                        r"pip install 'kimi-lora\[datasets\]'"):
        open_source(tmp_path / "saved")


def test_a_hub_id_without_network_is_the_datasets_error_in_one_line(monkeypatch, tmp_path):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert detect_format("someone/no-such-dataset:test") == ("hf", None)
    with pytest.raises(DataError) as e:
        open_source("someone/no-such-dataset:test")
    assert str(e.value).startswith("someone/no-such-dataset:test: ") and "\n" not in str(e.value)


def test_a_loading_script_never_runs(tmp_path):
    pytest.importorskip("datasets")
    folder = tmp_path / "scripted"
    folder.mkdir()
    proof = tmp_path / "code-ran"
    (folder / "scripted.py").write_text(f"open({str(proof)!r}, 'w').write('x')\n")
    (folder / "README.md").write_text("a dataset\n")
    with pytest.raises(DataError, match=r"holds a dataset loading script \(scripted\.py\); kimi-lora never runs code"):
        open_source(folder, SourceOptions(format="hf"))
    assert not proof.exists()


def test_streamed_parquet_is_read_row_by_row(tmp_path):
    """A parquet source is a streamed `datasets` IterableDataset: rows come one at a time."""
    datasets = pytest.importorskip("datasets")
    n = 2000
    wav = tmp_path / "a.wav"
    sf.write(wav, _wave(0, 1600), 16000)
    datasets.Dataset.from_dict({"path": [str(wav)] * n, "text": [f"row {i}" for i in range(n)]}).to_parquet(
        str(tmp_path / "d.parquet"))
    rows = iter(open_source(tmp_path / "d.parquet"))
    assert next(rows).obj["conversation"][2]["content"] == "row 0"
    assert sum(1 for _ in rows) == n - 1
