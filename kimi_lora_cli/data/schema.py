"""Fine-tuning jsonl: reading, audio path resolution and the pre-flight pass (every problem, file:line).

`load_samples(path, tokenizer, config, max_length=..., too_long="error")` reads the official format
(one object per line: `task_type`, `conversation` of `{role, message_type, content[, audio_tokens]}`),
checks every line, and either returns the tokenized samples or raises one DataError that lists every
problem found, each as `FILE:LINE: what is wrong; how to fix it`:

  * bad JSON, a line that is not an object, missing keys (`conversation`, `role`, `message_type`,
    `content`), unknown roles or message types;
  * audio files that cannot be found (absolute, relative to the jsonl's folder, then to the current
    folder, as the official demo data is relative to the repository root) or cannot be decoded;
  * missing or malformed `audio_tokens`, codes outside [kimia_token_offset, vocab_size), and code
    counts that disagree with the audio's duration (one code per 1280 samples at 16 kHz, per 30 s
    piece: `rows_for_samples`);
  * conversations with nothing to learn (no assistant message), and sequences longer than
    `max_length` (policy "error", "skip" with a count, or "truncate").
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kimi_lora_cli.data.conversation import (
    MESSAGE_TYPES,
    ROLES,
    ConversationError,
    TokenizedConversation,
    output_type_for_task,
    tokenize_conversation,
)
from kimi_lora_cli.errors import DataError

TOO_LONG_POLICIES = ("error", "skip", "truncate")
MAX_LISTED_PROBLEMS = 50
NOT_JSONL_AFTER = 5
PREPARE_HINT = "regenerate them with `kimi-lora prepare` (or the official extract_semantic_codes.py)"


@dataclass
class Sample:
    """One training conversation, tokenized; `audio[k]` is the file of `seq.media[k]`."""

    line: int
    source: Path
    task_type: str
    output_type: str
    seq: TokenizedConversation
    audio: list[Path] = field(default_factory=list)
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.seq)

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


@dataclass
class LoadedData:
    samples: list[Sample]
    path: Path
    lines: int
    skipped_too_long: int = 0
    truncated: int = 0

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.samples)


def resolve_audio_path(raw: str, jsonl_dir: Path, cwd: Path | None = None) -> Path | None:
    """Absolute path as-is; a relative one against the jsonl's folder, then the current folder."""
    p = Path(raw).expanduser()
    if p.is_absolute():
        return p if p.is_file() else None
    for base in (jsonl_dir, cwd or Path.cwd()):
        cand = base / p
        if cand.is_file():
            return cand
    return None


def audio_num_samples(path: Path) -> int:
    """Length at 16 kHz of a decodable audio file (header only; what load_audio would return)."""
    import soundfile as sf

    info = sf.info(str(path))
    if info.frames <= 0:
        raise ValueError("the file holds no samples")
    if info.samplerate == 16000:
        return int(info.frames)
    return int(math.ceil(info.frames * 16000 / info.samplerate))


class _AudioInfoCache:
    def __init__(self) -> None:
        self._cache: dict[Path, int | str] = {}

    def samples(self, path: Path) -> int | str:
        """Sample count at 16 kHz, or the reason the file cannot be decoded."""
        if path not in self._cache:
            try:
                self._cache[path] = audio_num_samples(path)
            except Exception as e:  # soundfile raises several error types for undecodable files
                reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                self._cache[path] = reason
        return self._cache[path]


def _check_codes(codes: Any, lo: int, hi: int) -> str | None:
    if not isinstance(codes, list) or not codes:
        return f"audio_tokens must be a non-empty list of ints; {PREPARE_HINT}"
    bad_type = [c for c in codes if not isinstance(c, int) or isinstance(c, bool)]
    if bad_type:
        return f"audio_tokens holds {len(bad_type)} non-integer values (first: {bad_type[0]!r}); {PREPARE_HINT}"
    outside = [c for c in codes if not lo <= c < hi]
    if outside:
        hint = (" (they look like raw codes: add kimia_token_offset)" if all(0 <= c < hi - lo for c in outside)
                else "")
        return (f"{len(outside)} audio_tokens outside [{lo}, {hi}) (first: {outside[0]}){hint}; "
                f"{PREPARE_HINT}")
    return None


