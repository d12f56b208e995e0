"""`kimi-lora infer --speech-tokenizer`: raw audio (no audio_tokens) tokenized on the fly, as `prepare` would."""

from __future__ import annotations

import json

import pytest
from _infer_data import INSTRUCTION, write_asr_data

STEPS = "6"


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _by_id(records):
    return {r["id"]: (r["prompt"], r["text_tokens"]) for r in records}


@pytest.fixture(scope="module")
def raw_and_prepared(tiny, tiny_dir, tiny_speech_tokenizer_dir, tmp_path_factory):
    """The same 3 lines without audio_tokens, and after `kimi-lora prepare` added them."""
    from typer.testing import CliRunner

    from kimi_lora_cli.cli.app import app

    folder = tmp_path_factory.mktemp("raw")
    raw = write_asr_data(folder, tiny.config, n=3, with_tokens=False, name="raw.jsonl")
    prepared = folder / "prepared.jsonl"
    args = ["prepare", "-m", tiny_dir, "--speech-tokenizer", tiny_speech_tokenizer_dir, "-d", raw, "-o", prepared]
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    assert all("audio_tokens" in r["conversation"][1] for r in _records(prepared))
    return raw, prepared


def test_jsonl_without_audio_tokens_equals_the_prepared_file(cli, tiny, tiny_dir, tiny_speech_tokenizer_dir,
                                                             raw_and_prepared, tmp_path):
    raw, prepared = raw_and_prepared
    want, got, cached = tmp_path / "want.jsonl", tmp_path / "got.jsonl", tmp_path / "cached.jsonl"
    code, _, err = cli("infer", "-m", tiny_dir, "-d", prepared, "-o", want, "--max-new-tokens", STEPS)
    assert code == 0, err
    code, _, err = cli("infer", "-m", tiny_dir, "-d", raw, "-o", got, "--max-new-tokens", STEPS,
                       "--speech-tokenizer", tiny_speech_tokenizer_dir)
    assert code == 0, err
    expected = _by_id(_records(want))
    assert len(expected) == 3 and all(", 0 tokens]" not in prompt for prompt, _ in expected.values())
    assert _by_id(_records(got)) == expected  # same prompts, same predictions

    # The prompts themselves are identical: the codes computed on the fly are those prepare wrote.
    from kimi_lora_cli.inference.runner import InferSpec, speech_codes_loader
    from kimi_lora_cli.inference.samples import read_samples

    loader = speech_codes_loader(InferSpec(model=tiny_dir, speech_tokenizer=tiny_speech_tokenizer_dir), tiny.config)
    on_the_fly = read_samples(raw, tiny.config, speech_codes=loader)
    from_prepare = read_samples(prepared, tiny.config)
    assert [s.messages for s in on_the_fly] == [s.messages for s in from_prepare]
    assert all(len(s.messages[1]["audio_tokens"]) > 1 for s in on_the_fly)

    # A tokenizer given for data that already has its codes is never needed; a broken path shows that.
    code, _, err = cli("infer", "-m", tiny_dir, "-d", prepared, "-o", tmp_path / "x.jsonl", "--max-new-tokens",
                       STEPS, "--speech-tokenizer", tmp_path / "nowhere")
    assert code == 0, err

    # --cache-features keeps codes and Whisper rows per file content; a second run reads them back.
    cache = tmp_path / "cache"
    for _ in range(2):
        code, _, err = cli("infer", "-m", tiny_dir, "-d", raw, "-o", cached, "--max-new-tokens", STEPS,
                           "--speech-tokenizer", tiny_speech_tokenizer_dir, "--cache-features", cache)
        assert code == 0, err
        assert _by_id(_records(cached)) == expected
        assert len(list(cache.glob("*.codes.safetensors"))) == 3
        assert len([p for p in cache.glob("*.safetensors") if not p.name.endswith(".codes.safetensors")]) == 3


def test_prompt_with_raw_audio(cli, tiny_dir, tiny_speech_tokenizer_dir, raw_and_prepared, tmp_path):
    raw, prepared = raw_and_prepared
    want = tmp_path / "want.jsonl"
    code, _, err = cli("infer", "-m", tiny_dir, "-d", prepared, "-o", want, "--max-new-tokens", STEPS)
    assert code == 0, err
    code, out, err = cli("infer", "-m", tiny_dir, "--prompt", INSTRUCTION, "--audio", raw.parent / "clip1.wav",
                         "--speech-tokenizer", tiny_speech_tokenizer_dir, "--max-new-tokens", STEPS, "--json")
    assert code == 0, err
    [pred] = json.loads(out)["predictions"]
    prompt, tokens = _by_id(_records(want))["utt1"]
    assert pred["text_tokens"] == tokens and pred["prompt"] == prompt


def test_raw_audio_without_a_speech_tokenizer_is_a_one_line_error(cli, tiny, tiny_dir, raw_and_prepared, tmp_path):
    raw, _ = raw_and_prepared
    one = tmp_path / "one.jsonl"
    one.write_text(raw.read_text().splitlines()[0].replace('"clip0.wav"', json.dumps(str(raw.parent / "clip0.wav")))
                   + "\n")
    preds = tmp_path / "preds.jsonl"
    code, _, err = cli("infer", "-m", tiny_dir, "-d", one, "-o", preds)
    assert code == 1 and not preds.exists()
    [line] = err.strip().splitlines()  # one problem: one line, no traceback
    assert f"{one}:1: message 1: no audio_tokens; pass --speech-tokenizer DIR" in line
    assert "kimi-lora prepare" in line

    code, _, err = cli("infer", "-m", tiny_dir, "--prompt", "hi", "--audio", raw.parent / "clip0.wav")
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "--audio-tokens" in err and "--speech-tokenizer" in err and "kimi-lora prepare" in err
