"""Conversation -> dual streams, checked against hand-written streams of the official rules."""

from __future__ import annotations

import pytest

from kimi_lora_cli.data.conversation import ConversationError, tokenize_conversation


@pytest.fixture()
def env(tiny):
    return tiny.tokenizer, tiny.config


def test_asr_prompt_matches_reference_layout(env):
    tok, cfg = env
    codes = [cfg.kimia_token_offset + c for c in (5, 9, 2)]
    instr = "Please transcribe the spoken content into written text."
    msgs = [
        {"role": "user", "message_type": "text", "content": instr},
        {"role": "user", "message_type": "audio", "content": "a.wav", "audio_tokens": codes},
    ]
    seq = tokenize_conversation(msgs, tok, cfg, output_type="text", add_generation_prompt=True)
    n = len(tok.encode(instr))
    b = tok.blank
    assert seq.audio_ids == ([tok.user_start] + [b] * n + [cfg.kimia_media_begin] + codes
                             + [cfg.kimia_media_end, tok.speech_ct, tok.msg_end, tok.assistant_start])
    assert seq.text_ids == [b] + tok.encode(instr) + [b] * (3 + 2) + [b, b, b]
    assert seq.is_continuous == [False] * (2 + n) + [True] * 3 + [False] * 4
    assert not any(seq.audio_loss) and not any(seq.text_loss)
    assert [(m.start, m.length) for m in seq.media] == [(2 + n, 3)]


def test_asr_training_sample_losses_and_labels(env):
    tok, cfg = env
    codes = [cfg.kimia_token_offset + 1]
    msgs = [
        {"role": "user", "message_type": "audio", "content": "a.wav", "audio_tokens": codes},
        {"role": "assistant", "message_type": "text", "content": "hello"},
    ]
    seq = tokenize_conversation(msgs, tok, cfg, output_type="text")
    h = tok.encode("hello")
    b = tok.blank
    # ct after the user audio (an audio message ending a turn); none after the assistant text
    assert seq.audio_ids == [tok.user_start, cfg.kimia_media_begin, *codes, cfg.kimia_media_end, tok.speech_ct,
                             tok.msg_end, tok.assistant_start, *[b] * len(h), b, tok.msg_end]
    assert seq.text_ids == [b] * 6 + [b] + h + [tok.text_eos, b]
    assert seq.text_loss == [False] * 7 + [True] * (len(h) + 1) + [False]
    assert not any(seq.audio_loss)
    lab = seq.labels(tok.pad)
    assert lab["text_labels"] == seq.text_ids[1:] + [tok.pad]
    assert lab["text_loss_mask"] == seq.text_loss[1:] + [False]


def test_multi_turn_both_and_audio_answer(env):
    tok, cfg = env
    c1 = [cfg.kimia_token_offset + 3, cfg.kimia_token_offset + 4]
    c2 = [cfg.kimia_token_offset + 7]
    msgs = [
        {"role": "user", "message_type": "audio", "content": "q.wav", "audio_tokens": c1},
        {"role": "assistant", "message_type": "text", "content": "hi"},
        {"role": "assistant", "message_type": "audio", "content": "r.wav", "audio_tokens": c2},
        {"role": "user", "message_type": "text", "content": "ok"},
    ]
    seq = tokenize_conversation(msgs, tok, cfg, output_type="both")
    b, hi, ok = tok.blank, tok.encode("hi"), tok.encode("ok")
    assert seq.audio_ids == [tok.user_start, cfg.kimia_media_begin, *c1, cfg.kimia_media_end, tok.speech_ctd,
                             tok.msg_end, tok.assistant_start, *[b] * len(hi), b, cfg.kimia_media_begin, *c2,
                             cfg.kimia_media_end, tok.speech_ctd, tok.msg_end, tok.user_start, *[b] * len(ok),
                             tok.msg_end]
    # assistant audio: loss on its codes and its media_end, not on media_begin
    i = seq.audio_ids.index(c2[0])
    assert seq.audio_loss[i] and seq.audio_loss[i + 1] and not seq.audio_loss[i - 1]
    assert sum(seq.audio_loss) == 2 and len(seq.media) == 2 and seq.media[1].start == i


def test_audio_text_history(env):
    tok, cfg = env
    codes = [cfg.kimia_token_offset + 2] * 3
    msgs = [{"role": "assistant", "message_type": "audio-text", "content": ["r.wav", "yes"], "audio_tokens": codes}]
    seq = tokenize_conversation(msgs, tok, cfg)
    d = cfg.kimia_mimo_audiodelaytokens
    assert seq.audio_ids[1 : 1 + d + 3] == [tok.blank] * d + codes
    y = tok.encode("yes")
    assert seq.text_ids[1 : 1 + d + 3] == y + [tok.blank] * (d + 3 - len(y))
    assert not any(seq.is_continuous)


def test_errors(env):
    tok, cfg = env
    with pytest.raises(ConversationError, match="unknown role 'bot'"):
        tokenize_conversation([{"role": "bot", "message_type": "text", "content": "x"}], tok, cfg)
    with pytest.raises(ConversationError, match="without audio_tokens"):
        tokenize_conversation([{"role": "user", "message_type": "audio", "content": "a.wav"}], tok, cfg)
    with pytest.raises(ConversationError, match="outside"):
        tokenize_conversation([{"role": "user", "message_type": "audio", "content": "a", "audio_tokens": [3]}],
                              tok, cfg)
