"""jsonl -> checked samples -> streams, features, batches: the data side of `kimi-lora train`."""

from __future__ import annotations

import json
import os

import pytest
import torch

from kimi_lora_cli.data.dataset import KimiDataset
from kimi_lora_cli.data.features import FeatureStore
from kimi_lora_cli.data.samples import load_samples
from kimi_lora_cli.data.synthetic import ASR_INSTRUCTION, write_synthetic_dataset
from kimi_lora_cli.errors import DataError
from kimi_lora_cli.training.loss import compute_loss


@pytest.fixture(scope="module")
def synth(tmp_path_factory, tiny):
    folder = tmp_path_factory.mktemp("synth")
    path = write_synthetic_dataset(folder, tiny.config, n=6, seed=0, task="mixed")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return path, rows


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_asr_sample_streams_match_the_official_rules(tiny, synth):
    tok, cfg = tiny.tokenizer, tiny.config
    path, rows = synth
    data = load_samples(path, tok, cfg)
    s = data.samples[0]
    conv = rows[0]["conversation"]
    codes, answer = conv[1]["audio_tokens"], tok.encode(conv[2]["content"])
    instr = tok.encode(ASR_INSTRUCTION)
    b = tok.blank
    # user: start, instruction, audio, ct (audio ends the turn) + msg_end; assistant: start, text, eos,
    # msg_end (a text message ending a turn gets no ct)
    assert s.seq.audio_ids == ([tok.user_start] + [b] * len(instr) + [cfg.kimia_media_begin] + codes
                               + [cfg.kimia_media_end, tok.speech_ct, tok.msg_end, tok.assistant_start]
                               + [b] * (len(answer) + 1) + [tok.msg_end])
    assert s.seq.text_ids == ([b] + instr + [b] * (len(codes) + 2) + [b, b, b] + answer + [tok.text_eos, b])
    n_user = 1 + len(instr) + len(codes) + 2 + 2 + 1
    assert s.seq.text_loss == [False] * n_user + [True] * (len(answer) + 1) + [False]
    assert not any(s.seq.audio_loss)
    assert s.output_type == "text" and s.audio == [path.parent / conv[1]["content"]]


def test_multi_turn_and_audio_answer_streams(tiny, tmp_path, synth):
    tok, cfg = tiny.tokenizer, tiny.config
    path, rows = synth
    q = rows[1]["conversation"][0]  # a user audio message with real audio + codes
    a = rows[1]["conversation"][2]  # an assistant audio message
    conv = [
        {"role": "user", "message_type": "text", "content": "hello"},
        {**q, "content": str(path.parent / q["content"])},  # absolute path
        {"role": "assistant", "message_type": "text", "content": "one two"},
        {"role": "user", "message_type": "text", "content": "again"},
        {"role": "assistant", "message_type": "text", "content": "three"},
        {**a, "content": str(path.parent / a["content"])},
    ]
    data = load_samples(_write(tmp_path / "mt.jsonl", [{"task_type": "speech_conversation", "conversation": conv}]),
                        tok, cfg)
    s = data.samples[0].seq
    b, ct = tok.blank, tok.speech_ctd
    mb, me = cfg.kimia_media_begin, cfg.kimia_media_end
    hello, one_two, again, three = (tok.encode(t) for t in ("hello", "one two", "again", "three"))
    qc, ac = q["audio_tokens"], a["audio_tokens"]
    expected_audio = ([tok.user_start] + [b] * len(hello) + [mb, *qc, me, ct, tok.msg_end]
                      + [tok.assistant_start] + [b] * (len(one_two) + 1) + [tok.msg_end]
                      + [tok.user_start] + [b] * len(again) + [tok.msg_end]
                      + [tok.assistant_start] + [b] * (len(three) + 1) + [mb, *ac, me, ct, tok.msg_end])
    expected_text = ([b] + hello + [b] * (len(qc) + 2) + [b, b]
                     + [b] + one_two + [tok.text_eos, b]
                     + [b] + again + [b]
                     + [b] + three + [tok.text_eos] + [b] * (len(ac) + 2) + [b, b])
    assert s.audio_ids == expected_audio
    assert s.text_ids == expected_text
    # text loss: both answers + their eos; audio loss: the answer's codes + its media_end
    assert sum(s.text_loss) == len(one_two) + 1 + len(three) + 1
    start = len(expected_audio) - 2 - 1 - len(ac)
    assert s.audio_loss == [False] * start + [True] * (len(ac) + 1) + [False, False]
    assert [m.start for m in s.media] == [1 + len(hello) + 1, start]
    assert s.is_continuous.count(True) == len(qc) + len(ac)


