"""Text tokenizer (tiktoken + added_tokens_decoder) and the Whisper feature path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kimi_lora_cli.models.kimi_audio.whisper import log_mel, rows_for_samples


def test_special_ids_by_name(tiny):
    tok, cfg = tiny.tokenizer, tiny.config
    base = cfg.num_base_tokens
    assert tok.media_begin == cfg.kimia_media_begin == base + 18
    assert tok.media_end == cfg.kimia_media_end == base + 20
    assert (tok.blank, tok.text_eos) == (base + 23, base + 24)
    assert (tok.user_start, tok.assistant_start) == (base + 27, base + 28)
    assert (tok.speech_ct, tok.speech_ctd) == (base + 32, base + 33)
    assert tok.msg_end == base + 2 and tok.pad == cfg.pad_token_id
    assert cfg.kimia_token_offset == base + 421


def test_markers_in_text_are_not_specials(tiny):
    tok = tiny.tokenizer
    ids = tok.encode("say <|im_media_begin|> now")
    assert all(i < tok.num_base_tokens for i in ids)
    assert tok.decode(ids) == "say <|im_media_begin|> now"
    assert tok.decode(ids + [tok.text_eos]) == "say <|im_media_begin|> now"


def test_single_digit_split(tiny):
    tok = tiny.tokenizer
    assert len(tok.encode("2025")) == 4


@pytest.mark.parametrize(("n", "rows"), [(1, 1), (1280, 1), (1281, 2), (480000, 375), (480001, 376),
                                         (481280, 376), (481281, 377), (960000, 750)])
def test_rows_for_samples(n, rows):
    assert rows_for_samples(n) == rows


def test_log_mel_matches_transformers_feature_extractor():
    from transformers import WhisperFeatureExtractor

    rng = np.random.default_rng(0)
    wave = (0.3 * rng.standard_normal(16000 * 3)).astype(np.float32)
    ref = WhisperFeatureExtractor(feature_size=128)(wave, sampling_rate=16000, return_tensors="np")
    ref = torch.from_numpy(ref["input_features"][0])
    padded = torch.nn.functional.pad(torch.from_numpy(wave), (0, 480000 - len(wave)))
    ours = log_mel(padded[None])[0]
    assert ours.shape == (128, 3000)
    torch.testing.assert_close(ours, ref, atol=2e-3, rtol=1e-3)


def test_encode_rows_and_chunking(tiny):
    enc = tiny.feature_encoder
    short = torch.sin(torch.arange(16000 * 2) / 5.0)
    rows = enc.encode(short)
    assert rows.shape == (rows_for_samples(len(short)), enc.row_dim)
    long = torch.sin(torch.arange(480000 + 3000) / 5.0)
    long_rows = enc.encode(long)
    assert long_rows.shape[0] == 375 + 3
    # the first 30 s piece is encoded on its own: same rows as encoding it alone
    torch.testing.assert_close(long_rows[:375], enc.encode(long[:480000]))
    batch = enc.encode_batch([short, long])
    torch.testing.assert_close(batch[0], rows)
    torch.testing.assert_close(batch[1], long_rows)


def test_bad_added_tokens_decoder_is_a_load_error(tmp_path, tiny_dir):
    import json
    import shutil

    from kimi_lora_cli.errors import ModelLoadError
    from kimi_lora_cli.loading import load_model

    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"]["not-an-id"] = {"content": "x"}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="added_tokens_decoder entry 'not-an-id'"):
        load_model(d, load_whisper=False)


def test_encoder_input_is_the_log_mel_rounded_to_bfloat16(tiny):
    """The official path casts the log-mel to bfloat16 before the encoder in every run; so do we
    (float32 encoder here), and `mel_dtype=None` keeps the float32 log-mel."""
    from kimi_lora_cli.models.kimi_audio.whisper import WhisperFeatureEncoder

    enc = tiny.feature_encoder
    assert enc.dtype == torch.float32 and enc.mel_dtype == torch.bfloat16
    wave = torch.sin(torch.arange(1280 * 5) / 3.0) * 0.4
    padded = torch.nn.functional.pad(wave, (0, 480000 - len(wave)))
    mel = log_mel(padded[None])
    with torch.no_grad():
        rounded = enc.encoder(mel.to(torch.bfloat16).float()).last_hidden_state[0, :20].reshape(5, -1)
        full = enc.encoder(mel).last_hidden_state[0, :20].reshape(5, -1)
    assert not torch.equal(rounded, full)
    torch.testing.assert_close(enc.encode(wave), rounded, atol=0, rtol=0)
    exact = WhisperFeatureEncoder(enc.encoder, mel_dtype=None)
    torch.testing.assert_close(exact.encode(wave), full, atol=0, rtol=0)
