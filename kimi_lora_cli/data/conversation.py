"""Conversation -> the two Kimi-Audio token streams, continuous mask, loss masks and labels.

Rules (reference document, section 2), applied message by message:
  * role token when the role changes (or first message): audio stream user/assistant start,
    text stream blank;
  * text: text stream the BPE ids, audio stream one blank each; assistant text adds text_eos
    (text stream) / blank (audio stream); text loss on assistant ids and their eos;
  * audio: audio stream media_begin, codes (continuous), media_end; text stream blanks; audio loss
    on assistant codes and their media_end;
  * audio-text (assistant history): audio stream delay blanks then the codes (not continuous);
    text stream the text ids padded with blanks to delay + n_codes;
  * turn end (the message is the last one or the next one changes role): an AUDIO message gets
    speech_ct (output "text") or speech_ctd (output "both") right after its media_end; then every
    message kind gets msg_end; both with a blank on the text stream. Text and audio-text messages get
    no ct/ctd (the official `tokenize_message` emits ct/ctd only in its audio branch);
  * a generation prompt appends assistant start / blank.
Labels are each stream shifted left by one with pad_id at the end; masks shift the same way.
Every audio message is its own media span with its own continuous features (the official
one-audio-per-sequence limit is lifted).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

ROLES = ("user", "assistant")
MESSAGE_TYPES = ("text", "audio", "audio-text")


class ConversationError(ValueError):
    """A message breaks the format; the message names the message index and the fix."""


@dataclass
class MediaSpan:
    """An audio message: codes occupy positions [start, start + length) of the streams."""

    start: int
    length: int
    audio: Any  # path (str) or waveform given by the caller
    message_index: int
    continuous: bool = True


@dataclass
class TokenizedConversation:
    audio_ids: list[int] = field(default_factory=list)
    text_ids: list[int] = field(default_factory=list)
    is_continuous: list[bool] = field(default_factory=list)
    audio_loss: list[bool] = field(default_factory=list)
    text_loss: list[bool] = field(default_factory=list)
    media: list[MediaSpan] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.audio_ids)

    def _push(self, audio: int, text: int, cont: bool = False, a_loss: bool = False, t_loss: bool = False):
        self.audio_ids.append(audio)
        self.text_ids.append(text)
        self.is_continuous.append(cont)
        self.audio_loss.append(a_loss)
        self.text_loss.append(t_loss)

    def labels(self, pad_id: int) -> dict[str, list]:
        """Shifted labels and masks: position t predicts position t + 1 of each stream."""
        return {
            "audio_labels": self.audio_ids[1:] + [pad_id],
            "text_labels": self.text_ids[1:] + [pad_id],
            "audio_loss_mask": self.audio_loss[1:] + [False],
            "text_loss_mask": self.text_loss[1:] + [False],
        }


# The official loader names one value, "understanding" (answers in text), and turns every other
# value into text + speech answers, so a typo or an invented name ("asr") silently trains the audio
# head on blanks. kimi-lora accepts one name for each kind; the project's speech data uses
# "speech_conversation".
TASK_TYPES = {"understanding": "text", "speech_conversation": "both"}
TASK_TYPES_HINT = ('use "understanding" for answers in text (ASR, captions, questions about audio) or '
                   '"speech_conversation" for answers in text and speech')


def output_type_for_task(task_type: str | None) -> str:
    """'understanding' tasks answer in text; 'speech_conversation' trains text + speech ('both')."""
    return TASK_TYPES.get(task_type or "understanding", "both")


def tokenize_conversation(
    messages: Sequence[dict[str, Any]],
    tokenizer: Any,
    config: Any,
    output_type: str = "text",
    add_generation_prompt: bool = False,
) -> TokenizedConversation:
    """Build the dual streams for `messages` (dicts with role, message_type, content, audio_tokens).

    Audio messages must carry `audio_tokens` (codes already offset by kimia_token_offset)."""
    if output_type not in ("text", "both"):
        raise ConversationError(f"output_type must be 'text' or 'both', not {output_type!r}")
    tok = tokenizer
    blank = tok.blank
    delay = config.kimia_mimo_audiodelaytokens
    media_begin, media_end = config.kimia_media_begin, config.kimia_media_end
    ct = tok.speech_ct if output_type == "text" else tok.speech_ctd
    seq = TokenizedConversation()
    prev_role = None
    for i, msg in enumerate(messages):
        role = msg.get("role")
        mtype = msg.get("message_type", "text")
        if role not in ROLES:
            raise ConversationError(f"message {i}: unknown role {role!r}; use 'user' or 'assistant'")
        if mtype not in MESSAGE_TYPES:
            raise ConversationError(f"message {i}: unknown message_type {mtype!r}; use 'text', 'audio' or 'audio-text'")
        loss = role == "assistant"
        if role != prev_role:
            seq._push(tok.user_start if role == "user" else tok.assistant_start, blank)
        if mtype == "text":
            content = msg.get("content")
            if not isinstance(content, str):
                raise ConversationError(f"message {i}: text content must be a string")
            for t in tok.encode(content):
                seq._push(blank, t, t_loss=loss)
            if loss:
                seq._push(blank, tok.text_eos, t_loss=True)
        elif mtype == "audio":
            codes = _codes(msg, i, config)
            seq._push(media_begin, blank)
            seq.media.append(MediaSpan(start=len(seq), length=len(codes), audio=msg.get("content"), message_index=i))
            for c in codes:
                seq._push(c, blank, cont=True, a_loss=loss)
            seq._push(media_end, blank, a_loss=loss)
            if _ends_turn(messages, i):
                seq._push(ct, blank)
        else:  # audio-text: assistant history with both the speech codes and its text
            if role != "assistant":
                raise ConversationError(f"message {i}: audio-text messages are assistant history only")
            codes = _codes(msg, i, config)
            content = msg.get("content")
            text = content[1] if isinstance(content, (list, tuple)) and len(content) == 2 else msg.get("text")
            if not isinstance(text, str):
                raise ConversationError(f"message {i}: audio-text needs content [audio_path, text]")
            text_ids = tok.encode(text)
            if len(text_ids) > delay + len(codes):
                raise ConversationError(
                    f"message {i}: audio-text text has {len(text_ids)} tokens but only {delay + len(codes)} "
                    "positions (delay + codes); shorten the text or use separate messages"
                )
            padded = text_ids + [blank] * (delay + len(codes) - len(text_ids))
            for a, t in zip([blank] * delay + codes, padded):
                seq._push(a, t)
        if _ends_turn(messages, i):
            seq._push(tok.msg_end, blank)
        prev_role = role
    if add_generation_prompt:
        seq._push(tok.assistant_start, blank)
    return seq


def _ends_turn(messages: Sequence[dict[str, Any]], i: int) -> bool:
    return i == len(messages) - 1 or messages[i + 1].get("role") != messages[i].get("role")


def _codes(msg: dict[str, Any], index: int, config: Any) -> list[int]:
    codes = msg.get("audio_tokens")
    if codes is None:
        raise ConversationError(
            f"message {index}: audio message without audio_tokens; add them with "
            "`kimi-lora prepare` (or the official extract_semantic_codes.py)"
        )
    if not isinstance(codes, list) or not codes:
        raise ConversationError(f"message {index}: audio_tokens must be a non-empty list of ints")
    lo, hi = config.kimia_token_offset, config.vocab_size
    for c in codes:
        if not isinstance(c, int) or isinstance(c, bool) or not lo <= c < hi:
            raise ConversationError(
                f"message {index}: audio token {c!r} outside [{lo}, {hi}) (codes must include "
                f"kimia_token_offset {lo}); regenerate them with `kimi-lora prepare`"
            )
    return list(codes)


def place_features(seq: TokenizedConversation, rows: Sequence[Any], dim: int):
    """[len(seq), dim] tensor with each media span's feature rows at its code positions, zero elsewhere.

    `rows[k]` are the Whisper rows of `seq.media[k]` ([n, dim]); a span with more rows than codes
    uses the first `length`, one with fewer is an error (the codes do not match the audio)."""
    import torch

    if len(rows) != len(seq.media):
        raise ConversationError(f"{len(rows)} feature blocks for {len(seq.media)} audio messages")
    out = torch.zeros(len(seq), dim, dtype=rows[0].dtype if len(rows) else torch.float32)
    for span, r in zip(seq.media, rows):
        if r.shape[0] < span.length:
            raise ConversationError(
                f"message {span.message_index}: {span.length} audio tokens but the audio yields only "
                f"{r.shape[0]} feature rows (1 per 1280 samples); the tokens belong to another file"
            )
        out[span.start : span.start + span.length] = r[: span.length].to(out.dtype)
    return out