def test_audio_paths_resolve_against_jsonl_folder_then_cwd(tiny, tmp_path, synth, monkeypatch):
    path, rows = synth
    sub = tmp_path / "nested"
    sub.mkdir()
    row = json.loads(json.dumps(rows[0]))
    # relative to the original data folder -> only found through the current folder
    monkeypatch.chdir(path.parent)
    data = load_samples(_write(sub / "d.jsonl", [row]), tiny.tokenizer, tiny.config)
    assert data.samples[0].audio[0].resolve() == (path.parent / row["conversation"][1]["content"]).resolve()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"d\.jsonl:1: message 1: audio file 'audio/clip_0000\.wav' not found"):
        load_samples(sub / "d.jsonl", tiny.tokenizer, tiny.config)


def test_preflight_lists_every_problem_with_its_line(tiny, tmp_path, synth):
    path, rows = synth
    good = rows[0]
    conv = good["conversation"]
    audio_rel = str(path.parent / conv[1]["content"])
    codes = conv[1]["audio_tokens"]
    off = tiny.config.kimia_token_offset
    (tmp_path / "broken.wav").write_bytes(b"RIFF....not audio at all")

    def with_audio(**changes):
        return {"task_type": "understanding", "conversation": [
            conv[0], {**conv[1], "content": audio_rel, **changes}, conv[2]]}

    lines = [
        {**good, "conversation": [conv[0], {**conv[1], "content": audio_rel}, conv[2]]},  # 1: fine
        '{"task_type": "understanding", "conversation": [',  # 2: bad JSON
        {"task_type": "understanding"},  # 3: no conversation
        {"conversation": [{"role": "robot", "message_type": "text", "content": "x"}, conv[2]]},  # 4: role
        {"conversation": [{"role": "user", "message_type": "video", "content": "x"}, conv[2]]},  # 5: type
        {"conversation": [{"role": "user", "message_type": "text"}, conv[2]]},  # 6: missing content
        with_audio(content="missing/nowhere.wav"),  # 7: missing audio
        with_audio(content=str(tmp_path / "broken.wav")),  # 8: undecodable
        {"conversation": [{"role": "user", "message_type": "audio", "content": audio_rel}, conv[2]]},  # 9: no tokens
        with_audio(audio_tokens=[c - off for c in codes]),  # 10: raw codes (out of range)
        with_audio(audio_tokens=codes[:-3]),  # 11: count disagrees with duration
        {"conversation": [conv[0], {**conv[1], "content": audio_rel}]},  # 12: nothing to learn
    ]
    bad = _write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError) as info:
        load_samples(bad, tiny.tokenizer, tiny.config)
    msg = str(info.value)
    assert msg.splitlines()[0].endswith("11 problems in the training data (fix them and rerun):")
    expect = {
        2: "invalid JSON", 3: "missing key 'conversation'", 4: "unknown role 'robot'",
        5: "unknown message_type 'video'", 6: "missing key content", 7: "'missing/nowhere.wav' not found",
        8: "cannot be decoded", 9: "no audio_tokens; pass --speech-tokenizer", 10: "outside [",
        11: f"{len(codes) - 3} audio_tokens but", 12: "nothing to learn",
    }
    for line, text in expect.items():
        assert any(f"bad.jsonl:{line}:" in m and text in m for m in msg.splitlines()), (line, msg)
    assert "bad.jsonl:1:" not in msg
    assert "add kimia_token_offset" in msg  # raw codes get the specific fix


def test_too_long_policies(tiny, synth):
    path, _ = synth
    tok, cfg = tiny.tokenizer, tiny.config
    full = load_samples(path, tok, cfg)
    limit = sorted(len(s) for s in full.samples)[2]
    with pytest.raises(DataError, match=f"longer than --model-max-length {limit}"):
        load_samples(path, tok, cfg, max_length=limit)
    skipped = load_samples(path, tok, cfg, max_length=limit, too_long="skip")
    assert skipped.skipped_too_long == sum(len(s) > limit for s in full.samples)
    assert all(len(s) <= limit for s in skipped.samples)
    cut = load_samples(path, tok, cfg, max_length=limit, too_long="truncate")
    assert all(len(s) <= limit for s in cut.samples)
    assert cut.truncated + cut.skipped_too_long == skipped.skipped_too_long
    for s in cut.samples:
        assert all(m.start + m.length <= len(s) for m in s.seq.media)


