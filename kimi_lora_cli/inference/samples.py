"""Evaluation samples for `infer`: jsonl lines (or one --prompt) -> prompt messages + reference.

A jsonl line is the fine-tuning format (`task_type`, `conversation` of messages with role,
message_type, content and, for audio, `audio_tokens`), optionally with an `id`. The prompt is
the conversation without its trailing assistant messages; the reference is the text of those
trailing assistant messages (text, or the text half of audio-text), when there is any. A
conversation that ends with a user message is all prompt and has no reference.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kimi_lora_cli.errors import DataError

PREPARE_HINT = "add audio_tokens with `kimi-lora prepare` (or the official extract_semantic_codes.py)"


@dataclass
class InferSample:
    id: str
    messages: list[dict[str, Any]]  # the prompt (no trailing assistant answer)
    reference: str | None
    output_type: str  # from task_type: "understanding" -> "text", else "both"
    source: str  # "file:line" (or "--prompt") for error messages
    summary: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def split_conversation(conversation: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str | None]:
    """(prompt messages, reference text or None): the trailing assistant run is the answer."""
    cut = len(conversation)
    while cut > 0 and conversation[cut - 1].get("role") == "assistant":
        cut -= 1
    answer = conversation[cut:]
    texts = []
    for m in answer:
        content = m.get("content")
        if m.get("message_type", "text") == "text" and isinstance(content, str):
            texts.append(content)
        elif m.get("message_type") == "audio-text":
            text = content[1] if isinstance(content, (list, tuple)) and len(content) == 2 else m.get("text")
            if isinstance(text, str):
                texts.append(text)
    return conversation[:cut], (" ".join(texts) if texts else None)


def summarize(messages: list[dict[str, Any]], width: int = 120) -> str:
    """Short one-line description of a prompt: texts, and audio as [audio name, N tokens]."""
    parts = []
    for m in messages:
        if m.get("message_type", "text") == "audio":
            name = Path(str(m.get("content", "?"))).name
            parts.append(f"[audio {name}, {len(m.get('audio_tokens') or [])} tokens]")
        else:
            content = m.get("content")
            parts.append(content if isinstance(content, str) else str(content))
    text = " ".join(" ".join(parts).split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _resolve_audio(content: Any, base: Path, where: str) -> str:
    if not isinstance(content, str) or not content:
        raise DataError(f"{where}: audio message content must be the audio file path")
    path = Path(content).expanduser()
    if not path.is_absolute():
        beside = base / path
        path = beside if beside.exists() or not path.exists() else path
    if not path.is_file():
        raise DataError(f"{where}: audio file {content!r} not found (looked beside the jsonl and in the "
                        "current folder); fix the path")
    return str(path.resolve())


def _check_rows(path: str, codes: Any, where: str) -> None:
    """Fail early when a clip is undecodable or has fewer feature rows than audio tokens."""
    import math

    import soundfile as sf

    from kimi_lora_cli.models.kimi_audio.whisper import SAMPLE_RATE, rows_for_samples

    try:
        info = sf.info(path)
    except Exception as e:  # soundfile raises its own error types
        raise DataError(f"{where}: cannot decode {path} ({str(e).splitlines()[0]}); use wav, flac or ogg") from None
    rows = rows_for_samples(math.ceil(info.frames * SAMPLE_RATE / info.samplerate))
    if isinstance(codes, list) and len(codes) > rows:
        raise DataError(f"{where}: {len(codes)} audio_tokens but {Path(path).name} yields only {rows} feature "
                        "rows (1 per 80 ms); the tokens belong to another file - regenerate them with "
                        "`kimi-lora prepare`")


def _check_messages(messages: Any, where: str, base: Path) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'conversation' must be a non-empty list of messages")
    out = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"{where}: message {k} is not an object")
        m = dict(m)
        if m.get("role") not in ("user", "assistant"):
            raise DataError(f"{where}: message {k} has role {m.get('role')!r}; use 'user' or 'assistant'")
        mtype = m.get("message_type", "text")
        if mtype not in ("text", "audio", "audio-text"):
            raise DataError(f"{where}: message {k} has message_type {mtype!r}; use 'text' or 'audio'")
        if mtype in ("audio", "audio-text"):
            if m.get("audio_tokens") is None:
                raise DataError(
                    f"{where}: message {k} is audio without audio_tokens; {PREPARE_HINT} "
                    "(a speech tokenizer is not built in yet)"
                )
            if mtype == "audio":
                m["content"] = _resolve_audio(m.get("content"), base, f"{where}: message {k}")
                _check_rows(m["content"], m["audio_tokens"], f"{where}: message {k}")
        elif not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {k} text content must be a string")
        out.append(m)
    return out


def read_samples(path: str | Path) -> list[InferSample]:
    """Read and check every line of a jsonl file (errors name file:line and the fix)."""
    from kimi_lora_cli.data.conversation import output_type_for_task

    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: data file not found; pass a jsonl file with one conversation per line")
    samples: list[InferSample] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg}); one JSON object per line") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object with a 'conversation' list")
            conversation = _check_messages(obj.get("conversation"), where, path.parent)
            messages, reference = split_conversation(conversation)
            if not messages:
                raise DataError(f"{where}: the conversation has only assistant messages; nothing to prompt with")
            sid = str(obj["id"]) if obj.get("id") is not None else str(lineno)
            if sid in seen:
                raise DataError(f"{where}: id {sid!r} repeats line {seen[sid]}; ids must be unique")
            seen[sid] = lineno
            samples.append(InferSample(
                id=sid, messages=messages, reference=reference,
                output_type=output_type_for_task(obj.get("task_type")), source=where,
                summary=summarize(messages),
            ))
    if not samples:
        raise DataError(f"{path}: no samples (the file is empty)")
    return samples


def read_audio_tokens_file(path: str | Path, offset: int, vocab_size: int) -> list[int]:
    """Codes from a file of ints (whitespace/comma separated, or a JSON list), offset added if raw.

    Values in [0, vocab - offset) are raw GLM-4-Voice codes and get `kimia_token_offset` added;
    values in [offset, vocab) already carry it (the jsonl convention)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: audio tokens file not found")
    text = path.read_text(encoding="utf-8").strip()
    try:
        values = json.loads(text) if text.startswith("[") else [int(v) for v in re.split(r"[\s,]+", text) if v]
    except (ValueError, json.JSONDecodeError):
        raise DataError(f"{path}: not a list of integers (use whitespace, commas or a JSON list)") from None
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise DataError(f"{path}: expected a non-empty list of integer audio codes")
    codebook = vocab_size - offset
    if all(0 <= v < codebook for v in values):
        return [v + offset for v in values]
    if all(offset <= v < vocab_size for v in values):
        return values
    raise DataError(f"{path}: audio codes must all be raw codes in [0, {codebook}) or offset codes in "
                    f"[{offset}, {vocab_size}); regenerate them with `kimi-lora prepare`")


def prompt_sample(prompt: str, audio: str | Path | None, audio_tokens: list[int] | None,
                  output_type: str = "text") -> InferSample:
    """The single sample of `--prompt TEXT [--audio FILE --audio-tokens FILE]`."""
    messages: list[dict[str, Any]] = [{"role": "user", "message_type": "text", "content": prompt}]
    if audio is not None:
        if audio_tokens is None:
            raise DataError(f"{audio}: --audio needs --audio-tokens FILE (its semantic codes); "
                            f"{PREPARE_HINT} - a speech tokenizer is not built in yet")
        messages.append({"role": "user", "message_type": "audio",
                         "content": _resolve_audio(str(audio), Path.cwd(), "--audio"),
                         "audio_tokens": audio_tokens})
    elif audio_tokens is not None:
        raise DataError("--audio-tokens needs --audio FILE too (the model also reads the waveform's Whisper features)")
    return InferSample(id="prompt", messages=messages, reference=None, output_type=output_type,
                       source="--prompt", summary=summarize(messages))
