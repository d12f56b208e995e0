"""Loading audio_detokenizer/ + vocoder/: the official file formats, strict checks, no code from pickles."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from kimi_lora_cli.errors import ModelLoadError
from kimi_lora_cli.loading import check_detokenizer, load_detokenizer


@pytest.fixture()
def copy(tiny_detok_dir, tmp_path):
    target = tmp_path / "release"
    shutil.copytree(tiny_detok_dir, target)
    return target


def test_tiny_folders_have_the_layout_the_official_loader_reads(tiny_detok_dir):
    cfg = yaml.safe_load((tiny_detok_dir / "audio_detokenizer" / "config.yaml").read_text())
    dit = cfg["model"]["dit"]
    for key in ("input_size", "semantic_vocab_size", "hidden_size", "depth", "num_heads", "mlp_ratio",
                "position_embedding_type", "max_seq_len"):
        assert key in dit
    assert dit["ffn_type"] == "vanilla_mlp" and {"normalize_mel", "mel_mean", "mel_std"} <= set(cfg)
    state = torch.load(tiny_detok_dir / "audio_detokenizer" / "model.pt", weights_only=True)["state_dict"]
    assert all(k.startswith("speech_model.") for k in state)
    assert state["speech_model.semantic_token_embedding.weight"].shape == (129, 32)  # codes + the CFG row
    voc = json.loads((tiny_detok_dir / "vocoder" / "config.json").read_text())
    assert {"resblock", "upsample_rates", "upsample_kernel_sizes", "upsample_initial_channel", "num_mels",
            "resblock_kernel_sizes", "resblock_dilation_sizes", "activation", "snake_logscale",
            "sampling_rate", "hop_size"} <= set(voc)
    gen = torch.load(tiny_detok_dir / "vocoder" / "model.pt", weights_only=True)["generator"]
    assert {"conv_pre.weight_g", "conv_pre.weight_v", "ups.0.0.weight_g", "resblocks.0.convs1.0.weight_v",
            "resblocks.0.activations.0.act.alpha", "resblocks.0.activations.0.act.beta",
            "resblocks.0.activations.0.upsample.filter", "activation_post.downsample.lowpass.filter",
            "conv_post.weight_g"} <= set(gen)
    assert "conv_pre.weight" not in gen


def test_weight_norm_is_folded_and_plain_weights_load_the_same(tiny_detok_dir, tiny_detok, copy):
    path = copy / "vocoder" / "model.pt"
    gen = torch.load(path, weights_only=True)["generator"]
    g, v = gen["conv_pre.weight_g"], gen["conv_pre.weight_v"]
    want = g * v / v.flatten(1).norm(dim=1).view(-1, 1, 1)
    torch.testing.assert_close(tiny_detok.vocoder.conv_pre.weight, want)
    plain = {}
    for k, t in gen.items():
        if k.endswith(".weight_g"):
            continue
        if k.endswith(".weight_v"):
            p = k[: -len("_v")]
            gk = p + "_g"
            plain[p] = torch._weight_norm(t, gen[gk], 0)
        else:
            plain[k] = t
    torch.save({"generator": plain, "steps": 5}, path)
    other = load_detokenizer(copy, dtype="float32")
    mel = torch.randn(1, 80, 6) - 4
    torch.testing.assert_close(other.vocoder(mel), tiny_detok.vocoder(mel))


def test_a_pickled_object_is_refused_and_never_runs(copy, tmp_path):
    marker = tmp_path / "ran.txt"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = copy / "audio_detokenizer" / "model.pt"
    state = torch.load(path, weights_only=True)
    torch.save({**state, "hyper_parameters": Payload()}, path)
    with pytest.raises(ModelLoadError) as e:
        load_detokenizer(copy)
    assert str(e.value).startswith(f"{path}: refused - it holds Python objects (io.open), which could run code")
    assert "weights_only=False" not in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()


def test_extra_entries_outside_the_model_are_ignored_and_legacy_files_load(copy, tiny_detok):
    path = copy / "audio_detokenizer" / "model.pt"
    state = torch.load(path, weights_only=True)
    state["state_dict"]["resampler.kernel"] = torch.zeros(3)
    state["optimizer_states"] = [{"exp_avg": torch.zeros(2)}]
    torch.save(state, path, _use_new_zipfile_serialization=False)  # no mmap for this format
    det = load_detokenizer(copy, dtype="float32", ode_steps=3)
    for a, b in zip(det.dit.state_dict().values(), tiny_detok.dit.state_dict().values()):
        assert torch.equal(a, b)


def _edit_dit(copy, fn):
    path = copy / "audio_detokenizer" / "model.pt"
    state = torch.load(path, weights_only=True)
    fn(state)
    torch.save(state, path)
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda s: s["state_dict"].pop("speech_model.blocks.1.attn.qkv.weight"),
     "missing 1 tensors (speech_model.blocks.1.attn.qkv.weight)"),
    (lambda s: s["state_dict"].update({"speech_model.extra.weight": torch.zeros(1)}),
     "unexpected 1 tensors (speech_model.extra.weight)"),
    (lambda s: s["state_dict"].update({"speech_model.input_linear.weight": torch.zeros(32, 81)}),
     "tensor speech_model.input_linear.weight has shape (32, 81) but config.yaml implies (32, 80)"),
    (lambda s: s.update({"state_dict": None}), "no 'state_dict' dict of tensors"),
])
def test_dit_weights_are_checked_strictly(copy, edit, message):
    path = _edit_dit(copy, edit)
    with pytest.raises(ModelLoadError) as e:
        load_detokenizer(copy)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value)


def test_vocoder_weights_are_checked_strictly(copy):
    path = copy / "vocoder" / "model.pt"
    state = torch.load(path, weights_only=True)
    del state["generator"]["conv_post.weight_g"]
    torch.save(state, path)
    with pytest.raises(ModelLoadError, match=r"missing 1 tensors \(conv_post.weight_g\)"):
        load_detokenizer(copy)


@pytest.mark.parametrize("where, text, message", [
    ("audio_detokenizer/config.yaml", "model:\n  dit: [1, 2\n", "config.yaml:3: invalid YAML"),
    ("audio_detokenizer/config.yaml", "model:\n  dit:\n    input_size: 80\n", "missing key model.dit.semantic_vocab_size"),
    ("vocoder/config.json", "{\"num_mels\": 80,", "config.json:1: invalid JSON"),
])
def test_bad_configs_name_the_file(copy, where, text, message):
    (copy / where).write_text(text)
    with pytest.raises(ModelLoadError, match=message.replace("[", r"\[").replace(".", r"\.")):
        check_detokenizer(copy)


def test_unsupported_settings_and_missing_folders_are_explained(copy, tmp_path):
    cfg_path = copy / "audio_detokenizer" / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["model"]["dit"]["ffn_type"] = "conv1d_conv1d"
    cfg_path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ModelLoadError, match="ffn_type 'conv1d_conv1d' is not supported"):
        check_detokenizer(copy)
    with pytest.raises(ModelLoadError, match="audio_detokenizer: not found; spoken answers need"):
        check_detokenizer(tmp_path / "nowhere")