def test_features_are_computed_once_and_cached_on_disk(tiny, synth, tmp_path):
    path, _ = synth
    data = load_samples(path, tiny.tokenizer, tiny.config)
    files = [p for s in data.samples for p in s.audio]
    store = FeatureStore(tiny.feature_encoder, cache_dir=tmp_path / "cache")
    first = store.rows(files)
    assert store.stats.computed == len(set(files))
    again = store.rows(files)
    assert store.stats.computed == len(set(files)) and store.stats.hits >= len(files)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    # same rows as encoding directly
    from kimi_lora_cli.data.audio import load_audio

    assert torch.allclose(first[0], tiny.feature_encoder.encode(load_audio(files[0])))
    # a new store (a later run) reads the disk cache; a copied file hits by content
    copy = tmp_path / "copy.wav"
    copy.write_bytes(files[0].read_bytes())
    other = FeatureStore(tiny.feature_encoder, cache_dir=tmp_path / "cache")
    rows = other.rows([copy, files[1]])
    assert other.stats.computed == 0 and other.stats.disk_hits == 2
    assert torch.equal(rows[0], first[0])
    os.utime(files[0])  # a touched file is re-hashed, still the same content
    assert torch.equal(other.rows([files[0]])[0], first[0])


def test_padded_batch_loss_equals_mean_of_samples_alone(tiny, synth):
    path, _ = synth
    data = load_samples(path, tiny.tokenizer, tiny.config)
    ds = KimiDataset(data.samples, tiny.tokenizer.pad, tiny.config.kimia_adaptor_input_dim,
                     FeatureStore(tiny.feature_encoder))
    picks = [1, 2, 3, 0]  # both, text, both, text
    assert len({len(data.samples[i]) for i in picks}) == 4  # all lengths differ
    model = tiny.model.eval()
    with torch.no_grad():
        batch = ds.batch(picks)
        assert batch["attention_mask"].sum(1).tolist() == [len(data.samples[i]) for i in picks]
        together = compute_loss(model, batch)
        alone = [compute_loss(model, ds.batch([i])) for i in picks]
    per_sample = torch.cat([a.total for a in alone])
    assert torch.allclose(together.total, per_sample, atol=1e-5)
    assert torch.allclose(together.text, torch.cat([a.text for a in alone]), atol=1e-5)
    assert torch.allclose(together.audio, torch.cat([a.audio for a in alone]), atol=1e-5)
    assert together.total.mean().item() == pytest.approx(per_sample.mean().item(), abs=1e-5)
    assert (together.audio > 0).tolist() == [True, False, True, False]  # "both" samples train speech
    # the official normalisation: masked CE sum / (mask count + 1e-4)
    one = ds.batch([picks[0]])
    out = model(input_ids=one["input_ids"], text_input_ids=one["text_input_ids"],
                is_continuous_mask=one["is_continuous_mask"], continuous_features=one["continuous_features"])
    mask = one["text_loss_mask"][0]
    ce = torch.nn.functional.cross_entropy(out.text_logits[0][mask], one["text_labels"][0][mask], reduction="sum")
    assert alone[0].text.item() == pytest.approx((ce / (mask.sum() + 1e-4)).item(), rel=1e-5)


def test_json_array_files_and_non_jsonl_files(tiny, synth, tmp_path):
    path, rows = synth
    fixed = json.loads(json.dumps(rows[:2]))
    for r in fixed:
        for m in r["conversation"]:
            if m["message_type"] == "audio":
                m["content"] = str(path.parent / m["content"])
    as_array = tmp_path / "data.json"
    as_array.write_text(json.dumps(fixed, indent=2))
    data = load_samples(as_array, tiny.tokenizer, tiny.config)
    assert [s.line for s in data.samples] == [1, 2]
    fixed[1]["conversation"][0]["role"] = "narrator"
    as_array.write_text(json.dumps(fixed, indent=2))
    with pytest.raises(DataError, match=r"data\.json: entry 2: message 0: unknown role 'narrator'"):
        load_samples(as_array, tiny.tokenizer, tiny.config)
    toml = tmp_path / "x.toml"
    toml.write_text("[project]\nname = 'x'\nversion = '1'\n[tool]\nx = 1\n[more]\n")
    with pytest.raises(DataError, match="not a jsonl file"):
        load_samples(toml, tiny.tokenizer, tiny.config)


