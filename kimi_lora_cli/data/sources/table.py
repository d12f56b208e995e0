"""CSV and TSV files with a header row: Common Voice (`path`, `sentence`, clips under `clips/`) and
generic manifests (`audio`/`path`/`file`/..., `text`/`transcript`/`sentence`), `--columns` for others."""

from __future__ import annotations

import csv
import sys
from collections.abc import Iterator
from pathlib import Path

from kimi_lora_cli.data.sources.base import (
    EMPTY_TRANSCRIPT,
    Record,
    Source,
    SourceOptions,
    clean_transcript,
    find_audio,
    suggest_columns,
    transcript_record,
)
from kimi_lora_cli.errors import DataError

AUDIO_COLUMNS = ("audio", "audio_filepath", "audio_path", "path", "file", "filename", "file_name", "wav", "wav_path")
TEXT_COLUMNS = ("text", "transcript", "transcription", "sentence", "normalized_text", "sentence_text")


def _reader(f, delimiter: str):
    # Common Voice writes TSV without quoting (a sentence may hold a lone "): quotes are text there.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    if delimiter == "\t":
        return csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
    return csv.reader(f, delimiter=delimiter)


def pick_columns(header: list[str], opts: SourceOptions, where: str, kind: str) -> tuple[int, int]:
    """(audio column index, text column index) from --columns or the known names; one DataError
    naming the columns present and the --columns to pass otherwise."""
    names = [h.strip() for h in header]
    lower = [n.lower() for n in names]
    wanted = opts.column_map()
    flag = "tsv" if kind == "TSV" else "csv"
    found: dict[str, int] = {}
    for role, known in (("audio", AUDIO_COLUMNS), ("text", TEXT_COLUMNS)):
        if role in wanted:
            if wanted[role] not in names:
                raise DataError(f"{where}: --columns {role}={wanted[role]}: no such column (columns: "
                                f"{', '.join(names)})")
            found[role] = names.index(wanted[role])
        else:
            idx = next((lower.index(k) for k in known if k in lower), None)
            if idx is not None:
                found[role] = idx
    if len(found) < 2:
        missing = [r for r in ("audio", "text") if r not in found]
        raise DataError(f"{where}: looks like a {kind} with columns {', '.join(names)} but none is the {' or '.join(missing)}"
                        f" column; pass --format {flag} --columns {suggest_columns(names)} (a row then reads like "
                        f"`clips/a.wav{',' if flag == 'csv' else chr(9)}hello world`)")
    return found["audio"], found["text"]


def table_source(path: Path, opts: SourceOptions, delimiter: str) -> Source:
    kind = "TSV" if delimiter == "\t" else "CSV"
    folder = path.parent.resolve()
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            header = next(_reader(f, delimiter), None)
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; save the {kind} as UTF-8") from None
    if not header:
        raise DataError(f"{path}: empty {kind}; the first row must name the columns (e.g. audio{delimiter}text)")
    a, t = pick_columns(header, opts, str(path), kind)
    clips_dir = folder / "clips"  # Common Voice keeps the audio in clips/ beside its TSV files

    def rows() -> Iterator[Record]:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = _reader(f, delimiter)
            next(reader, None)
            start = reader.line_num + 1
            try:
                for row in reader:
                    line, start = start, reader.line_num + 1
                    where = f"{path}:{line}"
                    text_row = delimiter.join(row)
                    if not any(c.strip() for c in row):
                        continue
                    if len(row) <= max(a, t):
                        yield Record(line, where, None, f"{len(row)} fields but the header names {len(header)}; "
                                     f"each row needs the audio and text columns", text_row)
                        continue
                    text = clean_transcript(row[t])
                    if text is None:
                        yield Record(line, where, None, EMPTY_TRANSCRIPT, text_row)
                        continue
                    if not row[a].strip():
                        yield Record(line, where, None, "empty audio path", text_row)
                        continue
                    audio = find_audio(row[a].strip(), folder, clips_dir)
                    yield Record(line, where, transcript_record(audio, text, opts), None, text_row)
            except UnicodeDecodeError:
                raise DataError(f"{path}: not UTF-8 after line {start - 1}; save the {kind} as UTF-8") from None
            except csv.Error as e:
                raise DataError(f"{path}:{reader.line_num}: {e}; check the quoting of that row") from None

    return Source(kind.lower(), str(path), folder, rows)