def _check_line(
    obj: Any, jsonl_dir: Path, config: Any, audio_info: _AudioInfoCache, cwd: Path | None
) -> tuple[list[str], list[Path]]:
    """Structural and audio problems of one parsed line, plus the resolved audio of its media spans."""
    from kimi_lora_cli.models.kimi_audio.whisper import rows_for_samples

    problems: list[str] = []
    audio: list[Path] = []
    if not isinstance(obj, dict):
        return [f"expected a JSON object with task_type and conversation, got {type(obj).__name__}"], audio
    conv = obj.get("conversation")
    if conv is None:
        keys = ", ".join(sorted(obj)) or "none"
        return [f"missing key 'conversation' (keys: {keys}); each line needs a conversation list"], audio
    if not isinstance(conv, list) or not conv:
        return ["'conversation' must be a non-empty list of messages"], audio
    task = obj.get("task_type", "understanding")
    if not isinstance(task, str):
        problems.append(f"task_type must be a string such as \"understanding\", not {task!r}")
    lo, hi = config.kimia_token_offset, config.vocab_size
    for i, msg in enumerate(conv):
        where = f"message {i}"
        if not isinstance(msg, dict):
            problems.append(f"{where}: expected an object with role, message_type and content")
            continue
        missing = [k for k in ("role", "message_type", "content") if k not in msg]
        if missing:
            problems.append(f"{where}: missing key{'s' if len(missing) > 1 else ''} {', '.join(missing)}; "
                            "each message needs role, message_type and content")
            continue
        role, mtype = msg["role"], msg["message_type"]
        if role not in ROLES:
            problems.append(f"{where}: unknown role {role!r}; use 'user' or 'assistant'")
        if mtype not in MESSAGE_TYPES:
            problems.append(f"{where}: unknown message_type {mtype!r}; use 'text' or 'audio'")
            continue
        if mtype == "text":
            if not isinstance(msg["content"], str):
                problems.append(f"{where}: text content must be a string")
            continue
        codes = msg.get("audio_tokens")
        if codes is None:
            problems.append(f"{where}: audio message without audio_tokens; add them with `kimi-lora prepare` "
                            "(or the official extract_semantic_codes.py)")
        else:
            bad = _check_codes(codes, lo, hi)
            if bad:
                problems.append(f"{where}: {bad}")
                codes = None
        if mtype == "audio-text":
            continue  # assistant history: codes only, no continuous features, no file needed
        raw = msg["content"]
        if not isinstance(raw, str) or not raw:
            problems.append(f"{where}: audio content must be a file path")
            continue
        path = resolve_audio_path(raw, jsonl_dir, cwd)
        if path is None:
            problems.append(f"{where}: audio file {raw!r} not found (looked at it as given, in {jsonl_dir} and "
                            "in the current folder); fix the path or run from the folder it is relative to")
            continue
        n = audio_info.samples(path)
        if isinstance(n, str):
            problems.append(f"{where}: cannot decode audio {raw!r} ({n}); use wav, flac or ogg")
            continue
        audio.append(path)
        if codes is not None:
            expected = rows_for_samples(n)
            if len(codes) != expected:
                problems.append(
                    f"{where}: {len(codes)} audio_tokens but {raw!r} lasts {n / 16000:.2f} s = {expected} codes "
                    f"at 12.5 Hz; the tokens belong to another file, {PREPARE_HINT}"
                )
    return problems, audio


def truncate(seq: TokenizedConversation, length: int) -> TokenizedConversation:
    """The first `length` positions; audio spans cut at the end (their features follow)."""
    from kimi_lora_cli.data.conversation import MediaSpan

    out = TokenizedConversation(
        audio_ids=seq.audio_ids[:length], text_ids=seq.text_ids[:length],
        is_continuous=seq.is_continuous[:length], audio_loss=seq.audio_loss[:length],
        text_loss=seq.text_loss[:length],
    )
    for m in seq.media:
        if m.start < length:
            out.media.append(MediaSpan(m.start, min(m.length, length - m.start), m.audio, m.message_index,
                                       m.continuous))
    return out


