"""`kimi-lora infer` end to end on the tiny checkpoint: predictions file, resume, adapters, errors."""

from __future__ import annotations

import json

import pytest
import torch
from _infer_data import INSTRUCTION, write_asr_data

STEPS = "8"


@pytest.fixture(scope="module")
def asr_data(tiny, tmp_path_factory):
    return write_asr_data(tmp_path_factory.mktemp("asr"), tiny.config, n=4)


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _tokens(records, adapter="base"):
    return {r["id"]: r["text_tokens"] for r in records if r["adapter"] == adapter}


def test_infer_writes_predictions_and_scores(cli, tiny, tiny_dir, asr_data, tmp_path):
    from kimi_lora_cli.inference.generation import GenerationConfig, StreamTokens, generate
    from kimi_lora_cli.inference.prompts import build_prompts
    from kimi_lora_cli.inference.samples import read_samples

    preds = tmp_path / "preds.jsonl"
    code, out, err = cli("infer", "--model", tiny_dir, "--data", asr_data, "--output", preds,
                         "--max-new-tokens", STEPS, "--json")
    assert code == 0, err
    payload = json.loads(out)
    records = _records(preds)
    assert {r["id"] for r in records} == {"utt0", "utt1", "utt2", "utt3"}
    for r in records:
        assert r["adapter"] == "base" and r["output_type"] == "text"
        assert r["reference"] and isinstance(r["prediction"], str) and "[audio clip" in r["prompt"]
        assert 0 < r["new_tokens"] <= int(STEPS) and r["time_s"] >= 0 and "wer" in r and "audio_tokens" not in r
    m = payload["metrics"]["base"]
    assert m["predictions"] == 4 and m["scored"] == 4 and m["ref_words"] > 0
    assert m["wer"] == pytest.approx(m["word_errors"] / m["ref_words"])

    # The file holds exactly what the core generates for the same prompts.
    samples = read_samples(asr_data, tiny.config)
    prompts = build_prompts([s.messages for s in samples], tiny.tokenizer, tiny.config, tiny.feature_encoder, "text")
    results = generate(tiny.model, prompts, GenerationConfig("text", max_new_tokens=int(STEPS)),
                       StreamTokens.from_model(tiny.tokenizer, tiny.config))
    assert _tokens(records) == {s.id: r.text_tokens for s, r in zip(samples, results)}
    assert {r["id"]: r["prediction"] for r in records} == {
        s.id: tiny.tokenizer.decode(r.text_tokens) for s, r in zip(samples, results)}

    # Batch size does not change any prediction.
    single = tmp_path / "single.jsonl"
    code, _, err = cli("infer", "-m", tiny_dir, "-d", asr_data, "-o", single, "--max-new-tokens", STEPS,
                       "--batch-size", "1")
    assert code == 0, err
    assert _tokens(_records(single)) == _tokens(records)


