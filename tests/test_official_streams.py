"""Dual streams written out by hand, token by token, for every conversation kind.

The ids are those of the tiny checkpoint (its trained BPE and its special-token table); each expected
stream was written from the official rules (`finetune_codes/datasets.py` and
`kimia_infer/api/prompt_manager.py` `tokenize_message`) and the same conversations were run through the
official code on CPU, outside this repository, giving identical streams. The rule these pin down most:
ct/ctd follows an AUDIO message that ends a turn, never a text or audio-text message.
"""

from __future__ import annotations

import pytest

from kimi_lora_cli.data.conversation import tokenize_conversation
from kimi_lora_cli.inference.prompts import tokenize_prompt

# Special ids of the tiny checkpoint (num_base_tokens 512; same offsets as the release's 151643).
END, MB, ME, B, EOS, U, A, CT, CTD = 514, 530, 532, 535, 536, 539, 540, 544, 545
OFF = 933  # kimia_token_offset: GLM code k is id 933 + k

INSTR = [80, 108, 270, 289, 421, 259, 429, 448, 313, 411, 304, 46]  # "Please transcribe the spoken ..."
HELLO = [399]
HOW_ARE_YOU = [72, 294, 452, 311, 63]
I_AM_FINE = [73, 454, 446, 46]
WHAT_IS = [87, 104, 276, 464, 32, 50, 43, 50, 63]  # "What is 2+2?"
HI = [104, 105]
NIHAO = [228, 189, 160, 229, 165, 189]  # "你好"
YES = [121, 101, 115]
OK = [111, 107]


def _audio(path, codes, role="user"):
    return {"role": role, "message_type": "audio", "content": path, "audio_tokens": [OFF + c for c in codes]}


def _text(text, role="user"):
    return {"role": role, "message_type": "text", "content": text}


@pytest.fixture()
def env(tiny):
    tok, cfg = tiny.tokenizer, tiny.config
    # the constants above are this checkpoint's ids
    assert (tok.msg_end, cfg.kimia_media_begin, cfg.kimia_media_end, tok.blank, tok.text_eos) == (END, MB, ME, B, EOS)
    assert (tok.user_start, tok.assistant_start, tok.speech_ct, tok.speech_ctd, cfg.kimia_token_offset) == (
        U, A, CT, CTD, OFF)
    assert tok.encode("Please transcribe the spoken content into written text.") == INSTR
    return tok, cfg


def test_asr_training_sample(env):
    tok, cfg = env
    msgs = [_text("Please transcribe the spoken content into written text."), _audio("a.wav", [5, 9, 2]),
            _text("hello", "assistant")]
    seq = tokenize_conversation(msgs, tok, cfg, output_type="text")
    assert seq.audio_ids == [U, *[B] * 12, MB, 938, 942, 935, ME, CT, END, A, B, B, END]
    assert seq.text_ids == [B, *INSTR, B, B, B, B, B, B, B, B, 399, EOS, B]
    assert seq.is_continuous == [False] * 14 + [True] * 3 + [False] * 7
    assert seq.text_loss == [False] * 21 + [True, True, False]  # "hello" and its text_eos
    assert not any(seq.audio_loss)
    lab = seq.labels(tok.pad)
    assert lab["text_labels"][-4:] == [399, EOS, B, tok.pad]
    assert lab["text_loss_mask"][-4:] == [True, True, False, False]


def test_asr_inference_prompt(env):
    tok, cfg = env
    msgs = [_text("Please transcribe the spoken content into written text."), _audio("a.wav", [5, 9, 2])]
    seq = tokenize_prompt(msgs, tok, cfg, "text")
    assert seq.audio_ids == [U, *[B] * 12, MB, 938, 942, 935, ME, CT, END, A]
    assert seq.text_ids == [B, *INSTR, B, B, B, B, B, B, B, B]


def test_multi_turn_text_chat_has_no_ct(env):
    tok, cfg = env
    msgs = [_text("How are you?"), _text("I am fine.", "assistant"), _text("What is 2+2?")]
    seq = tokenize_prompt(msgs, tok, cfg, "text")
    # a text-only prompt is exactly one token per text id + role + msg_end, nothing else
    assert seq.audio_ids == [U, B, B, B, B, B, END, A, B, B, B, B, B, END, U, *[B] * 9, END, A]
    assert seq.text_ids == [B, *HOW_ARE_YOU, B, B, *I_AM_FINE, EOS, B, B, *WHAT_IS, B, B]
    assert len(seq) == 26


