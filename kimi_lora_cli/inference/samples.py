"""Evaluation samples for `infer`: jsonl lines (or one --prompt) -> prompt messages + reference.

A jsonl line is the fine-tuning format (`task_type`, `conversation` of messages with role,
message_type, content and, for audio, `audio_tokens`), optionally with an `id`. The prompt is
the conversation without its trailing assistant messages; the reference is the text of those
trailing assistant messages (text, or the text half of audio-text), when there is any. A
conversation that ends with a user message is all prompt and has no reference.

Every line goes through the checks `train` and `prepare` apply (`data.schema.check_record`: audio
paths, decodable files, audio_tokens range and count), except that no assistant message is
needed. Audio messages without audio_tokens get them from a speech tokenizer when one is given
(`speech_codes`, a loader of a `CodeStore`, called only when some message needs it).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kimi_lora_cli.data.schema import (
    MAX_LISTED_PROBLEMS,
    NEED_TOKENIZER,
    AudioProbe,
    LineCheck,
    check_record,
)
from kimi_lora_cli.errors import DataError

if TYPE_CHECKING:
    from kimi_lora_cli.data.features import CodeStore
    from kimi_lora_cli.data.sources import SourceOptions

PREPARE_HINT = "add audio_tokens with `kimi-lora prepare` (or the official extract_semantic_codes.py)"
TOKENS_HINT = f"{NEED_TOKENIZER}, or {PREPARE_HINT}"
SpeechCodes = Callable[[], "CodeStore"]


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


def _raise_problems(path: Path | str, problems: list[str]) -> None:
    """One DataError: the problem itself when there is one, else a count and the list (line order)."""
    if not problems:
        return
    if len(problems) == 1:
        raise DataError(problems[0])
    shown = problems[:MAX_LISTED_PROBLEMS]
    more = len(problems) - len(shown)
    raise DataError("\n".join([f"{path}: {len(problems)} problems in the data (fix them and rerun):",
                               *("  " + p for p in shown)] + ([f"  ... and {more} more"] if more else [])))


def _fill_codes(checked: list[tuple[dict[str, Any], LineCheck]], speech_codes: SpeechCodes | None) -> None:
    """audio_tokens from the speech tokenizer for every audio message that lacks them (each file once)."""
    needed = [ref for _, chk in checked for ref in chk.audios if ref.needs_tokens]
    if not needed or speech_codes is None:
        return
    paths = list(dict.fromkeys(ref.path for ref in needed))
    found = dict(zip(paths, speech_codes().codes(paths)))
    for obj, chk in checked:
        for ref in chk.audios:
            if ref.needs_tokens:
                obj["conversation"][ref.index]["audio_tokens"] = found[ref.path]


def _prompt_messages(obj: dict[str, Any], chk: LineCheck) -> list[dict[str, Any]]:
    """The checked conversation with each audio message's content as its resolved, absolute path."""
    messages = [dict(m) for m in obj["conversation"]]
    for ref in chk.audios:
        if ref.continuous:
            messages[ref.index]["content"] = str(ref.path.resolve())
    return messages


