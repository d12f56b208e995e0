"""Folder sources: Kaldi / ESPnet data folders (wav.scp, text, optional segments), folders of audio
with a same-name .txt/.lab transcript beside each clip, and the LibriSpeech tree (*.trans.txt)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from kimi_lora_cli.data.audio import AudioError
from kimi_lora_cli.data.sources.base import (
    AUDIO_SUFFIXES,
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


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    try:
        with open(path, encoding="utf-8-sig") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    yield n, line.rstrip("\r\n")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; save it as UTF-8") from None


def _split_key(line: str) -> tuple[str, str]:
    key, _, rest = line.strip().partition(" ")
    if not rest:
        key, _, rest = line.strip().partition("\t")
    return key, rest.strip()


# -------------------------------------------------------------------------------------------
# Kaldi / ESPnet
# -------------------------------------------------------------------------------------------


def _read_wav_scp(path: Path) -> dict[str, tuple[int, str]]:
    """utterance (or recording) id -> (line, path). A line that is a command is refused, all at once."""
    out: dict[str, tuple[int, str]] = {}
    pipes: list[int] = []
    for n, line in _text_lines(path):
        key, value = _split_key(line)
        if value.endswith("|") or value.startswith("|") or value == "-":
            pipes.append(n)
            continue
        out[key] = (n, value)
    if pipes:
        shown = ", ".join(str(n) for n in pipes[:5]) + (", ..." if len(pipes) > 5 else "")
        what = f"{len(pipes)} lines ({shown}) are shell pipelines" if len(pipes) > 1 else "is a shell pipeline"
        raise DataError(f"{path}:{pipes[0]}: {what} (`sox ... |`); kimi-lora never runs a command from a data file: write "
                        "the audio to files first (e.g. with Kaldi's wav-copy) and list their paths in wav.scp")
    return out


def kaldi_source(folder: Path, opts: SourceOptions, clips: ClipStore) -> Source:
    folder = folder.resolve()
    scp, text = folder / "wav.scp", folder / "text"
    for need in (scp, text):
        if not need.is_file():
            raise DataError(f"{folder}: a Kaldi data folder needs {need.name} ({'<utt> <audio path>' if need == scp else '<utt> <transcript>'}"
                            f" per line) and has none; present: {', '.join(sorted(p.name for p in folder.iterdir()))}")
    seg_path = folder / "segments"

    def rows() -> Iterator[Record]:
        wavs = _read_wav_scp(scp)
        segments: dict[str, tuple[str, float, float | None]] = {}
        if seg_path.is_file():
            for n, line in _text_lines(seg_path):
                parts = line.split()
                try:
                    end = float(parts[3])
                    segments[parts[0]] = (parts[1], float(parts[2]), None if end < 0 else end)
                except (IndexError, ValueError):
                    raise DataError(f"{seg_path}:{n}: expected `<utt> <recording> <start> <end>` (seconds), got "
                                    f"{line.strip()!r}") from None
        for n, line in _text_lines(text):
            utt, words = _split_key(line)
            where = f"{text}:{n}"
            transcript = clean_transcript(words)
            if transcript is None:
                yield Record(n, where, None, f"utterance {utt}: {EMPTY_TRANSCRIPT}", line)
                continue
            try:
                if utt in segments:
                    rec, start, end = segments[utt]
                    if rec not in wavs:
                        yield Record(n, where, None, f"utterance {utt}: recording {rec} (segments) is not in "
                                     f"{scp}; add `{rec} <audio path>` there", line)
                        continue
                    audio = find_audio(wavs[rec][1], folder)
                    audio = clips.segment(Path(audio), start, end)
                elif utt in wavs:
                    audio = find_audio(wavs[utt][1], folder)
                else:
                    yield Record(n, where, None, f"utterance {utt} is not in {scp}"
                                 f"{' nor in segments' if segments else ''}; add `{utt} <audio path>` there", line)
                    continue
            except (AudioError, OSError, RuntimeError) as e:
                yield Record(n, where, None, f"utterance {utt}: {one_line(e)}", line)
                continue
            yield Record(n, where, transcript_record(audio, transcript, opts), None, line)

    return Source("kaldi", str(folder), folder, rows)


# -------------------------------------------------------------------------------------------
# Folders of audio, LibriSpeech
# -------------------------------------------------------------------------------------------


def walk_sorted(folder: Path) -> Iterator[tuple[Path, list[str]]]:
    """(folder, sorted file names) depth first in name order, one folder at a time (never the whole tree)."""
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        yield Path(root), sorted(files)


def walk_files(folder: Path) -> Iterator[tuple[Path, set[str], str]]:
    """(folder, the names in that folder, one file name) for every file, in `walk_sorted` order."""
    for root, files in walk_sorted(folder):
        names = set(files)
        for name in files:
            yield root, names, name


def folder_source(folder: Path, opts: SourceOptions) -> Source:
    folder = folder.resolve()

    def rows() -> Iterator[Record]:
        n = 0
        for root, names, name in walk_files(folder):
            stem, suffix = os.path.splitext(name)
            if suffix.lower() not in AUDIO_SUFFIXES:
                continue
            n += 1
            audio = root / name
            transcript = next((root / f"{stem}{s}" for s in (".txt", ".lab") if f"{stem}{s}" in names), None)
            if transcript is None:
                yield Record(n, str(audio), None, f"no transcript beside it; write the words spoken in {stem}.txt "
                             "(or .lab) next to the clip", str(audio))
                continue
            try:
                text = clean_transcript(transcript.read_text(encoding="utf-8-sig"))
            except UnicodeDecodeError:
                yield Record(n, str(transcript), None, "not UTF-8 text; save it as UTF-8", str(audio))
                continue
            if text is None:
                yield Record(n, str(transcript), None, EMPTY_TRANSCRIPT, str(audio))
                continue
            yield Record(n, str(audio), transcript_record(str(audio), " ".join(text.split()), opts), None,
                         str(audio))

    return Source("folder", str(folder), folder, rows)


def librispeech_source(folder: Path, opts: SourceOptions) -> Source:
    folder = folder.resolve()

    def rows() -> Iterator[Record]:
        n = 0
        for root, names, name in walk_files(folder):
            if not name.endswith(".trans.txt"):
                continue
            trans = root / name
            for line_no, line in _text_lines(trans):
                n += 1
                utt, words = _split_key(line)
                where = f"{trans}:{line_no}"
                audio = next((f"{utt}{s}" for s in AUDIO_SUFFIXES if f"{utt}{s}" in names), None)
                if audio is None:
                    yield Record(n, where, None, f"no audio file {utt}.flac (or .wav ...) beside {name}", line)
                    continue
                text = clean_transcript(words)
                if text is None:
                    yield Record(n, where, None, f"utterance {utt}: {EMPTY_TRANSCRIPT}", line)
                    continue
                yield Record(n, where, transcript_record(str(root / audio), text, opts), None, line)

    return Source("librispeech", str(folder), folder, rows)


def audio_census(folder: Path, limit: int = 10000) -> tuple[bool, bool]:
    """(holds audio files, some of them with a same-name .txt/.lab transcript), looking at no more than
    `limit` folders."""
    audio = False
    for i, (_, files) in enumerate(walk_sorted(folder)):
        names = set(files)
        for f in files:
            stem, suffix = os.path.splitext(f)
            if suffix.lower() in AUDIO_SUFFIXES:
                audio = True
                if f"{stem}.txt" in names or f"{stem}.lab" in names:
                    return True, True
        if i >= limit:
            break
    return audio, False


def has_trans_txt(folder: Path, limit: int = 10000) -> bool:
    for i, (_, files) in enumerate(walk_sorted(folder)):
        if any(f.endswith(".trans.txt") for f in files):
            return True
        if i >= limit:
            return False
    return False


__all__ = ["find_audio", "folder_source", "kaldi_source", "librispeech_source"]
