"""OpenAI request bodies -> engine jobs: field checks with one-line messages, messages -> Kimi-Audio messages."""

from __future__ import annotations

import base64
import binascii
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kimi_lora_cli.serving.jobs import RequestError

# The official ASR instructions (the fine-tuning demo's English one; infer.py's Chinese one).
ASR_INSTRUCTION_EN = "Please transcribe the spoken content into written text."
ASR_INSTRUCTION_ZH = "请将音频内容转换为文字。"
CHINESE = ("zh", "zh-cn", "zh-hans", "zh-tw", "zh-hant", "chinese", "cmn")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputAudio(_Strict):
    data: str
    format: Literal["wav", "mp3", "flac", "ogg"] = "wav"


class ContentPart(_Strict):
    type: Literal["text", "input_audio"]
    text: str | None = None
    input_audio: InputAudio | None = None


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    audio: dict[str, Any] | None = None  # a reference to an earlier spoken answer (refused, see below)


class AudioOutput(_Strict):
    format: Literal["wav", "pcm16"] = "wav"
    voice: str | None = None  # Kimi-Audio has one voice; accepted (clients must send one) and ignored


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(_Strict):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    modalities: list[Literal["text", "audio"]] | None = None
    audio: AudioOutput | None = None
    n: int | None = Field(default=None, ge=1, le=1)
    user: str | None = None
    # The official sampler's own knobs (send them in extra_body): text stream, then audio stream.
    top_k: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0)
    audio_temperature: float | None = Field(default=None, ge=0)
    audio_top_k: int | None = Field(default=None, ge=0)
    audio_repetition_penalty: float | None = Field(default=None, gt=0)


CHAT_FIELDS = ", ".join(ChatRequest.model_fields)


def parse_chat(body: Any) -> ChatRequest:
    if not isinstance(body, dict):
        raise RequestError(400, "the body must be a JSON object with `model` and `messages`")
    try:
        return ChatRequest.model_validate(body)
    except ValidationError as e:
        raise validation_error(e, CHAT_FIELDS) from None


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def validation_error(e: ValidationError, fields: str) -> RequestError:
    """The first problem pydantic found, as one line naming the field."""
    # In a union (content: text or parts) pydantic reports every branch; the deepest is the one meant.
    err = max(e.errors(), key=lambda x: len(x["loc"]))
    path = [x for x in err["loc"] if isinstance(x, int) or ("[" not in x and x not in _TYPE_TAGS)]
    loc = ".".join(str(x) if not isinstance(x, int) else f"[{x}]" for x in path).replace(".[", "[")
    kind = err["type"]
    if kind == "extra_forbidden":
        where = loc.rsplit(".", 1)
        field = where[-1]
        inside = f" in {where[0]}" if len(where) > 1 else ""
        hint = f"; this server takes: {fields}" if not inside else ""
        return RequestError(400, f"unknown field {field!r}{inside}; remove it{hint}", loc)
    if kind == "missing":
        return RequestError(400, f"{loc} is required", loc)
    return RequestError(400, f"{loc}: {err['msg']}", loc)


def sampling(req_temperature: float | None, top_k: int | None, penalty: float | None, defaults: Any) -> Any:
    from dataclasses import replace

    changes = {k: v for k, v in (("temperature", req_temperature), ("top_k", top_k),
                                 ("repetition_penalty", penalty)) if v is not None}
    return replace(defaults, **changes) if changes else defaults


def check_top_p(top_p: float | None) -> None:
    if top_p is not None and top_p != 1:
        raise RequestError(400, f"top_p {top_p}: the official Kimi-Audio sampler has top-k, not top-p; leave top_p "
                                "at 1 and send top_k (extra_body) instead", "top_p")


def decode_base64(data: str, where: str) -> bytes:
    if data.startswith("data:") and "," in data:  # a data: URL
        data = data.split(",", 1)[1]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, f"{where}: not valid base64; send the audio file's bytes base64-encoded",
                           where) from None
    if not raw:
        raise RequestError(400, f"{where}: empty audio; send the audio file's bytes base64-encoded", where)
    return raw


def chat_parts(req: ChatRequest) -> list[tuple[str, str, Any, str]]:
    """(role, kind, value, where) for each part in order: kind 'text' (value: the text) or 'audio'
    (value: InputAudio). A message's parts become consecutive messages of its role."""
    parts: list[tuple[str, str, Any, str]] = []
    for i, m in enumerate(req.messages):
        where = f"messages[{i}]"
        if m.role in ("system", "developer"):
            raise RequestError(400, f"{where}: role {m.role!r} is not supported - Kimi-Audio knows user and assistant "
                                    "turns only; put the instruction in a user message", f"{where}.role")
        if m.audio is not None:
            raise RequestError(400, f"{where}.audio: earlier spoken answers cannot be sent back (the server keeps "
                                    "none); send the assistant's text instead", f"{where}.audio")
        if m.content is None or (isinstance(m.content, str) and not m.content.strip()):
            raise RequestError(400, f"{where}.content is empty; send text or content parts", f"{where}.content")
        if isinstance(m.content, str):
            parts.append((m.role, "text", m.content, f"{where}.content"))
            continue
        if not m.content:
            raise RequestError(400, f"{where}.content is an empty list; send at least one part", f"{where}.content")
        for k, p in enumerate(m.content):
            pwhere = f"{where}.content[{k}]"
            if p.type == "text":
                if p.text is None or p.input_audio is not None:
                    raise RequestError(400, f"{pwhere}: a text part holds `text` only", pwhere)
                parts.append((m.role, "text", p.text, pwhere))
            else:
                if p.input_audio is None or p.text is not None:
                    raise RequestError(400, f"{pwhere}: an input_audio part holds `input_audio` "
                                            "({data, format}) only", pwhere)
                if m.role != "user":
                    raise RequestError(400, f"{pwhere}: input_audio is for user messages; send the assistant's "
                                            "earlier answers as text", pwhere)
                parts.append((m.role, "audio", p.input_audio, f"{pwhere}.input_audio"))
    if req.messages[-1].role != "user":
        raise RequestError(400, "the last message must be the user's (the model answers it)", "messages")
    return parts


def transcription_instruction(language: str | None, prompt: str | None) -> str:
    if prompt is not None and prompt.strip():
        return prompt
    if language is not None and language.strip().lower() in CHINESE:
        return ASR_INSTRUCTION_ZH
    return ASR_INSTRUCTION_EN