def test_resume_skips_done_pairs_and_repairs_a_torn_line(cli, tiny_dir, asr_data, tmp_path):
    preds = tmp_path / "preds.jsonl"
    args = ("infer", "-m", tiny_dir, "-d", asr_data, "-o", preds, "--max-new-tokens", STEPS, "--json")
    code, _, err = cli(*args)
    assert code == 0, err
    full = _records(preds)
    lines = preds.read_text().splitlines(keepends=True)
    preds.write_text(lines[0] + lines[1] + lines[2][: len(lines[2]) // 2])  # crash mid-write
    code, out, err = cli(*args, "--resume")
    assert code == 0, err
    assert json.loads(out)["skipped"] == 2
    after = preds.read_text().splitlines(keepends=True)
    assert after[:2] == lines[:2]  # kept as they were
    assert len(after) == 4 and sorted(r["id"] for r in _records(preds)) == sorted(r["id"] for r in full)
    assert _tokens(_records(preds)) == _tokens(full)
    code, out, _ = cli(*args, "--resume")  # nothing left to do
    assert code == 0 and json.loads(out)["skipped"] == 4 and len(_records(preds)) == 4


def test_audio_without_audio_tokens_is_a_clear_error(cli, tiny, tiny_dir, tmp_path):
    data = write_asr_data(tmp_path / "raw", tiny.config, n=2, with_tokens=False)
    preds = tmp_path / "preds.jsonl"
    code, out, err = cli("infer", "-m", tiny_dir, "-d", data, "-o", preds)
    assert code == 1
    assert f"{data}:1" in err and "audio_tokens" in err and "kimi-lora prepare" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3
    assert not preds.exists()

    code, _, err = cli("infer", "-m", tiny_dir, "--prompt", "hi", "--audio", tmp_path / "raw" / "clip0.wav")
    assert code == 1 and "--audio-tokens" in err and "kimi-lora prepare" in err


def test_audio_tokens_longer_than_the_clip_fail_before_anything_is_written(cli, tiny, tiny_dir, tmp_path):
    data = write_asr_data(tmp_path, tiny.config, n=3)
    lines = data.read_text().splitlines()
    third = json.loads(lines[2])
    third["conversation"][1]["audio_tokens"] *= 10
    data.write_text("\n".join(lines[:2] + [json.dumps(third)]) + "\n")
    preds = tmp_path / "preds.jsonl"
    code, _, err = cli("infer", "-m", tiny_dir, "-d", data, "-o", preds)
    assert code == 1 and f"{data}:3" in err and "the tokens belong to another file" in err
    assert not preds.exists()


def test_prompt_with_audio_tokens_file_matches_the_jsonl_run(cli, tiny, tiny_dir, asr_data, tmp_path):
    preds = tmp_path / "preds.jsonl"
    code, _, err = cli("infer", "-m", tiny_dir, "-d", asr_data, "-o", preds, "--max-new-tokens", STEPS)
    assert code == 0, err
    line0 = json.loads(asr_data.read_text().splitlines()[0])
    codes = [c - tiny.config.kimia_token_offset for c in line0["conversation"][1]["audio_tokens"]]
    codes_file = tmp_path / "clip0.codes"
    codes_file.write_text(", ".join(map(str, codes)))  # raw codes, comma separated
    code, out, err = cli("infer", "-m", tiny_dir, "--prompt", INSTRUCTION, "--audio", asr_data.parent / "clip0.wav",
                         "--audio-tokens", codes_file, "--max-new-tokens", STEPS, "--json")
    assert code == 0, err
    [pred] = json.loads(out)["predictions"]
    assert pred["text_tokens"] == _tokens(_records(preds))["utt0"]

    code, out, err = cli("infer", "-m", tiny_dir, "--prompt", "hello world", "--max-new-tokens", "4")
    assert code == 0, err
    assert "1 new predictions" in out


def test_adapters_switch_on_one_base_and_compare_with_it(cli, tiny_dir, asr_data, adapter_dirs, tmp_path):
    both = tmp_path / "all.jsonl"
    code, out, err = cli("infer", "-m", tiny_dir, "-d", asr_data, "-o", both, "--max-new-tokens", STEPS,
                         "-a", f"a={adapter_dirs['a']}", "-a", str(adapter_dirs["b"]), "--compare-base")
    assert code == 0, err
    assert "Scores" in out and "base" in out
    records = _records(both)
    assert {r["adapter"] for r in records} == {"base", "a", "b"} and len(records) == 12

    plain, only_a = tmp_path / "plain.jsonl", tmp_path / "a.jsonl"
    assert cli("infer", "-m", tiny_dir, "-d", asr_data, "-o", plain, "--max-new-tokens", STEPS)[0] == 0
    assert cli("infer", "-m", tiny_dir, "-d", asr_data, "-o", only_a, "--max-new-tokens", STEPS,
               "-a", f"a={adapter_dirs['a']}")[0] == 0
    assert _tokens(records, "base") == _tokens(_records(plain))  # disable_adapter() is the plain base
    assert _tokens(records, "a") == _tokens(_records(only_a), "a")  # switching back and forth is exact
    assert _tokens(records, "a") != _tokens(records, "base")
    assert _tokens(records, "a") != _tokens(records, "b")


def test_output_type_both_returns_audio_codes_and_says_how_to_get_a_waveform(cli, tiny_dir, asr_data, tmp_path):
    preds = tmp_path / "preds.jsonl"
    code, out, err = cli("infer", "-m", tiny_dir, "-d", asr_data, "-o", preds, "--max-new-tokens", "10",
                         "--output-type", "both")
    assert code == 0, err
    assert "detokenizer" in out
    for r in _records(preds):
        assert r["output_type"] == "both" and isinstance(r["audio_tokens"], list)


@pytest.mark.parametrize("args, message", [
    (("--resume",), "--resume needs --output"),
    (("--prompt", "hi"), "exactly one of --data"),
    (("--batch-size", "0"), "--batch-size"),
    (("--text-temperature", "-1"), "temperature"),
    (("--adapter", "base=/nowhere"), "reserved"),
])
def test_bad_options_are_one_line_errors(cli, tiny_dir, asr_data, args, message):
    code, _, err = cli("infer", "-m", tiny_dir, "-d", asr_data, *args)
    assert code == 1 and message in err and "Traceback" not in err


@pytest.fixture(scope="module")
def endless_dir(tiny_dir, tmp_path_factory):
    """The tiny model with an all-zero lm_head: every text logit ties, greedy picks token 0 for ever and
    never says text_eos (a model that does not stop, on any machine)."""
    import shutil

    from safetensors.torch import load_file, save_file

    target = tmp_path_factory.mktemp("endless") / "Kimi-Audio-tiny"
    shutil.copytree(tiny_dir, target)
    index = json.loads((target / "model.safetensors.index.json").read_text())["weight_map"]
    shard = target / index["lm_head.weight"]
    tensors = load_file(str(shard))
    tensors["lm_head.weight"] = torch.zeros_like(tensors["lm_head.weight"])
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return target


def test_default_budget_stops_a_model_that_never_ends_and_cells_fit_the_terminal(cli, endless_dir, asr_data,
                                                                               tmp_path, monkeypatch):
    from kimi_lora_cli.cli._output import out as console
    from kimi_lora_cli.inference.runner import DEFAULT_TEXT_STEPS

    monkeypatch.setattr(console, "width", 80)
    preds = tmp_path / "preds.jsonl"
    code, stdout, err = cli("infer", "-m", endless_dir, "-d", asr_data, "-o", preds)
    assert code == 0, err
    records = _records(preds)
    assert {r["new_tokens"] for r in records} == {DEFAULT_TEXT_STEPS} and {r["finish"] for r in records} == {"length"}
    assert all(len(r["prediction"]) >= DEFAULT_TEXT_STEPS for r in records)  # the full text stays in the file
    said = " ".join(stdout.split())
    assert f"4 of 4 answers reached the default budget ({DEFAULT_TEXT_STEPS} steps" in said
    assert f"Long cells are cut to about 3 lines; the full text is in {preds}" in said
    assert max(len(line) for line in stdout.splitlines()) <= 80
    table = stdout.split("Predictions", 1)[1].split("Long cells")[0]
    assert len(table.splitlines()) <= 4 * (3 + 1) + 4  # four rows of at most 3 lines, rules and header
    assert "\u2026" in table

    code, stdout, err = cli("infer", "-m", endless_dir, "-d", asr_data, "--max-new-tokens", "5")
    assert code == 0, err
    assert "4 of 4 answers reached --max-new-tokens 5 before ending" in " ".join(stdout.split())
