"""What every data source hands on: numbered records in the official format, and the options that
shape the conversations a transcript-only source builds (task, instruction, columns)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kimi_lora_cli.errors import ConfigError

TASKS = ("asr", "tts")
LANGUAGES = ("en", "zh")
# The official instructions, word for word: the fine-tuning demo data (finetune_codes/demo_data/
# audio_understanding/data.jsonl) in English, infer.py's ASR example in Chinese.
ASR_INSTRUCTIONS = {"en": "Please transcribe the spoken content into written text.",
                    "zh": "请将音频内容转换为文字。"}
# task_type of each task: ASR answers in text; TTS answers in speech (text + audio streams, audio loss).
TASK_TYPES = {"asr": "understanding", "tts": "speech_conversation"}
FORMATS = ("jsonl", "nemo", "csv", "tsv", "kaldi", "folder", "librispeech", "hf", "chat")
FORMAT_HELP = ("auto (detected from the path and its first lines), jsonl (official), nemo, csv, tsv, kaldi, "
               "folder, librispeech, hf (Hugging Face datasets: a save_to_disk folder, parquet/arrow files or a "
               "Hub ID), chat (LLaMA-Factory / ms-swift / OpenAI-style messages).")
AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".aiff", ".aif", ".au")
COLUMN_ROLES = ("audio", "text")
DATASETS_EXTRA = "pip install 'kimi-lora[datasets]'"


@dataclass(frozen=True)
class SourceOptions:
    """How to read a data path: the format (or auto), column names, and the task a transcript-only
    source becomes. `clip_dir` holds clips cut from longer recordings or decoded from datasets."""

    format: str = "auto"
    columns: str | None = None
    task: str = "asr"
    language: str = "en"
    instruction: str | None = None
    max_audio_seconds: float | None = None
    clip_dir: Path | None = None

    def check(self) -> None:
        if self.format not in ("auto", *FORMATS):
            raise ConfigError(f"--format {self.format!r} is unknown; use {FORMAT_HELP}")
        if self.task not in TASKS:
            raise ConfigError(f"--task {self.task!r} is unknown; use asr (audio -> transcript) or tts "
                              "(transcript -> audio)")
        if self.language not in LANGUAGES:
            raise ConfigError(f"--language {self.language!r} is unknown; use en or zh (the official English or "
                              "Chinese ASR instruction), or --instruction TEXT for your own")
        if self.instruction is not None and not self.instruction.strip():
            raise ConfigError("--instruction is empty; give the text the user says before the audio")
        if self.max_audio_seconds is not None and not self.max_audio_seconds > 0:
            raise ConfigError(f"--max-audio-seconds must be positive (got {self.max_audio_seconds})")
        self.column_map()

    def column_map(self) -> dict[str, str]:
        """`audio=COL,text=COL` as {"audio": COL, "text": COL}; one ConfigError for a bad spelling."""
        if not self.columns:
            return {}
        out: dict[str, str] = {}
        for part in filter(None, (p.strip() for p in self.columns.split(","))):
            key, eq, value = part.partition("=")
            key, value = key.strip(), value.strip()
            if not eq or key not in COLUMN_ROLES or not value:
                raise ConfigError(f"--columns {self.columns!r}: expected audio=COLUMN,text=COLUMN (got {part!r})")
            out[key] = value
        return out

    @property
    def instruction_text(self) -> str:
        return self.instruction if self.instruction is not None else ASR_INSTRUCTIONS[self.language]

    def key(self) -> dict[str, Any]:
        """What changes the conversations (prepare's resume compares it)."""
        return {"format": self.format, "columns": self.columns, "task": self.task, "language": self.language,
                "instruction": self.instruction, "max_audio_seconds": self.max_audio_seconds}


@dataclass
class Record:
    """One conversation of a source: `obj` in the official format, or `error` (one line saying what is
    wrong with this row and how to fix it). `number` orders records (the line or row, from 1)."""

    number: int
    where: str
    obj: dict[str, Any] | None = None
    error: str | None = None
    text: str = ""  # the row as written, for prepare's rejects file


@dataclass
class Source:
    """A data path opened in one format: iterate it for records, as often as needed."""

    format: str
    label: str  # names the input in messages (a path, or a Hub ID)
    base_dir: Path  # relative audio paths in the records are found here (then in the current folder)
    rows: Any = field(repr=False)  # a function returning an iterator of Records
    notes: list[str] = field(default_factory=list)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.rows())


def transcript_record(audio: str, text: str, opts: SourceOptions) -> dict[str, Any]:
    """The official conversation of one (clip, transcript) pair for the task: ASR = user instruction,
    user audio, assistant transcript; TTS = user transcript, assistant audio (trained with the audio loss)."""
    if opts.task == "tts":
        conversation = [{"role": "user", "message_type": "text", "content": text},
                        {"role": "assistant", "message_type": "audio", "content": audio}]
    else:
        conversation = [{"role": "user", "message_type": "text", "content": opts.instruction_text},
                        {"role": "user", "message_type": "audio", "content": audio},
                        {"role": "assistant", "message_type": "text", "content": text}]
    return {"task_type": TASK_TYPES[opts.task], "conversation": conversation}


def clean_transcript(text: Any) -> str | None:
    """The transcript with surrounding white space removed, or None when there is none."""
    if text is None:
        return None
    text = str(text).strip()
    return text or None


EMPTY_TRANSCRIPT = "empty transcript; write the words spoken in the clip (or drop the row, or pass --skip-bad)"


def find_audio(name: str, *folders: Path) -> str:
    """`name` as an absolute path when it exists in one of `folders` (or is absolute), else as given
    (the record checks then say where they looked)."""
    p = Path(name).expanduser()
    if p.is_absolute():
        return str(p)
    for folder in folders:
        if (folder / p).exists():
            return str((folder / p).resolve())
    return name


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def suggest_columns(names: list[str]) -> str:
    """`audio=A,text=T` guessed from column names, for a hint."""
    audio = next((n for n in names if re.search(r"audio|path|file|wav", n, re.I)), "AUDIO_COLUMN")
    text = next((n for n in names if re.search(r"text|sentence|transcri|label|word", n, re.I)), "TEXT_COLUMN")
    return f"audio={audio},text={text}"