def has_loss(seq: TokenizedConversation) -> bool:
    """True when some position predicts a trained token (labels are shifted by one)."""
    return any(seq.text_loss[1:]) or any(seq.audio_loss[1:])


def _records(path: Path):
    """(line, location, object, error) per record: one JSON object per line, or (as some guides write
    it) one JSON array of objects, whose entries are then located as `FILE: entry N`."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e}); pass a UTF-8 jsonl file") from None
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError:
            items = None
        if isinstance(items, list):
            for i, obj in enumerate(items, 1):
                yield i, f"{path}: entry {i}", obj, None
            return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield lineno, f"{path}:{lineno}", json.loads(line), None
        except json.JSONDecodeError as e:
            yield lineno, f"{path}:{lineno}", None, f"invalid JSON ({e.msg} at column {e.colno}); each line must be one JSON object"


def load_samples(
    path: str | Path,
    tokenizer: Any,
    config: Any,
    *,
    max_length: int | None = None,
    too_long: str = "error",
    cwd: str | Path | None = None,
) -> LoadedData:
    """Read and check the whole jsonl; raise one DataError listing every problem (file:line)."""
    if too_long not in TOO_LONG_POLICIES:
        raise DataError(f"too-long policy {too_long!r} is unknown; use error, skip or truncate")
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: data file not found; pass the jsonl written by `kimi-lora prepare` as --data-path")
    jsonl_dir = path.parent.resolve()
    cwd = Path(cwd) if cwd is not None else Path.cwd()
    audio_info = _AudioInfoCache()
    problems: list[str] = []
    samples: list[Sample] = []
    skipped = truncated = lines = 0
    for lineno, where, obj, error in _records(path):
        lines += 1
        if error is not None:
            problems.append(f"{where}: {error}")
            if lines == NOT_JSONL_AFTER and len(problems) == lines and all("invalid JSON" in p for p in problems):
                raise DataError(f"{path}: not a jsonl file (its first {lines} lines are not JSON objects); "
                                "pass the jsonl with one conversation per line")
            continue
        line_problems, audio = _check_line(obj, jsonl_dir, config, audio_info, cwd)
        if line_problems:
            problems.extend(f"{where}: {p}" for p in line_problems)
            continue
        task = obj.get("task_type", "understanding")
        output_type = output_type_for_task(task)
        try:
            seq = tokenize_conversation(obj["conversation"], tokenizer, config, output_type=output_type)
        except ConversationError as e:
            problems.append(f"{where}: {e}")
            continue
        if not has_loss(seq):
            problems.append(f"{where}: nothing to learn (no assistant message); add the assistant's "
                            "answer or drop the line")
            continue
        cut = False
        if max_length is not None and len(seq) > max_length:
            if too_long == "error":
                problems.append(
                    f"{where}: {len(seq)} tokens, longer than --model-max-length {max_length}; raise "
                    "it, or pass --too-long skip (drop such lines) or --too-long truncate"
                )
                continue
            if too_long == "skip":
                skipped += 1
                continue
            seq = truncate(seq, max_length)
            if not has_loss(seq):
                skipped += 1
                continue
            truncated += 1
            cut = True
        samples.append(Sample(line=lineno, source=path, task_type=task, output_type=output_type, seq=seq,
                              audio=audio[: len(seq.media)], truncated=cut))
    if problems:
        shown = problems[:MAX_LISTED_PROBLEMS]
        more = len(problems) - len(shown)
        head = (f"{path}: {len(problems)} problem{'s' if len(problems) > 1 else ''} in the training data "
                "(fix them and rerun):")
        raise DataError("\n".join([head, *("  " + p for p in shown)] + ([f"  ... and {more} more"] if more else [])))
    if not samples:
        reason = f" ({skipped} longer than --model-max-length {max_length} were skipped)" if skipped else ""
        raise DataError(f"{path}: no usable samples{reason}; the file needs at least one conversation")
    return LoadedData(samples=samples, path=path, lines=lines, skipped_too_long=skipped, truncated=truncated)
