"""The loading core: layouts, strictness, meta builds, bad folders."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from kimi_lora_cli.errors import ModelLoadError
from kimi_lora_cli.loading import inspect_folder, load_model
from kimi_lora_cli.models.kimi_audio.tiny import build_tiny_checkpoint


def _probe(loaded):
    cfg = loaded.config
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, cfg.vocab_size, (1, 6), generator=g)
    cont = torch.tensor([[False, True, True, False, False, False]])
    wave = torch.sin(torch.arange(2560) / 7.0)
    rows = loaded.feature_encoder.encode(wave)
    feats = torch.zeros(1, 6, rows.shape[1])
    feats[0, 1:3] = rows[:2]
    with torch.no_grad():
        return loaded.model(a, text_input_ids=a, is_continuous_mask=cont, continuous_features=feats)


def test_release_layout(tiny_dir, tiny):
    info = tiny.info
    assert info.kind == "kimi-audio" and info.layout == "release"
    assert len(info.weight_files) == 3 and info.weight_files[-1].name == "model-3-of-3.safetensors"
    cfg = tiny.config
    n_inv = cfg.num_hidden_layers + cfg.kimia_mimo_layers
    assert len(info.ignored_keys) == n_inv and all(k.endswith("rotary_emb.inv_freq") for k in info.ignored_keys)
    assert tiny.feature_encoder.row_dim == cfg.kimia_adaptor_input_dim
    assert tiny.tokenizer.num_base_tokens == cfg.num_base_tokens


@pytest.mark.parametrize("layout", ["finetune", "export"])
def test_other_layouts_give_identical_logits(tmp_path, tiny_dir, tiny, layout):
    folder = build_tiny_checkpoint(tmp_path / layout, layout=layout)
    loaded = load_model(folder, dtype="float32", base_path=tiny_dir)
    assert loaded.info.layout == layout
    ref, out = _probe(tiny), _probe(loaded)
    torch.testing.assert_close(out.text_logits, ref.text_logits)
    torch.testing.assert_close(out.audio_logits, ref.audio_logits)


def test_finetune_layout_alone_needs_base_for_tokenizer(tmp_path):
    folder = build_tiny_checkpoint(tmp_path / "ft", layout="finetune")
    with pytest.raises(ModelLoadError, match="tiktoken.model"):
        load_model(folder)


def test_weights_false_reads_no_tensor(tmp_path, tiny_dir):
    folder = tmp_path / "cfg-only"
    folder.mkdir()
    shutil.copy(tiny_dir / "config.json", folder / "config.json")
    loaded = load_model(folder, weights=False, load_tokenizer_=False)
    assert all(p.is_meta for p in loaded.model.parameters())
    assert loaded.info.num_parameters == tiny_num_params(tiny_dir)


def tiny_num_params(folder):
    return load_model(folder, weights=False, load_tokenizer_=False).info.num_parameters


def test_bf16_dtype_and_auto(tiny_dir):
    loaded = load_model(tiny_dir, dtype="bf16", load_whisper=False)
    assert loaded.model.dtype == torch.bfloat16
    assert load_model(tiny_dir, load_whisper=False).model.dtype == torch.float32  # auto = torch_dtype


def _copy(tiny_dir, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(tiny_dir, dst)
    return dst


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no such folder"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="config.json: not found"):
        load_model(tmp_path / "empty")


def test_truncated_shard(tmp_path, tiny_dir):
    d = _copy(tiny_dir, tmp_path)
    shard = d / "model-1-of-2.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=r"model-1-of-2.safetensors: truncated safetensors"):
        load_model(d)


def test_garbage_shard(tmp_path, tiny_dir):
    d = _copy(tiny_dir, tmp_path)
    (d / "model-2-of-2.safetensors").write_bytes(b"\xff" * 40)
    with pytest.raises(ModelLoadError, match="unreadable safetensors"):
        load_model(d)


def test_missing_tensor_is_reported(tmp_path, tiny_dir):
    from safetensors.torch import load_file, save_file

    d = _copy(tiny_dir, tmp_path)
    shard = d / "model-3-of-3.safetensors"
    tensors = load_file(shard)
    del tensors["mimo_output.weight"]
    save_file(tensors, shard)
    with pytest.raises(ModelLoadError, match="missing 1 tensors \\(mimo_output.weight\\)"):
        load_model(d)


def test_config_weights_mismatch(tmp_path, tiny_dir):
    d = _copy(tiny_dir, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 48
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="config and the weights come from different models"):
        load_model(d)


def test_bad_json_config_names_line(tmp_path, tiny_dir):
    d = _copy(tiny_dir, tmp_path)
    (d / "config.json").write_text('{\n "a": 1,\n oops\n}')
    with pytest.raises(ModelLoadError, match=r"config.json:3: invalid JSON"):
        load_model(d)


def test_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "not-a-model", "architectures": ["X"]}))
    with pytest.raises(ModelLoadError, match="model_type 'not-a-model' is unknown"):
        load_model(tmp_path)


def test_pickle_refused_without_flag(tmp_path, tiny_dir):
    d = tmp_path / "pkl"
    d.mkdir()
    shutil.copy(tiny_dir / "config.json", d)
    torch.save({"x": torch.zeros(1)}, d / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="--allow-pickle"):
        load_model(d)


def test_inspect_folder_reads_headers_only(tiny_dir):
    info = inspect_folder(tiny_dir)
    assert "model.layers.0.self_attn.q_proj.weight" in info.weight_map
    assert info.whisper_source and info.tokenizer_source


def test_plain_hf_causal_lm(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
                      num_hidden_layers=2, vocab_size=64)
    Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / "qwen")
    loaded = load_model(tmp_path / "qwen", dtype="float32")
    assert loaded.info.kind == "causal-lm" and loaded.feature_encoder is None
    meta = load_model(tmp_path / "qwen", weights=False)
    assert all(p.is_meta for p in meta.model.parameters())


def test_tiny_builder_is_deterministic(tmp_path):
    a = build_tiny_checkpoint(tmp_path / "a")
    b = build_tiny_checkpoint(tmp_path / "b")
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    index = json.loads((a / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in a.glob("model-*.safetensors")}


def test_broken_adapter_config_names_the_file(tmp_path, tiny_dir):
    from kimi_lora_cli.errors import AdapterError

    ad = tmp_path / "ad"
    ad.mkdir()
    (ad / "adapter_config.json").write_text('{\n  oops\n}')
    with pytest.raises(AdapterError, match=r"adapter_config.json:2: invalid JSON"):
        load_model(tiny_dir, load_whisper=False, adapters=[("a", ad)])