def test_assistant_audio_answer_both(env):
    tok, cfg = env
    msgs = [_audio("q.wav", [3, 4]), _text("hi", "assistant"), _audio("r.wav", [7], "assistant")]
    seq = tokenize_conversation(msgs, tok, cfg, output_type="both")
    assert seq.audio_ids == [U, MB, 936, 937, ME, CTD, END, A, B, B, B, MB, 940, ME, CTD, END]
    assert seq.text_ids == [B, B, B, B, B, B, B, B, *HI, EOS, B, B, B, B, B]
    assert seq.audio_loss == [False] * 12 + [True, True, False, False]  # the answer's code and media_end
    assert seq.text_loss == [False] * 8 + [True, True, True] + [False] * 5
    assert seq.is_continuous == [False, False, True, True] + [False] * 8 + [True] + [False] * 3


def test_two_consecutive_messages_of_one_role(env):
    tok, cfg = env
    msgs = [_audio("x.wav", [1]), _audio("y.wav", [2, 2])]
    seq = tokenize_prompt(msgs, tok, cfg, "text")
    # one role token for both; ct + msg_end only after the second (the turn's end)
    assert seq.audio_ids == [U, MB, 934, ME, MB, 935, 935, ME, CT, END, A]
    assert seq.text_ids == [B] * 11
    assert [(m.start, m.length) for m in seq.media] == [(2, 1), (5, 2)]


def test_prompt_ending_with_user_text(env):
    tok, cfg = env
    msgs = [_audio("q.wav", [3, 4]), _text("What is 2+2?")]
    seq = tokenize_prompt(msgs, tok, cfg, "text")
    # the audio does not end the turn, the text does: no ct anywhere
    assert seq.audio_ids == [U, MB, 936, 937, ME, *[B] * 9, END, A]
    assert seq.text_ids == [B, B, B, B, B, *WHAT_IS, B, B]
    assert CT not in seq.audio_ids and CTD not in seq.audio_ids


def test_chinese_spoken_dialogue(env):
    tok, cfg = env
    msgs = [_text("你好"), _audio("z.wav", [8]), _text("你好", "assistant"), _audio("w.wav", [6, 1], "assistant")]
    seq = tokenize_conversation(msgs, tok, cfg, output_type="both")
    assert seq.audio_ids == [U, *[B] * 6, MB, 941, ME, CTD, END, A, *[B] * 7, MB, 939, 934, ME, CTD, END]
    assert seq.text_ids == [B, *NIHAO, B, B, B, B, B, B, *NIHAO, EOS, B, B, B, B, B, B]


def test_audio_text_history_then_user_text(env):
    tok, cfg = env
    history = {"role": "assistant", "message_type": "audio-text", "content": ["h.wav", "yes"],
               "audio_tokens": [OFF + 1, OFF + 2, OFF + 3]}
    seq = tokenize_prompt([_audio("q.wav", [3, 4]), history, _text("ok")], tok, cfg, "text")
    # delay (6) blanks then the codes (not continuous); the text then blank padding; msg_end, no ct
    assert seq.audio_ids == [U, MB, 936, 937, ME, CT, END, A, *[B] * 6, 934, 935, 936, END, U, B, B, END, A]
    assert seq.text_ids == [B] * 8 + YES + [B] * 6 + [B, B] + OK + [B, B]
    assert seq.is_continuous == [False, False, True, True] + [False] * 19


def test_multi_turn_spoken_dialogue(env):
    tok, cfg = env
    msgs = [_audio("q1.wav", [1, 2]), _audio("a1.wav", [3], "assistant"), _audio("q2.wav", [4])]
    seq = tokenize_prompt(msgs, tok, cfg, "both")
    assert seq.audio_ids == [U, MB, 934, 935, ME, CTD, END, A, MB, 936, ME, CTD, END, U, MB, 937, ME, CTD, END, A]
    assert seq.text_ids == [B] * 20