def read_samples(path: str | Path, config: Any, *, speech_codes: SpeechCodes | None = None,
                 cwd: str | Path | None = None, notes: list[str] | None = None,
                 options: SourceOptions | None = None) -> list[InferSample]:
    """Read and check every record of the data (any format `data.sources` reads, `options` saying
    how); one DataError lists every problem as `FILE:LINE: ...`. With `speech_codes`, audio messages
    without audio_tokens get theirs from it. `notes` hears (once) about audio paths found only
    relative to the current folder."""
    from kimi_lora_cli.data.conversation import output_type_for_task
    from kimi_lora_cli.data.sources import open_source

    source = open_source(str(path), options)
    path = Path(source.label)
    data_dir = source.base_dir
    probe = AudioProbe()
    problems: list[str] = []
    checked: list[tuple[dict[str, Any], LineCheck]] = []
    meta: list[tuple[str, str]] = []  # (id, where) of each checked line
    seen: dict[str, str] = {}
    for rec in source:
        lineno, where, obj, error = rec.number, rec.where, rec.obj, rec.error
        if error is not None:
            problems.append(f"{where}: {error}")
            continue
        chk = check_record(obj, data_dir, config.kimia_token_offset, config.vocab_size, line=lineno,
                           speech_tokenizer=speech_codes is not None, probe=probe,
                           cwd=Path(cwd) if cwd is not None else None, need_answer=False, tokens_hint=TOKENS_HINT)
        problems.extend(f"{where}: {p}" for p in chk.problems)
        if chk.problems:
            continue
        if all(m.get("role") == "assistant" for m in obj["conversation"]):
            problems.append(f"{where}: the conversation has only assistant messages; nothing to prompt with")
            continue
        sid = str(obj["id"]) if obj.get("id") is not None else str(lineno)
        if sid in seen:
            problems.append(f"{where}: id {sid!r} repeats the one at {seen[sid]}; ids must be unique")
            continue
        seen[sid] = where
        checked.append((obj, chk))
        meta.append((sid, where))
    _raise_problems(path, problems)
    if not checked:
        raise DataError(f"{path}: no samples (the file is empty); pass a jsonl with one conversation per line")
    via_cwd = {ref.path for _, chk in checked for ref in chk.audios if ref.via_cwd}
    if via_cwd and notes is not None:
        notes.append(f"{len(via_cwd)} audio paths are not next to {path} and were found relative to the current "
                     f"folder {Path(cwd) if cwd is not None else Path.cwd()}; `kimi-lora prepare` writes them resolved")
    _fill_codes(checked, speech_codes)
    samples: list[InferSample] = []
    for (obj, chk), (sid, where) in zip(checked, meta):
        messages, reference = split_conversation(_prompt_messages(obj, chk))
        samples.append(InferSample(
            id=sid, messages=messages, reference=reference,
            output_type=output_type_for_task(obj.get("task_type")), source=where,
            summary=summarize(messages),
        ))
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
                  output_type: str = "text", config: Any = None, *, speech_codes: SpeechCodes | None = None,
                  cwd: str | Path | None = None) -> InferSample:
    """The single sample of `--prompt TEXT [--audio FILE [--audio-tokens FILE]]`; the audio is checked
    by the jsonl rules (`config` gives the token range), its codes come from `speech_codes` when
    `audio_tokens` is None."""
    messages: list[dict[str, Any]] = [{"role": "user", "message_type": "text", "content": prompt}]
    if audio is None:
        if audio_tokens is not None:
            raise DataError("--audio-tokens needs --audio FILE too (the model also reads the waveform's Whisper "
                            "features)")
    else:
        if audio_tokens is None and speech_codes is None:
            raise DataError(f"{audio}: --audio needs --audio-tokens FILE (its semantic codes) or --speech-tokenizer "
                            f"DIR (the glm-4-voice-tokenizer folder) to compute them; or {PREPARE_HINT}")
        message: dict[str, Any] = {"role": "user", "message_type": "audio", "content": str(audio)}
        if audio_tokens is not None:
            message["audio_tokens"] = audio_tokens
        record = {"conversation": [*messages, message]}
        here = Path(cwd) if cwd is not None else Path.cwd()
        chk = check_record(record, here, config.kimia_token_offset, config.vocab_size,
                           speech_tokenizer=speech_codes is not None, cwd=here, need_answer=False)
        _raise_problems("--audio", [f"--audio {audio}: {p.removeprefix('message 1: ')}" for p in chk.problems])
        _fill_codes([(record, chk)], speech_codes)
        messages = _prompt_messages(record, chk)
    return InferSample(id="prompt", messages=messages, reference=None, output_type=output_type,
                       source="--prompt", summary=summarize(messages))
