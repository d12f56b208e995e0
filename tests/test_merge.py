"""kimi-lora merge: exact equality with peft's merge, release layout, atomic writes, clear refusals."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from adapter_helpers import build_tiny_qwen, make_adapter, peft_merged

from kimi_lora_cli.adapters.merge import MergeSpec, merge_adapters
from kimi_lora_cli.errors import AdapterError, ConfigError


def _merged_state(folder: Path) -> dict:
    from kimi_lora_cli.loading import load_model

    return load_model(folder, dtype="auto", load_whisper=False, load_tokenizer_=False).model.state_dict()


def _assert_same(expected: dict, got: dict) -> None:
    import torch

    assert set(expected) == set(got)
    differ = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not differ, f"{len(differ)} tensors differ from peft's merge, e.g. {differ[:3]}"


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


CONFIGS = {
    "plain": ("all", {}),
    "rslora": ("all", {"use_rslora": True, "r": 8, "lora_alpha": 4}),
    "patterns": ("all", {"rank_pattern": {"q_proj": 2, "mimo_layers.1.mlp.down_proj": 6},
                         "alpha_pattern": {"v_proj": 3.0}}),
    "dora": ("q_proj,v_proj,o_proj", {"use_dora": True}),
    "lora_bias": ("q_proj,v_proj", {"lora_bias": True, "bias": "all"}),
    "saved_modules": ("mimo", {"modules_to_save": ["mimo_output"], "trainable_token_indices": {"embed_tokens": [1, 5]}}),
    "embedding": (["model.embed_tokens", "model.layers.0.self_attn.q_proj"], {}),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_merge_equals_peft_merge_and_unload(tiny_dir, tmp_path, name):
    target, kwargs = CONFIGS[name]
    adapter = make_adapter(tiny_dir, tmp_path / "adapter", target, **kwargs)
    result = merge_adapters(MergeSpec(model=tiny_dir, adapters=(adapter,), output=tmp_path / "merged"))
    assert result.changed
    _assert_same(peft_merged(tiny_dir, [adapter]), _merged_state(tmp_path / "merged"))


def test_weighted_adapters_equal_peft_with_scaled_layers(tiny_dir, tmp_path):
    a = make_adapter(tiny_dir, tmp_path / "a", "all", seed=1)
    b = make_adapter(tiny_dir, tmp_path / "b", "q_proj,k_proj", seed=2, r=2, use_rslora=True)
    merge_adapters(MergeSpec(model=tiny_dir, adapters=(a, b), weights=(0.7, 0.3), output=tmp_path / "mix"))
    _assert_same(peft_merged(tiny_dir, [a, b], [0.7, 0.3]), _merged_state(tmp_path / "mix"))
    # Weights matter: the unweighted sum differs.
    merge_adapters(MergeSpec(model=tiny_dir, adapters=(a, b), output=tmp_path / "sum"))
    _assert_same(peft_merged(tiny_dir, [a, b]), _merged_state(tmp_path / "sum"))
    import torch

    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(_merged_state(tmp_path / "mix")[q], _merged_state(tmp_path / "sum")[q])


def test_merged_folder_is_release_layout_and_matches_base_plus_adapter(tiny_dir, tmp_path, cli):
    import torch

    from kimi_lora_cli.loading import load_model

    adapter = make_adapter(tiny_dir, tmp_path / "adapter", "all")
    out = tmp_path / "merged"
    code, stdout, stderr = cli("merge", "-m", tiny_dir, "-a", adapter, "-o", out, "--max-shard-size", "20KB")
    assert code == 0, stderr
    assert "Merged 1 adapter" in stdout and "(0 hard-linked)" in stdout
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all(s.startswith("model-") and s.endswith(f"-of-{len(shards)}.safetensors")
                                   for s in shards)
    from kimi_lora_cli.loading import read_safetensors_header

    for s in shards:  # a shard exceeds the limit only when one tensor alone is bigger
        header = read_safetensors_header(out / s)
        data = max(v["data_offsets"][1] for v in header.values())
        assert data <= 20_000 or len(header) == 1
    base_index = json.loads((tiny_dir / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(base_index["weight_map"])  # inv_freq included, as released
    assert (out / "config.json").read_text() == (tiny_dir / "config.json").read_text()
    for rel in ("whisper-large-v3/model.safetensors", "whisper-large-v3/config.json", "tiktoken.model",
                "tokenizer_config.json", "generation_config.json"):
        assert (out / rel).read_bytes() == (tiny_dir / rel).read_bytes()
        assert (out / rel).stat().st_ino != (tiny_dir / rel).stat().st_ino  # a copy: editing it leaves the base
    assert _leftovers(tmp_path) == []

    merged = load_model(out, dtype="float32")  # strict: every tensor name and shape must match
    assert merged.feature_encoder is not None and merged.tokenizer is not None
    ref = load_model(tiny_dir, dtype="float32", adapters=[("a", adapter)], load_whisper=False)
    from kimi_lora_cli.adapters.verify import probe_inputs

    inputs = probe_inputs(ref)
    with torch.no_grad():
        want = ref.model.eval()(**inputs)
        got = merged.model.eval()(**inputs)
        plain = load_model(tiny_dir, dtype="float32", load_whisper=False).model.eval()(**inputs)
    torch.testing.assert_close(got.text_logits, want.text_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.audio_logits, want.audio_logits, atol=1e-5, rtol=1e-5)
    assert (plain.text_logits - want.text_logits).abs().max() > 1e-3  # the adapter does change the output


def test_verify_prints_both_heads(tiny_dir, tmp_path, cli):
    adapter = make_adapter(tiny_dir, tmp_path / "adapter", "q_proj,v_proj,mimo")
    code, stdout, stderr = cli("merge", "-m", tiny_dir, "-a", adapter, "-o", tmp_path / "m", "--verify",
                               "--device", "cpu")
    assert code == 0, stderr
    assert "verify text_logits" in stdout and "verify audio_logits" in stdout and "ok" in stdout


def test_dtype_cast_and_config(tiny_dir, tmp_path):
    import torch

    adapter = make_adapter(tiny_dir, tmp_path / "adapter", "all")
    merge_adapters(MergeSpec(model=tiny_dir, adapters=(adapter,), output=tmp_path / "bf16", dtype="bfloat16"))
    cfg = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16"
    state = _merged_state(tmp_path / "bf16")
    assert {v.dtype for v in state.values()} == {torch.bfloat16}
    ref = peft_merged(tiny_dir, [adapter])
    _assert_same({k: v.to(torch.bfloat16) for k, v in ref.items()}, state)


def test_plain_text_llm(tmp_path):
    import torch

    from kimi_lora_cli.loading import load_model

    base = build_tiny_qwen(tmp_path / "qwen")
    adapter = make_adapter(base, tmp_path / "adapter", "all", task_type="CAUSAL_LM", use_rslora=True)
    merge_adapters(MergeSpec(model=base, adapters=(adapter,), output=tmp_path / "merged"))
    merged = load_model(tmp_path / "merged", dtype="float32")
    _assert_same(peft_merged(base, [adapter]), merged.model.state_dict())
    ref = load_model(base, dtype="float32", adapters=[("a", adapter)])
    ids = torch.arange(10)[None]
    with torch.no_grad():
        torch.testing.assert_close(merged.model(ids).logits, ref.model(ids).logits, atol=1e-5, rtol=1e-5)


def test_overwrite_replaces_only_a_folder_merge_wrote(tiny_dir, tmp_path, cli):
    adapter = make_adapter(tiny_dir, tmp_path / "adapter", "q_proj")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, stdout, stderr = cli("merge", "-m", tiny_dir, "-a", adapter, "-o", out)
    assert code == 1 and "not empty" in stderr and "--overwrite" in stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1
    code, _, stderr = cli("merge", "-m", tiny_dir, "-a", adapter, "-o", out, "--overwrite")
    assert code == 1 and "not made by kimi-lora" in stderr and "never replaced" in stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()  # an empty folder is fine
    code, _, stderr = cli("merge", "-m", tiny_dir, "-a", adapter, "-o", out)
    assert code == 0, stderr
    marker = json.loads((out / ".kimi-lora.json").read_text())
    assert marker["command"] == "merge" and marker["tool"] == "kimi-lora"
    (out / "note.txt").write_text("a file merge did not write")
    code, _, stderr = cli("merge", "-m", tiny_dir, "-a", adapter, "-o", out, "--overwrite")
    assert code == 0, stderr  # the folder is merge's own: replaced as a whole
    assert not (out / "note.txt").exists() and (out / "model.safetensors.index.json").is_file()
    assert _leftovers(tmp_path) == []


def test_overwrite_never_deletes_the_adapter_inside_the_output(tiny_dir, tmp_path, cli):
    out = tmp_path / "out"
    adapter = make_adapter(tiny_dir, out / "adapter", "q_proj")
    (out / "notes.txt").write_text("mine")
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    code, _, stderr = cli("merge", "-m", tiny_dir, "-a", adapter, "-o", out, "--overwrite")
    assert code == 1 and "contains the adapter folder" in stderr
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before


def test_merged_files_are_copies_unless_link_files(tiny_dir, tmp_path, cli):
    adapter = make_adapter(tiny_dir, tmp_path / "adapter", "q_proj")
    code, _, stderr = cli("merge", "-m", tiny_dir, "-a", adapter, "-o", tmp_path / "m")
    assert code == 0, stderr
    cfg = tmp_path / "m" / "config.json"
    cfg.write_text(cfg.read_text().replace('"vocab_size"', '"edited_vocab_size"'))  # edit in place
    assert '"vocab_size"' in (tiny_dir / "config.json").read_text()  # the base is untouched
    code, stdout, stderr = cli("merge", "-m", tiny_dir, "-a", adapter, "-o", tmp_path / "linked", "--link-files")
    assert code == 0, stderr
    whisper = "whisper-large-v3/model.safetensors"
    assert (tmp_path / "linked" / whisper).stat().st_ino == (tiny_dir / whisper).stat().st_ino
    for small in ("config.json", "whisper-large-v3/config.json", "tiktoken.model"):
        assert (tmp_path / "linked" / small).stat().st_ino != (tiny_dir / small).stat().st_ino
    assert "(1 hard-linked)" in stdout


def test_a_rerun_removes_what_killed_merges_left(tiny_dir, tmp_path, cli):
    import subprocess
    import sys

    adapter = make_adapter(tiny_dir, tmp_path / "adapter", "q_proj")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    alive = sleeper.pid
    host = __import__("socket").gethostname()
    left = {}
    for pid in (dead.pid, alive):
        p = tmp_path / f".out.partial-{pid}"
        p.mkdir()
        (p / "model-1-of-2.safetensors").write_bytes(b"x" * 1000)
        (p / ".kimi-lora.json").write_text(json.dumps({"tool": "kimi-lora", "command": "merge", "pid": pid,
                                                       "host": host}))
        left[pid] = p
    foreign = tmp_path / f".out.partial-{dead.pid + 100000}"
    foreign.mkdir()  # same name pattern, but no marker: not ours
    try:
        code, _, stderr = cli("merge", "-m", tiny_dir, "-a", adapter, "-o", tmp_path / "out")
    finally:
        sleeper.kill()
        sleeper.wait()
    assert code == 0, stderr
    assert not left[dead.pid].exists() and "left by an interrupted `kimi-lora merge`" in " ".join(stderr.split())
    assert left[alive].exists() and foreign.exists()  # a live run's folder and a foreign one stay


def test_mismatched_base_reported_before_writing(tiny_dir, tmp_path, cli):
    qwen = build_tiny_qwen(tmp_path / "qwen")
    kimi_adapter = make_adapter(tiny_dir, tmp_path / "kimi_adapter", "all")
    out = tmp_path / "out"
    code, _, stderr = cli("merge", "-m", qwen, "-a", kimi_adapter, "-o", out)
    assert code == 1 and "does not fit" in stderr and "mismatch" in stderr and "more" in stderr
    assert not out.exists() and _leftovers(tmp_path) == []


def test_shape_mismatch_is_listed(tiny_dir, tmp_path):
    from kimi_lora_cli.models.kimi_audio.tiny import TinySpec, build_tiny_checkpoint

    wider = build_tiny_checkpoint(tmp_path / "wider", TinySpec(hidden_size=48, intermediate_size=96))
    adapter = make_adapter(tiny_dir, tmp_path / "adapter", "q_proj")
    with pytest.raises(AdapterError, match=r"model\.layers\.0\.self_attn\.q_proj: adapter implies weight \[32, 32\]"):
        merge_adapters(MergeSpec(model=wider, adapters=(adapter,), output=tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_failure_mid_write_leaves_nothing(tiny_dir, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    base = tmp_path / "base"
    shutil.copytree(tiny_dir, base)
    index = json.loads((base / "model.safetensors.index.json").read_text())
    victim = "mimo_output.weight"  # in the last shard, so earlier shards are already written
    shard = base / index["weight_map"][victim]
    tensors = load_file(str(shard))
    tensors[victim][0, 0] = float("nan")
    save_file(tensors, str(shard), metadata={"format": "pt"})
    adapter = make_adapter(base, tmp_path / "adapter", ["model.layers.0.self_attn.q_proj", "mimo_output"])
    out = tmp_path / "out" / "merged"
    with pytest.raises(AdapterError, match="NaN"):
        merge_adapters(MergeSpec(model=base, adapters=(adapter,), output=out, max_shard_size=20_000))
    assert not out.exists() and _leftovers(out.parent) == []
    assert torch.isnan(load_file(str(shard))[victim]).any()  # base untouched


@pytest.mark.parametrize("weights, message", [((0.5,), "1 values for 2 adapters"), (None, "DoRA")])
def test_bad_combinations(tiny_dir, tmp_path, weights, message):
    a = make_adapter(tiny_dir, tmp_path / "a", "q_proj", use_dora=weights is None)
    b = make_adapter(tiny_dir, tmp_path / "b", "v_proj")
    with pytest.raises((ConfigError, AdapterError), match=message):
        merge_adapters(MergeSpec(model=tiny_dir, adapters=(a, b), weights=weights, output=tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_cli_errors_are_one_line(tiny_dir, tmp_path, cli):
    adapter = make_adapter(tiny_dir, tmp_path / "adapter", "q_proj")
    for args, needle in [
        (("-a", adapter, "-o", tmp_path / "o", "--weights", "a,b"), "--weights"),
        (("-a", adapter, "-o", tmp_path / "o", "--max-shard-size", "lots"), "--max-shard-size"),
        (("-a", tmp_path / "nope", "-o", tmp_path / "o"), "no such adapter folder"),
        (("-a", adapter, "-o", tiny_dir / "sub"), "is inside the base model folder"),
        (("-a", adapter, "-o", tmp_path / "o", "--dtype", "int8"), "--dtype"),
    ]:
        code, _, stderr = cli("merge", "-m", tiny_dir, *args)
        assert code == 1 and needle in stderr and "Traceback" not in stderr, stderr
        assert len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists() and not (tiny_dir / "sub").exists()


def test_pickle_adapter_needs_allow_pickle(tiny_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    adapter = make_adapter(tiny_dir, tmp_path / "adapter", "q_proj")
    st = adapter / "adapter_model.safetensors"
    torch.save(load_file(str(st)), adapter / "adapter_model.bin")
    os.remove(st)
    with pytest.raises(AdapterError, match="--allow-pickle"):
        merge_adapters(MergeSpec(model=tiny_dir, adapters=(adapter,), output=tmp_path / "o"))
    merge_adapters(MergeSpec(model=tiny_dir, adapters=(adapter,), output=tmp_path / "o", allow_pickle=True))
    _assert_same(peft_merged(tiny_dir, [adapter]), _merged_state(tmp_path / "o"))


def _tiny_gpt2(folder: Path) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64)).save_pretrained(
        str(folder))
    return folder


def test_row_blocks_and_transposed_weights_stay_exact(tiny_dir, tmp_path, monkeypatch):
    """Merging a few rows at a time (forced small blocks) stays bit-identical to peft, for [out, in]
    weights, the heads, embeddings and GPT-2 Conv1D weights stored [in, out] (fan_in_fan_out)."""
    import kimi_lora_cli.adapters.merge as merge_mod

    monkeypatch.setattr(merge_mod, "BLOCK_ELEMENTS", 100)  # -> MIN_BLOCK_ROWS rows per block
    kimi = make_adapter(tiny_dir, tmp_path / "kimi", ["model.embed_tokens", "mimo_output",
                                                       "model.layers.1.mlp.down_proj"], use_rslora=True)
    merge_adapters(MergeSpec(model=tiny_dir, adapters=(kimi,), output=tmp_path / "m1"))
    _assert_same(peft_merged(tiny_dir, [kimi]), _merged_state(tmp_path / "m1"))

    gpt2 = _tiny_gpt2(tmp_path / "gpt2")
    names = [f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "mlp.c_fc", "mlp.c_proj")]
    adapter = make_adapter(gpt2, tmp_path / "gpt2_adapter", names, fan_in_fan_out=True, task_type="CAUSAL_LM")
    merge_adapters(MergeSpec(model=gpt2, adapters=(adapter,), output=tmp_path / "m2"))
    from kimi_lora_cli.loading import load_model

    _assert_same(peft_merged(gpt2, [adapter]), load_model(tmp_path / "m2", dtype="float32").model.state_dict())


def test_bfloat16_base_equals_peft(tmp_path, monkeypatch):
    """bf16 release-like base: float32 arithmetic and one rounding, bit-identical to peft for one
    adapter (peft's adapter weights are float32 by default), also when a head is merged in
    several blocks. With several adapters peft rounds to bf16 after each one; kimi-lora sums the
    float32 deltas and rounds once, so the two agree to within one bf16 step."""
    import torch

    import kimi_lora_cli.adapters.merge as merge_mod
    from kimi_lora_cli.models.kimi_audio.tiny import TinySpec, build_tiny_checkpoint

    monkeypatch.setattr(merge_mod, "BLOCK_ELEMENTS", 100)
    base = build_tiny_checkpoint(tmp_path / "bf16", TinySpec(dtype="bfloat16", hidden_size=64,
                                                             intermediate_size=128))
    a = make_adapter(base, tmp_path / "a", ["mimo_output", "model.layers.0.mlp.up_proj",
                                            "model.mimo_layers.1.self_attn.q_proj"], seed=1)
    merge_adapters(MergeSpec(model=base, adapters=(a,), output=tmp_path / "one"))
    got = _merged_state(tmp_path / "one")
    assert {v.dtype for v in got.values()} == {torch.bfloat16}
    _assert_same(peft_merged(base, [a]), got)

    b = make_adapter(base, tmp_path / "b", "q_proj,mimo_output", seed=2, r=2, use_rslora=True)
    merge_adapters(MergeSpec(model=base, adapters=(a, b), weights=(0.7, 0.3), output=tmp_path / "two"))
    got = _merged_state(tmp_path / "two")
    peft_bf16 = peft_merged(base, [a, b], [0.7, 0.3])
    exact = peft_merged(base, [a, b], [0.7, 0.3], dtype="float64")
    ours_err = peft_err = 0.0
    for key, want in exact.items():
        err = (got[key].double() - want).abs()
        assert (err <= want.abs() * 2**-8 * (1 + 1e-6) + 1e-40).all(), key  # one rounding: half a step
        ours_err += float(err.sum())
        peft_err += float((peft_bf16[key].double() - want).abs().sum())
    assert ours_err <= peft_err


def test_verify_detects_a_wrong_merge(tiny_dir, tmp_path):
    """The --verify comparison fails when the folder is not base + adapter (here: weight 0.5)."""
    from kimi_lora_cli.adapters.verify import verify_merged

    adapter = make_adapter(tiny_dir, tmp_path / "adapter", "all")
    merge_adapters(MergeSpec(model=tiny_dir, adapters=(adapter,), output=tmp_path / "half", weights=(0.5,)))
    wrong = verify_merged(tiny_dir, [adapter], [1.0], tmp_path / "half")
    assert not wrong.ok and set(wrong.diffs) == {"text_logits", "audio_logits"}
    right = verify_merged(tiny_dir, [adapter], [0.5], tmp_path / "half")
    assert right.ok and max(right.diffs.values()) < 1e-4
