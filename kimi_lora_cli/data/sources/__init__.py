"""Every data format kimi-lora reads, turned into the official conversations (`open_source`).

A source is opened once (format detected from the path and its first lines, or forced with
--format; a wrong kind of file, a missing column or a missing package is one DataError here, before
any row is read) and then iterated as `Record`s: the row's official object, or one line saying what
is wrong with that row (which --skip-bad may drop). Each format family lives in its own module:
jsonl.py (official jsonl, NeMo), table.py (CSV/TSV), folders.py (Kaldi, audio folders,
LibriSpeech), hf.py (Hugging Face datasets), chat.py (LLaMA-Factory, ms-swift, OpenAI parts).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

from kimi_lora_cli.data.sources.base import (
    ASR_INSTRUCTIONS,
    FORMAT_HELP,
    FORMATS,
    LANGUAGES,
    TASKS,
    Record,
    Source,
    SourceOptions,
    suggest_columns,
)
from kimi_lora_cli.data.sources.clips import ClipStore, default_clip_dir
from kimi_lora_cli.errors import ConfigError, DataError

__all__ = ["ASR_INSTRUCTIONS", "FORMATS", "FORMAT_HELP", "LANGUAGES", "TASKS", "Record", "Source", "SourceOptions",
           "detect_format", "open_source"]

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?$")
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".txt", ".parquet", ".arrow", ".scp")
TABLE_COLUMNS = ("tsv", "csv")
JSONL_EXAMPLE = ('{"task_type": "understanding", "conversation": [{"role": "user", "message_type": "audio", '
                 '"content": "a.wav"}, {"role": "assistant", "message_type": "text", "content": "hello"}]}')


def _head_line(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(65536)
    text = head.decode("utf-8", "replace").lstrip("\ufeff")
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _json_kind(obj: object) -> str | None:
    if not isinstance(obj, dict):
        return None
    if "conversation" in obj:
        return "jsonl"
    if "audio_filepath" in obj:
        return "nemo"
    if any(k in obj for k in ("messages", "conversations", "instruction")):
        return "chat"
    return None


def _unknown_json(path: Path, obj: object) -> DataError:
    keys = ", ".join(sorted(obj)) if isinstance(obj, dict) else type(obj).__name__
    return DataError(f"{path}: looks like JSON with keys {keys}, none of a known format; expected the official "
                     f"`conversation` ({JSONL_EXAMPLE}), a NeMo manifest (`audio_filepath`, `text`) or chat "
                     f"`messages` + `audios`; for a transcript manifest pass --format nemo --columns "
                     f"{suggest_columns(list(obj) if isinstance(obj, dict) else [])}")


def detect_format(path_text: str) -> tuple[str, Path | None]:
    """(format, path) of a data argument from the path and its first lines; path None for a Hub ID.
    One DataError when the file is of a kind no reader takes, naming what it looks like."""
    path = Path(path_text).expanduser()
    if not path.exists():
        if HUB_ID.match(path_text) and not path_text.lower().endswith(DATA_SUFFIXES):
            return "hf", None
        raise DataError(f"{path}: no such file or folder; pass a data file (jsonl, csv, tsv, json, parquet), a data "
                        "folder (Kaldi, audio + .txt, LibriSpeech, save_to_disk) or a Hugging Face Hub ID")
    if path.is_dir():
        return _detect_folder(path), path
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".arrow"):
        return "hf", path
    if path.name == "wav.scp":
        return "kaldi", path.parent
    if suffix in (".csv", ".tsv"):
        return suffix[1:], path
    if path.stat().st_size == 0:
        return "jsonl", path  # the readers say it is empty
    line = _head_line(path)
    if line.startswith("["):
        from kimi_lora_cli.data.sources.jsonl import read_json_array

        items = read_json_array(path)
        if items:
            kind = _json_kind(items[0])
            if kind is None:
                raise _unknown_json(path, items[0])
            return kind, path
        return "jsonl", path
    if line.startswith("{"):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            return "jsonl", path  # a broken line of a jsonl: the readers name it
        kind = _json_kind(obj)
        if kind is None:
            raise _unknown_json(path, obj)
        return kind, path
    delimiter = "\t" if "\t" in line else "," if "," in line else None
    if delimiter is not None:
        kind = "TSV" if delimiter == "\t" else "CSV"
        names = [c.strip() for c in line.split(delimiter)]
        if suffix in (".json", ".jsonl"):
            raise DataError(f"{path}: looks like a {kind} with columns {', '.join(names)}, not jsonl; pass --format "
                            f"{kind.lower()} --columns {suggest_columns(names)} (a row reads like "
                            f"`clips/a.wav{delimiter}hello world`)")
        return kind.lower(), path
    return "jsonl", path


def _detect_folder(path: Path) -> str:
    from kimi_lora_cli.data.sources.folders import audio_census, has_trans_txt
    from kimi_lora_cli.data.sources.hf import data_files, is_saved_dataset

    if is_saved_dataset(path):
        return "hf"
    if (path / "wav.scp").is_file():
        return "kaldi"
    if has_trans_txt(path):
        return "librispeech"
    if data_files(path):
        return "hf"
    audio, transcripts = audio_census(path)
    if transcripts:
        return "folder"
    found = sorted(p.name for p in path.iterdir() if p.suffix.lower() in (".jsonl", ".json", ".csv", ".tsv"))[:3]
    hint = f"; it holds {', '.join(found)}: pass one of them as the data file" if found else ""
    what = "audio files without transcripts (NAME.txt or NAME.lab beside each clip)" if audio else "no known data layout"
    raise DataError(f"{path}: is a folder of {what}; a data folder is Kaldi (wav.scp + text), audio with .txt "
                    f"transcripts, LibriSpeech (*.trans.txt), a save_to_disk dataset or parquet/arrow files{hint}")


def _clip_store(opts: SourceOptions) -> ClipStore:
    return ClipStore(opts.clip_dir or default_clip_dir())


def open_source(data: str | Path, opts: SourceOptions | None = None) -> Source:
    """The data argument opened in its format (detected, or `opts.format`). Everything that can be
    known before reading rows is checked here: one DataError / ConfigError."""
    opts = opts or SourceOptions()
    opts.check()
    text = str(data)
    if opts.format == "auto":
        fmt, path = detect_format(text)
    else:
        fmt = opts.format
        path = Path(text).expanduser()
        if not path.exists():
            if fmt != "hf":
                raise DataError(f"{path}: no such file or folder")
            path = None
    if opts.columns and fmt not in ("csv", "tsv", "nemo", "hf"):
        raise ConfigError(f"--columns names the columns of CSV/TSV files, NeMo manifests and Hugging Face datasets; "
                          f"{text} is read as {fmt}")
    source = _open(fmt, text, path, opts)
    if opts.max_audio_seconds is not None:
        return _limit_seconds(source, opts.max_audio_seconds)
    return source


def _need_file(fmt: str, path: Path) -> None:
    if path.is_dir():
        raise DataError(f"{path}: is a folder; --format {fmt} reads one file")


def _need_folder(fmt: str, path: Path) -> Path:
    if not path.is_dir():
        raise DataError(f"{path}: is a file; --format {fmt} reads a folder")
    return path


def _open(fmt: str, text: str, path: Path | None, opts: SourceOptions) -> Source:
    if fmt == "jsonl":
        from kimi_lora_cli.data.sources.jsonl import official_source

        _need_file(fmt, path)
        return official_source(path, opts)
    if fmt == "nemo":
        from kimi_lora_cli.data.sources.jsonl import nemo_source

        _need_file(fmt, path)
        return nemo_source(path, opts, _clip_store(opts))
    if fmt in TABLE_COLUMNS:
        from kimi_lora_cli.data.sources.table import table_source

        _need_file(fmt, path)
        return table_source(path, opts, "\t" if fmt == "tsv" else ",")
    if fmt == "chat":
        from kimi_lora_cli.data.sources.chat import chat_source

        _need_file(fmt, path)
        return chat_source(path, opts, _clip_store(opts))
    if fmt == "kaldi":
        from kimi_lora_cli.data.sources.folders import kaldi_source

        return kaldi_source(path.parent if path.name == "wav.scp" else _need_folder(fmt, path), opts,
                            _clip_store(opts))
    if fmt == "folder":
        from kimi_lora_cli.data.sources.folders import folder_source

        return folder_source(_need_folder(fmt, path), opts)
    if fmt == "librispeech":
        from kimi_lora_cli.data.sources.folders import librispeech_source

        return librispeech_source(_need_folder(fmt, path), opts)
    from kimi_lora_cli.data.sources.hf import data_files, hf_source, is_saved_dataset

    if path is None:
        name, _, split = text.partition(":")
        return hf_source(name, "hub", opts, _clip_store(opts), split or None)
    if path.is_file():
        return hf_source(str(path), "files", opts, _clip_store(opts))
    kind = "disk" if is_saved_dataset(path) else "files" if data_files(path) else "layout"
    return hf_source(str(path), kind, opts, _clip_store(opts))


def _limit_seconds(source: Source, limit: float) -> Source:
    """Rows whose audio is longer than --max-audio-seconds become errors of that row (--skip-bad drops them)."""
    from kimi_lora_cli.data.schema import SAMPLE_RATE, AudioProbe, resolve_audio

    probe = AudioProbe()
    inner = source.rows

    def rows() -> Iterator[Record]:
        for rec in inner():
            if rec.obj is not None and isinstance(rec.obj.get("conversation"), list):
                for m in rec.obj["conversation"]:
                    if not isinstance(m, dict) or m.get("message_type") != "audio":
                        continue
                    path, _ = resolve_audio(str(m.get("content", "")), source.base_dir)
                    samples = probe(path)[0] if path is not None and path.is_file() else 0
                    if samples > limit * SAMPLE_RATE:
                        rec = Record(rec.number, rec.where, None,
                                     f"audio {Path(str(m['content'])).name} is {samples / SAMPLE_RATE:.1f} s, longer "
                                     f"than --max-audio-seconds {limit:g}; raise it, or pass --skip-bad to leave such "
                                     "rows out", rec.text)
                        break
            yield rec

    return Source(source.format, source.label, source.base_dir, rows, source.notes)
