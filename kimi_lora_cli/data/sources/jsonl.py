"""JSON-lines sources: the official fine-tuning jsonl (as it is) and NeMo manifests (one clip per line,
`offset`/`duration` cutting it from a longer recording)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

from kimi_lora_cli.data.audio import AudioError
from kimi_lora_cli.data.schema import decode_line, parse_line
from kimi_lora_cli.data.sources.base import (
    EMPTY_TRANSCRIPT,
    Record,
    Source,
    SourceOptions,
    clean_transcript,
    find_audio,
    one_line,
    transcript_record,
)
from kimi_lora_cli.data.sources.clips import ClipStore
from kimi_lora_cli.errors import DataError

NEMO_EXAMPLE = '{"audio_filepath": "clips/a.wav", "text": "hello world", "duration": 1.5}'


def read_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, raw bytes) of every line, split at \\n only (as jsonl is defined; U+2028 and form
    feeds inside a line are text) - the one line reader of train, prepare and infer."""
    try:
        with open(path, "rb") as f:
            yield from enumerate(f, start=1)
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder; pass the jsonl file") from None


def _starts_with_array(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096)
    return head.decode("utf-8", "replace").lstrip("\ufeff \t\r\n").startswith("[")


def read_json_array(path: Path) -> list | None:
    """The file as one JSON array, or None when it is not one."""
    try:
        items = json.loads(path.read_bytes().decode("utf-8").removeprefix("\ufeff"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return items if isinstance(items, list) else None


def json_objects(path: Path) -> Iterator[Record]:
    """Records holding each JSON object of a jsonl file (or of one JSON array) as `obj`, unconverted."""
    if _starts_with_array(path):
        items = read_json_array(path)
        if items is not None:
            for i, obj in enumerate(items, 1):
                yield Record(i, f"{path}: entry {i}", obj, None, json.dumps(obj, ensure_ascii=False))
            return
    for lineno, raw in read_lines(path):
        text, problem = decode_line(raw)
        where = f"{path}:{lineno}"
        if problem is not None:
            yield Record(lineno, where, None, problem, raw.decode("utf-8", "replace").rstrip("\n"))
        elif text.strip():
            obj, problem = parse_line(text)
            yield Record(lineno, where, obj, problem, text.rstrip("\n"))


def official_records(path: Path) -> Iterator[Record]:
    yield from json_objects(path)


def official_source(path: Path, opts: SourceOptions) -> Source:
    return Source("jsonl", str(path), path.parent.resolve(), lambda: official_records(path))


# -------------------------------------------------------------------------------------------
# NeMo manifests
# -------------------------------------------------------------------------------------------


def _number(value, key: str) -> tuple[float | None, str | None]:
    if value is None:
        return None, None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        return None, f"'{key}' must be a non-negative number of seconds (got {value!r})"
    return float(value), None


@lru_cache(maxsize=4096)  # bounded: a manifest of 100,000 files is never remembered whole
def _file_seconds(path: str) -> float:
    import soundfile as sf

    return sf.info(path).duration


def nemo_source(path: Path, opts: SourceOptions, clips: ClipStore) -> Source:
    cols = opts.column_map()
    audio_key, text_key = cols.get("audio", "audio_filepath"), cols.get("text", "text")
    folder = path.parent.resolve()

    def rows() -> Iterator[Record]:
        for rec in json_objects(path):
            if rec.error is not None:
                yield rec
                continue
            obj = rec.obj
            if not isinstance(obj, dict):
                yield Record(rec.number, rec.where, None, f"expected a JSON object like {NEMO_EXAMPLE}", rec.text)
                continue
            missing = [k for k in (audio_key, text_key) if k not in obj]
            if missing:
                yield Record(rec.number, rec.where, None,
                             f"missing key {', '.join(repr(k) for k in missing)} (keys: {', '.join(sorted(obj))}); "
                             f"a NeMo manifest line looks like {NEMO_EXAMPLE}", rec.text)
                continue
            text = clean_transcript(obj[text_key])
            if text is None:
                yield Record(rec.number, rec.where, None, EMPTY_TRANSCRIPT, rec.text)
                continue
            offset, p1 = _number(obj.get("offset"), "offset")
            duration, p2 = _number(obj.get("duration"), "duration")
            if p1 or p2:
                yield Record(rec.number, rec.where, None, p1 or p2, rec.text)
                continue
            audio = find_audio(str(obj[audio_key]), folder)
            try:
                if offset or (duration is not None and Path(audio).is_file()
                              and duration < _file_seconds(audio) - 0.01):
                    end = (offset or 0.0) + duration if duration is not None else None
                    audio = clips.segment(Path(audio), offset or 0.0, end)
            except (AudioError, OSError, RuntimeError) as e:
                yield Record(rec.number, rec.where, None, f"audio {obj[audio_key]!r}: {one_line(e)}", rec.text)
                continue
            yield Record(rec.number, rec.where, transcript_record(audio, text, opts), None, rec.text)

    return Source("nemo", str(path), folder, rows)
