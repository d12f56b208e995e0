"""Shared Annotated option types."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kimi_lora_cli.devices import DEVICE_HELP

ModelArg = Annotated[Path, typer.Argument(help="Model folder: the Kimi-Audio release folder, a merged folder, "
                                          "or a Hugging Face causal LM folder.", show_default=False)]
TargetOpt = Annotated[str, typer.Option("--target", "-t", help="LoRA targets: all, component names "
                                        "(backbone,text,mimo,adaptor,heads), module names, globs, "
                                        "re:REGEX, TERM:a-b layer ranges.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON to stdout.")]
AllowPickleOpt = Annotated[bool, typer.Option("--allow-pickle", help="Allow unpickling .bin/.pt weight "
                                              "files (they can run code: only for files you trust).")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto (the checkpoint's), float32, bfloat16, float16.")]
DeviceOpt = Annotated[str, typer.Option("--device", help=DEVICE_HELP)]

# How a data path is read (prepare, infer; train declares the same settings in TrainConfig).
_DATA = "Data format"
FormatOpt = Annotated[str, typer.Option(
    "--format", help="Data format: auto (from the path and its first lines), jsonl (official), nemo, csv, tsv, "
    "kaldi, folder, librispeech, hf, chat.", rich_help_panel=_DATA)]
ColumnsOpt = Annotated[str | None, typer.Option(
    "--columns", help="Columns of a CSV/TSV, NeMo manifest or HF dataset: audio=COL,text=COL.",
    rich_help_panel=_DATA, show_default=False)]
TaskOpt = Annotated[str, typer.Option(
    "--task", help="What transcript-only data trains: asr (instruction + audio -> transcript) or tts "
    "(transcript -> audio, trained with the audio loss).", rich_help_panel=_DATA)]
LanguageOpt = Annotated[str, typer.Option(
    "--language", help="en or zh: the official English or Chinese ASR instruction.", rich_help_panel=_DATA)]
InstructionOpt = Annotated[str | None, typer.Option(
    "--instruction", help="Your own ASR instruction instead of the official one.", rich_help_panel=_DATA,
    show_default=False)]
MaxAudioSecondsOpt = Annotated[float | None, typer.Option(
    "--max-audio-seconds", help="Clips longer than this are bad rows (refused, or left out with --skip-bad); "
    "clips over 30 s are otherwise read as the official 30 s pieces.", rich_help_panel=_DATA, show_default=False)]


def clip_dir(cache: Path | str | None) -> Path | None:
    """Where clips cut from recordings (or decoded from datasets) go: CACHE/clips beside the features
    when a cache folder is given, else the user's cache (data.sources.clips.default_clip_dir)."""
    return Path(cache).expanduser() / "clips" if cache else None
