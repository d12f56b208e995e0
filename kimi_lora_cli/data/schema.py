"""The record checks `train`, `prepare` and `infer` share: one official conversation at a time.

`check_record` / `check_line` list every problem of one line, each as `what is wrong; how to fix it`
(callers prefix `FILE:LINE: `):

  * a line that is not an object, missing keys (`conversation`, `role`, `message_type`,
    `content`), unknown roles or message types, malformed content;
  * audio files that cannot be found (absolute, relative to the jsonl's folder, then to the current
    folder, as the official demo data is relative to the repository root), are a folder, are empty,
    cannot be decoded or hold no samples;
  * missing or malformed `audio_tokens` (missing ones are fine when a speech tokenizer will compute
    them), codes outside [kimia_token_offset, vocab_size), and code counts that disagree with the
    audio's duration (one code per 1280 samples at 16 kHz, per 30 s piece: `rows_for_samples`);
  * conversations with nothing to learn (no assistant message).

Reading the data (every format) is `data/sources/`; train's reader (`load_samples`) is `data/samples.py`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kimi_lora_cli.data.audio import TARGET_SR as SAMPLE_RATE
from kimi_lora_cli.data.audio import resampled_length
from kimi_lora_cli.data.conversation import (
    MESSAGE_TYPES,
    ROLES,
    TASK_TYPES,
    TASK_TYPES_HINT,
)

TOO_LONG_POLICIES = ("error", "skip", "truncate")
MAX_LISTED_PROBLEMS = 50
NOT_JSONL_AFTER = 5
REGENERATE = "regenerate them with `kimi-lora prepare --recompute --speech-tokenizer DIR`"
NEED_TOKENIZER = "pass --speech-tokenizer DIR (the glm-4-voice-tokenizer folder) to compute them"


# -------------------------------------------------------------------------------------------
# Line checks: the one set of rules `train`, `prepare` and `infer` apply to every line
# -------------------------------------------------------------------------------------------


@dataclass
class AudioRef:
    """One audio message of a line: where its file is and what it needs."""

    index: int  # message index in the conversation
    content: str
    continuous: bool = True  # an "audio" message (Whisper features); "audio-text" history is codes only
    path: Path | None = None
    via_data_dir: bool = False  # found relative to the jsonl's folder
    via_cwd: bool = False  # found only relative to the current folder (the official demo data's way)
    samples: int = 0  # 16 kHz length from the file header
    needs_tokens: bool = False  # audio_tokens missing (or to be recomputed)

    @property
    def seconds(self) -> float:
        return self.samples / SAMPLE_RATE


@dataclass
class LineCheck:
    line: int
    record: dict[str, Any] | None
    audios: list[AudioRef] = field(default_factory=list)  # the files found, in message order
    problems: list[str] = field(default_factory=list)


def resolve_audio(content: str, data_dir: Path, cwd: Path | None = None) -> tuple[Path | None, bool]:
    """(existing path, found relative to the jsonl's folder?): an absolute path as given; a relative one
    against the jsonl's folder, then the current folder (the official demo data is relative to the
    repository root). (None, False) when nothing exists there."""
    p = Path(content).expanduser()
    if p.is_absolute():
        return (p, False) if p.exists() else (None, False)
    if (data_dir / p).exists():
        return data_dir / p, True
    cand = (cwd or Path.cwd()) / p
    return (cand, False) if cand.exists() else (None, False)


def probe_audio(path: Path) -> tuple[int, str | None]:
    """(16 kHz length from the header, problem or None) without decoding the samples."""
    import soundfile as sf

    if path.is_dir():
        return 0, "is a folder, not an audio file"
    if path.stat().st_size == 0:
        return 0, "is empty (0 bytes); re-export the audio"
    try:
        info = sf.info(str(path))
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        return 0, f"cannot be decoded ({reason}); convert it to wav, flac or ogg"
    if info.frames <= 0 or info.samplerate <= 0:
        return 0, "holds no samples (zero length); remove the message or re-export the audio"
    return resampled_length(info.frames, info.samplerate), None


class AudioProbe:
    """probe_audio with memory (a file used by many lines is opened once per pass)."""

    def __init__(self) -> None:
        self._seen: dict[Path, tuple[int, str | None]] = {}

    def __call__(self, path: Path) -> tuple[int, str | None]:
        if path not in self._seen:
            self._seen[path] = probe_audio(path)
        return self._seen[path]


def check_tokens(tokens: Any, offset: int, vocab_size: int) -> str | None:
    """What is wrong with an audio_tokens value (codes + kimia_token_offset), or None."""
    if not isinstance(tokens, list) or not tokens:
        return "audio_tokens must be a non-empty list of ints"
    bad_type = [c for c in tokens if not isinstance(c, int) or isinstance(c, bool)]
    if bad_type:
        return f"audio_tokens holds {len(bad_type)} non-integer values (first: {bad_type[0]!r})"
    outside = [c for c in tokens if not offset <= c < vocab_size]
    if outside:
        raw = all(0 <= c < vocab_size - offset for c in outside)
        return (f"audio token {outside[0]} outside [{offset}, {vocab_size}) ({len(outside)} of {len(tokens)})"
                + (" (they look like raw codes: add kimia_token_offset)" if raw else ""))
    return None


def parse_line(text: str) -> tuple[Any, str | None]:
    """(object, None) or (None, problem) for one jsonl line. Columns count characters from 1 in
    the line as written (a leading byte-order mark is not one of them)."""
    try:
        return json.loads(text.removeprefix("\ufeff")), None
    except json.JSONDecodeError as e:
        return None, f"invalid JSON ({e.msg} at column {e.colno}); each line must be one JSON object"


def decode_line(raw: bytes) -> tuple[str | None, str | None]:
    """(text, None) or (None, problem) for the bytes of one jsonl line."""
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as e:
        return None, (f"not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); save the file as UTF-8")


def check_record(
    obj: Any,
    data_dir: Path,
    offset: int,
    vocab_size: int,
    *,
    line: int = 0,
    speech_tokenizer: bool = False,
    recompute: bool = False,
    probe: Callable[[Path], tuple[int, str | None]] = probe_audio,
    cwd: Path | None = None,
    need_answer: bool = True,
    tokens_hint: str = NEED_TOKENIZER,
) -> LineCheck:
    """Every problem of one parsed line (each message, each audio file), and its audio files.

    Missing audio_tokens are a problem (fixed as `tokens_hint` says) unless a speech tokenizer will
    compute them (`speech_tokenizer`); `recompute` marks every audio message as needing them. An
    "audio-text" message (assistant history) needs its file only when its tokens are to be computed.
    `need_answer=False` accepts a conversation without an assistant message (an `infer` prompt)."""
    from kimi_lora_cli.models.kimi_audio.whisper import rows_for_samples

    chk = LineCheck(line, obj if isinstance(obj, dict) else None)
    problems = chk.problems
    if not isinstance(obj, dict):
        problems.append(f"expected a JSON object with task_type and conversation, got {type(obj).__name__}")
        return chk
    conv = obj.get("conversation")
    if conv is None:
        keys = ", ".join(sorted(obj)) or "none"
        problems.append(f"missing key 'conversation' (keys: {keys}); each line needs a conversation list")
        return chk
    if not isinstance(conv, list) or not conv:
        problems.append("'conversation' must be a non-empty list of messages")
        return chk
    task = obj.get("task_type", "understanding")
    if not isinstance(task, str):
        problems.append(f"task_type must be a string such as \"understanding\", not {task!r}")
    elif task not in TASK_TYPES:
        problems.append(f"unknown task_type {json.dumps(task, ensure_ascii=False)}; {TASK_TYPES_HINT}")
    has_assistant = False
    for i, msg in enumerate(conv):
        where = f"message {i}"
        if not isinstance(msg, dict):
            problems.append(f"{where}: expected an object with role, message_type and content")
            continue
        missing = [k for k in ("role", "message_type", "content") if k not in msg]
        if missing:
            problems.append(f"{where}: missing key{'s' if len(missing) > 1 else ''} {', '.join(missing)}; "
                            "each message needs role, message_type and content")
        role, mtype = msg.get("role"), msg.get("message_type")
        if "role" in msg and role not in ROLES:
            problems.append(f"{where}: unknown role {role!r}; use 'user' or 'assistant'")
        has_assistant = has_assistant or role == "assistant"
        if "message_type" in msg and mtype not in MESSAGE_TYPES:
            problems.append(f"{where}: unknown message_type {mtype!r}; use 'text', 'audio' or 'audio-text'")
            continue
        if missing:
            continue
        content = msg["content"]
        if mtype == "text":
            if not isinstance(content, str):
                problems.append(f"{where}: text content must be a string")
            continue
        tokens = msg.get("audio_tokens")
        needs_tokens = tokens is None or recompute
        if mtype == "audio":
            if not isinstance(content, str) or not content.strip():
                problems.append(f"{where}: audio content must be the audio file's path")
                continue
            audio: str | None = content
            need_file = True
        else:
            if role != "assistant":
                problems.append(f"{where}: audio-text messages are assistant history only")
            pair = isinstance(content, list) and len(content) == 2
            audio = content[0] if pair else content if isinstance(content, str) else None
            text = content[1] if pair else msg.get("text")
            need_file = needs_tokens
            if not isinstance(text, str) or not (isinstance(audio, str) and audio.strip() or not need_file):
                problems.append(f"{where}: audio-text content must be [audio_path, text]")
                continue
        ref = AudioRef(i, audio or "", continuous=mtype == "audio", needs_tokens=needs_tokens)
        if audio:
            ref.path, ref.via_data_dir = resolve_audio(audio, data_dir, cwd)
            ref.via_cwd = ref.path is not None and not ref.via_data_dir and not Path(audio).expanduser().is_absolute()
            if ref.path is None:
                if need_file:
                    problems.append(f"{where}: audio file {audio!r} not found (looked at it as given, in "
                                    f"{data_dir.resolve()} and in the current folder); fix the path or run from "
                                    "the folder it is relative to")
            else:
                ref.samples, problem = probe(ref.path)
                if problem is None:
                    chk.audios.append(ref)
                elif need_file:
                    problems.append(f"{where}: audio file {audio!r} {problem}")
                # history audio whose tokens are given is never read: a bad file there is no problem
        if needs_tokens:
            if not speech_tokenizer:
                problems.append(f"{where}: no audio_tokens; {tokens_hint}")
            continue
        problem = check_tokens(tokens, offset, vocab_size)
        if problem:
            problems.append(f"{where}: {problem}; {REGENERATE}")
        elif ref.samples and len(tokens) != rows_for_samples(ref.samples):
            problems.append(
                f"{where}: {len(tokens)} audio_tokens but the audio ({ref.seconds:.2f} s) yields "
                f"{rows_for_samples(ref.samples)} (1 per 80 ms per 30 s piece); the tokens belong to another "
                f"file: {REGENERATE}"
            )
    if need_answer and not has_assistant:
        problems.append("no assistant message: nothing to learn; add the assistant's answer or drop the line")
    return chk


def check_line(text: str, line: int, data_dir: Path, offset: int, vocab_size: int, **options: Any) -> LineCheck:
    """`check_record` of one jsonl line (options as there)."""
    obj, problem = parse_line(text)
    if problem:
        return LineCheck(line, None, problems=[problem])
    return check_record(obj, data_dir, offset, vocab_size, line=line, **options)
