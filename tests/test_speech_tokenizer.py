"""GLM-4-Voice speech tokenizer: loading the real folder layout, code counts, batching, attention."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kimi_lora_cli.errors import ModelLoadError
from kimi_lora_cli.loading import load_speech_tokenizer
from kimi_lora_cli.models.kimi_audio.whisper import log_mel, rows_for_samples
from kimi_lora_cli.models.speech_tokenizer.modeling import (
    attention_allowed,
    codes_for_samples,
    frame_mask,
    padded_length,
)
from kimi_lora_cli.models.speech_tokenizer.tiny import build_tiny_speech_tokenizer, synthetic_speech

VOCAB = 128


@pytest.fixture(scope="module")
def st_dir(tmp_path_factory):
    return build_tiny_speech_tokenizer(tmp_path_factory.mktemp("st") / "glm-4-voice-tokenizer", vocab=VOCAB)


@pytest.fixture(scope="module")
def st(st_dir):
    return load_speech_tokenizer(st_dir)


@pytest.fixture(scope="module")
def long_wave():
    return synthetic_speech(31.0, seed=3)


def test_codes_deterministic_in_range_and_of_predicted_length(st, st_dir, long_wave):
    codes = st.tokenize(long_wave)
    # 31 s = one full 30 s piece (375 codes) + 16,000 samples (ceil(16000 / 1280) = 13 codes).
    assert len(codes) == 375 + 13 == codes_for_samples(len(long_wave)) == rows_for_samples(len(long_wave))
    assert all(isinstance(c, int) and 0 <= c < VOCAB for c in codes)
    assert len(set(codes)) >= 10, "random tokenizer should still spread the codes"
    assert load_speech_tokenizer(st_dir).tokenize(long_wave) == codes
    # The same seed writes the same bytes.
    other = build_tiny_speech_tokenizer(st_dir.parent / "again", vocab=VOCAB)
    assert (other / "model.safetensors").read_bytes() == (st_dir / "model.safetensors").read_bytes()


def test_batched_codes_equal_one_by_one(st, long_wave):
    waves = [long_wave, long_wave[:20_800], long_wave[:1280], long_wave[5000:6281], long_wave[:160_000],
             synthetic_speech(2.5, seed=9)]
    single = [st.tokenize(w) for w in waves]
    assert st.tokenize_batch(waves, batch_size=8) == single
    assert st.tokenize_batch(waves[::-1], batch_size=3) == single[::-1]
    assert [len(c) for c in single] == [388, 17, 1, 2, 125, 32]


@pytest.mark.parametrize(
    "samples, expected",
    [(1, 1), (1279, 1), (1280, 1), (1281, 2), (479_999, 375), (480_000, 375), (480_001, 376),
     (481_280, 376), (481_281, 377), (960_000, 750), (0, 0)],
)
def test_duration_rule_hand_computed(samples, expected):
    assert codes_for_samples(samples) == expected


@pytest.mark.parametrize("samples", [479_999, 480_000, 480_001, 481_280])
def test_codes_at_the_30s_boundary(st, samples):
    wave = synthetic_speech(samples / 16000 + 0.01, seed=1)[:samples]
    codes = st.tokenize(wave)
    assert len(codes) == {479_999: 375, 480_000: 375, 480_001: 376, 481_280: 376}[samples]
    # The second 30 s piece is tokenized on its own: its codes are those of the tail alone.
    if samples > 480_000:
        assert codes[375:] == st.tokenize(wave[480_000:])


def test_front_end_matches_whisper_feature_extractor():
    """Mel and mask equal transformers' extractor with GLM's settings; the mask rule counts codes."""
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(feature_size=128)
    wave = synthetic_speech(3.0, seed=2)
    for length in (1281, 12_345, 40_960):
        piece = wave[:length]
        ref = fe([piece], sampling_rate=16000, return_attention_mask=True, return_tensors="pt",
                 padding="longest", pad_to_multiple_of=1280, device="cpu")
        padded = padded_length(length)
        mel = log_mel(torch.nn.functional.pad(torch.from_numpy(piece), (0, padded - length))[None])
        torch.testing.assert_close(mel, ref.input_features, rtol=0, atol=1e-5)
        mask = frame_mask(length, padded // 160)
        assert torch.equal(mask, ref.attention_mask[0].bool())
        assert int(mask[::2][::4].sum()) == -(-length // 1280) == codes_for_samples(length)
    # In a padded batch the shorter piece's subsampled mask still counts its own codes.
    ref = fe([wave[:40_001], wave[:12_345]], sampling_rate=16000, return_attention_mask=True,
             return_tensors="pt", padding="longest", pad_to_multiple_of=1280, device="cpu")
    assert ref.attention_mask[:, ::2][:, ::4].sum(1).tolist() == [32, 10]


def test_block_causal_structure():
    valid = torch.tensor([[True] * 7 + [False]])
    allowed = attention_allowed(valid, block=3, causal=False)[0, 0]
    expected = torch.tensor([[1 if (j // 3 <= i // 3 and j < 7) else 0 for j in range(8)] for i in range(8)])
    assert torch.equal(allowed.int(), expected)
    # Frame 0 sees its whole block (frames 1, 2 are "future" but allowed), not block 1.
    assert allowed[0].tolist() == [True, True, True, False, False, False, False, False]


def test_codes_do_not_see_past_their_block(st):
    """Changing audio after 8 s (2 blocks of 200 frames = 100 codes) leaves the first 100 codes."""
    loud = synthetic_speech(8.0, seed=4)
    rng = np.random.default_rng(0)
    tail_a = (0.01 * rng.standard_normal(48_000)).astype(np.float32)
    tail_b = (0.01 * rng.standard_normal(48_000)).astype(np.float32)
    margin = np.zeros(400, np.float32)  # the STFT window of the last frame reaches 200 samples ahead
    a = st.tokenize(np.concatenate([loud, margin, tail_a]))
    b = st.tokenize(np.concatenate([loud, margin, tail_b]))
    assert a[:100] == b[:100]
    assert a[101:] != b[101:]


def test_pooling_pads_to_a_multiple(st):
    enc = st.encoder
    mel = torch.randn(2, 128, 10)  # conv -> 5 frames -> padded to 8 -> 2 pooled frames
    valid = torch.tensor([[True] * 10, [True] * 3 + [False] * 7])
    codes, keep = enc(mel, valid)
    assert codes.shape == (2, 2)
    assert keep.tolist() == [[True, True], [True, False]]


def test_layer_matches_transformers_whisper_encoder_layer(st):
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoderLayer

    cfg = st.config
    wcfg = WhisperConfig(d_model=cfg.d_model, encoder_attention_heads=cfg.encoder_attention_heads,
                         encoder_ffn_dim=cfg.encoder_ffn_dim, num_mel_bins=128)
    wcfg._attn_implementation = "eager"
    ref = WhisperEncoderLayer(wcfg).eval()
    ours = st.encoder.layers[0]
    ref.load_state_dict({k: v for k, v in ours.state_dict().items()})
    x = torch.randn(2, 9, cfg.d_model)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, None), ref(x, None), rtol=1e-5, atol=1e-5)


def test_prefixed_keys_load_to_the_same_codes(st, tmp_path, long_wave):
    prefixed = build_tiny_speech_tokenizer(tmp_path / "prefixed", vocab=VOCAB, key_prefix="model.encoder.")
    assert load_speech_tokenizer(prefixed).tokenize(long_wave[:50_000]) == st.tokenize(long_wave[:50_000])


def test_loading_errors_name_the_file_and_fix(tmp_path):
    with pytest.raises(ModelLoadError, match="no such folder.*glm-4-voice-tokenizer"):
        load_speech_tokenizer(tmp_path / "absent")
    folder = build_tiny_speech_tokenizer(tmp_path / "st", vocab=VOCAB)
    cfg = json.loads((folder / "config.json").read_text())
    # The file holds layers 0-2; a config asking for 4 layers before the codebook does not fit it.
    cfg["encoder_layers"], cfg["quantize_position"], cfg["pooling_position"] = 4, 4, 4
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: weights do not match config\.json: missing 15 tensors \(layers\.3\."):
        load_speech_tokenizer(folder)
    del cfg["quantize_vocab_size"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="config.json: no quantize_vocab_size: this is a plain Whisper"):
        load_speech_tokenizer(folder)
    (folder / "config.json").write_text("{ not json")
    with pytest.raises(ModelLoadError, match=r"config.json:1: invalid JSON"):
        load_speech_tokenizer(folder)
    (folder / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="config.json: not found"):
        load_speech_tokenizer(folder)
