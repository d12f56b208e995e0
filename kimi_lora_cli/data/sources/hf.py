"""Hugging Face datasets: a `save_to_disk` folder, parquet/arrow files, a folder `datasets` knows the
layout of, or a Hub ID (`owner/name`, `owner/name:split`). Rows are streamed, never held whole; an
Audio column is read undecoded (the file's bytes) and decoded by our one loader, an array column
(`array` + `sampling_rate`, any rate) is resampled like a file. No loading script ever runs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kimi_lora_cli.data.audio import AudioError
from kimi_lora_cli.data.sources.base import (
    DATASETS_EXTRA,
    EMPTY_TRANSCRIPT,
    Record,
    Source,
    SourceOptions,
    clean_transcript,
    find_audio,
    one_line,
    suggest_columns,
    transcript_record,
)
from kimi_lora_cli.data.sources.clips import ClipStore
from kimi_lora_cli.data.sources.table import AUDIO_COLUMNS, TEXT_COLUMNS
from kimi_lora_cli.errors import DataError

DATA_FILES = (".parquet", ".arrow")


def import_datasets(label: str):
    try:
        import datasets
    except ImportError:
        raise DataError(f"{label}: reading a Hugging Face dataset needs the `datasets` package: "
                        f"{DATASETS_EXTRA}") from None
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    return datasets


def is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (
        (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file())


def data_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix in DATA_FILES and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _pick_split(found, label: str, split: str | None):
    names = list(found)
    if split is None:
        split = "train" if "train" in names else names[0] if len(names) == 1 else None
    if split not in names:
        raise DataError(f"{label}: holds the splits {', '.join(names)}; name one: pass {label}/{names[0]} (a saved "
                        f"folder) or ID:{names[0]} (a Hub ID)")
    return found[split]


def _open(target: str, kind: str, split: str | None, datasets):
    if kind == "disk":
        found = datasets.load_from_disk(target)
        return _pick_split(found, target, split) if isinstance(found, datasets.DatasetDict) else found
    if kind == "files":
        path = Path(target)
        files = [path] if path.is_file() else data_files(path)
        builder = "parquet" if files[0].suffix == ".parquet" else "arrow"
        return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", streaming=True)
    folder = Path(target)
    if kind == "layout" and any(folder.glob("*.py")):
        scripts = ", ".join(p.name for p in folder.glob("*.py"))
        raise DataError(f"{folder}: holds a dataset loading script ({scripts}); kimi-lora never runs code from a "
                        "data folder: convert it once with `datasets` yourself and pass the save_to_disk folder")
    found = datasets.load_dataset(target, streaming=True)
    return _pick_split(found, target, split)


def _columns(ds) -> tuple[list[str], dict[str, Any]]:
    features = ds.features
    if features is None:  # some streamed builders know the columns only from the first row
        first = next(iter(ds))
        return list(first), {}
    return list(features), dict(features)


def hf_source(target: str, kind: str, opts: SourceOptions, clips: ClipStore, split: str | None = None) -> Source:
    """`kind`: disk (save_to_disk folder), files (parquet/arrow file or folder of them), layout (a folder
    `datasets` reads by its layout), hub (a Hub ID)."""
    datasets = import_datasets(target)
    label = target if split is None else f"{target}:{split}"
    try:
        ds = _open(target, kind, split, datasets)
        names, features = _columns(ds)
    except DataError:
        raise
    except Exception as e:  # datasets' own errors (no network, not found, bad files) in one line
        raise DataError(f"{label}: {type(e).__name__}: {one_line(e)}") from None
    wanted = opts.column_map()
    lower = [n.lower() for n in names]

    def pick(role: str, known: tuple[str, ...], prefer=None) -> str | None:
        if role in wanted:
            if wanted[role] not in names:
                raise DataError(f"{label}: --columns {role}={wanted[role]}: no such column (columns: "
                                f"{', '.join(names)})")
            return wanted[role]
        if prefer:
            return prefer
        return next((names[lower.index(k)] for k in known if k in lower), None)

    audio_feature = next((n for n, f in features.items() if isinstance(f, datasets.Audio)), None)
    audio_col = pick("audio", AUDIO_COLUMNS, audio_feature)
    text_col = pick("text", TEXT_COLUMNS)
    if audio_col is None or text_col is None:
        missing = " and ".join(r for r, c in (("audio", audio_col), ("text", text_col)) if c is None)
        raise DataError(f"{label}: no {missing} column among {', '.join(names)}; pass --columns "
                        f"{suggest_columns(names)}")
    if isinstance(features.get(audio_col), datasets.Audio):
        ds = ds.cast_column(audio_col, datasets.Audio(decode=False))
    base = Path(target).resolve() if kind != "hub" else Path.cwd()
    base_dir = base if base.is_dir() else base.parent

    def audio_of(value: Any, where: str) -> str:
        if isinstance(value, dict):
            if value.get("bytes"):
                return clips.encoded(bytes(value["bytes"]), where)
            if value.get("array") is not None:
                return clips.waveform(value["array"], value.get("sampling_rate"), where)
            value = value.get("path")
        if isinstance(value, str) and value.strip():
            return find_audio(value, base_dir)
        raise AudioError(f"{where}: column {audio_col!r} holds no audio (expected an Audio value, {{array, "
                         f"sampling_rate}} or a file path; got {type(value).__name__})")

    def rows() -> Iterator[Record]:
        try:
            for i, row in enumerate(ds):
                where = f"{label}[{i}]"
                text = clean_transcript(row.get(text_col))
                if text is None:
                    yield Record(i + 1, where, None, EMPTY_TRANSCRIPT, where)
                    continue
                try:
                    audio = audio_of(row.get(audio_col), where)
                except AudioError as e:
                    yield Record(i + 1, where, None, one_line(e).removeprefix(f"{where}: "), where)
                    continue
                yield Record(i + 1, where, transcript_record(audio, text, opts), None, where)
        except DataError:
            raise
        except Exception as e:  # a broken file or a dropped connection half way
            raise DataError(f"{label}: {type(e).__name__}: {one_line(e)}") from None

    return Source("hf", label, base_dir, rows)