def _without_tokens(rows):
    """The rows with every audio_tokens removed (what a user has before tokenizing)."""
    rows = json.loads(json.dumps(rows))
    for r in rows:
        for m in r["conversation"]:
            m.pop("audio_tokens", None)
    return rows


def test_speech_tokenizer_fills_missing_audio_tokens_once_per_file(tiny, synth, tmp_path,
                                                                   tiny_speech_tokenizer_dir):
    from kimi_lora_cli.data.audio import load_audio
    from kimi_lora_cli.data.features import CodeStore
    from kimi_lora_cli.loading import load_speech_tokenizer

    path, rows = synth
    st = load_speech_tokenizer(tiny_speech_tokenizer_dir)
    offset = tiny.config.kimia_token_offset
    raw = _write(path.parent / "raw.jsonl", _without_tokens(rows))
    with pytest.raises(DataError, match=r"raw\.jsonl:1: message 1: no audio_tokens; pass --speech-tokenizer DIR"):
        load_samples(raw, tiny.tokenizer, tiny.config)
    stores = []

    def speech_codes():
        stores.append(CodeStore(st, offset, tiny.config.vocab_size, cache_dir=tmp_path / "cache"))
        return stores[-1]

    data = load_samples(raw, tiny.tokenizer, tiny.config, speech_codes=speech_codes)
    n_files = sum(m["message_type"] == "audio" for r in rows for m in r["conversation"])
    assert data.audio_tokenized == n_files and stores[0].stats.computed == n_files
    # The codes are the tokenizer's, offset; the streams are what the same jsonl with those tokens gives.
    filled = json.loads(json.dumps(rows))
    for r in filled:
        for m in r["conversation"]:
            if m["message_type"] == "audio":
                m["audio_tokens"] = [c + offset for c in st.tokenize(load_audio(path.parent / m["content"]))]
    expected = load_samples(_write(path.parent / "filled.jsonl", filled), tiny.tokenizer, tiny.config)
    assert [s.seq for s in data.samples] == [s.seq for s in expected.samples]
    assert [s.audio for s in data.samples] == [s.audio for s in expected.samples]
    # A later run reads the codes from the cache folder; data that has its tokens never loads the tokenizer.
    again = load_samples(raw, tiny.tokenizer, tiny.config, speech_codes=speech_codes)
    assert stores[1].stats.computed == 0 and stores[1].stats.disk_hits == n_files
    assert [s.seq for s in again.samples] == [s.seq for s in expected.samples]
    assert len(list((tmp_path / "cache").glob("*.codes.safetensors"))) == n_files
    load_samples(path, tiny.tokenizer, tiny.config, speech_codes=speech_codes)
    assert len(stores) == 2


def test_audio_text_history_needs_its_file_only_to_compute_tokens(tiny, synth):
    from kimi_lora_cli.data.schema import check_record

    path, rows = synth
    user_audio, answer = rows[1]["conversation"][0], rows[1]["conversation"][2]
    history = {"role": "assistant", "message_type": "audio-text", "content": ["gone.wav", "hi"],
               "audio_tokens": answer["audio_tokens"]}
    line = {"task_type": "speech_conversation", "conversation": [
        user_audio, history, {"role": "user", "message_type": "text", "content": "and then"},
        {"role": "assistant", "message_type": "text", "content": "fine"}]}
    off, vocab = tiny.config.kimia_token_offset, tiny.config.vocab_size
    chk = check_record(line, path.parent, off, vocab)
    assert chk.problems == [] and [(a.index, a.continuous) for a in chk.audios] == [(0, True)]
    del history["audio_tokens"]
    assert check_record(line, path.parent, off, vocab, speech_tokenizer=True).problems == [
        "message 1: audio file 'gone.wav' not found (looked at it as given, in "
        f"{path.parent.resolve()} and in the current folder); fix the path or run from the folder it is relative to"]
    history["content"][0] = answer["content"]
    chk = check_record(line, path.parent, off, vocab, speech_tokenizer=True)
    assert chk.problems == [] and [(a.index, a.continuous, a.needs_tokens) for a in chk.audios] == [
        (0, True, False), (1, False, True)]
