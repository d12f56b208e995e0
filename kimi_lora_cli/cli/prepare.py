"""`kimi-lora prepare`: any data format -> training-ready official jsonl (codes, checks, features, summary)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from kimi_lora_cli.cli._options import (
    ColumnsOpt,
    DeviceOpt,
    FormatOpt,
    InstructionOpt,
    JsonOpt,
    LanguageOpt,
    MaxAudioSecondsOpt,
    TaskOpt,
)


def prepare(
    model: Annotated[Path, typer.Option("--model", "-m", help="Kimi-Audio model folder (its config gives the "
                                        "code offset; its whisper-large-v3/ makes --cache-features).",
                                        show_default=False)],
    data: Annotated[str, typer.Option("--data", "-d", help="Input: official jsonl, NeMo manifest, CSV/TSV, Kaldi "
                                      "folder, audio folder, LibriSpeech tree, HF dataset (folder, parquet/arrow, "
                                      "Hub ID) or chat JSON; see --format.", show_default=False)],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Output jsonl with audio_tokens on every "
                                                "audio message (not needed with --dry-run).",
                                                show_default=False)] = None,
    speech_tokenizer: Annotated[Path | None, typer.Option(
        "--speech-tokenizer", help="Local glm-4-voice-tokenizer folder (config.json + model.safetensors); "
        "needed only when some audio message lacks audio_tokens.", show_default=False)] = None,
    recompute: Annotated[bool, typer.Option("--recompute", help="Recompute audio_tokens that are already "
                                            "there.")] = False,
    cache_features: Annotated[Path | None, typer.Option(
        "--cache-features", help="Folder for Whisper features, DIR/<sha256 of the audio file>.safetensors "
        "(tensor 'features'); `kimi-lora train --cache-features DIR` reuses them.", show_default=False)] = None,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Skip bad lines (recorded in the rejects file) "
                                           "instead of stopping.")] = False,
    rejects: Annotated[Path | None, typer.Option("--rejects", help="Rejects file for --skip-bad "
                                                 "\\[default: OUTPUT with .rejects before the suffix]",
                                                 show_default=False)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Audio files (and 30 s pieces) per "
                                            "forward pass.")] = 8,
    device: DeviceOpt = "",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Rebuild OUTPUT when it already exists.")] = False,
    as_json: JsonOpt = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check every line and print the summary; write "
                                          "nothing, tokenize nothing.")] = False,
    model_max_length: Annotated[int | None, typer.Option(
        "--model-max-length", help="Longest sequence in tokens, for the summary \\[default: the model's "
        "max_position_embeddings].", show_default=False)] = None,
    data_format: FormatOpt = "auto",
    columns: ColumnsOpt = None,
    task: TaskOpt = "asr",
    language: LanguageOpt = "en",
    instruction: InstructionOpt = None,
    max_audio_seconds: MaxAudioSecondsOpt = None,
) -> None:
    """Read a data set in any supported format, check it, and write the official jsonl with audio_tokens
    (GLM-4-Voice codes) on its audio messages; print a summary of every input.

    Every line is checked first; all problems are listed as FILE:LINE before any model loads.
    The output is written as it goes: rerun the same command after an interruption to continue.
    Transcript-only data (NeMo, CSV/TSV, Kaldi, folders, HF) becomes ASR conversations (--task asr,
    the official instruction) or TTS ones (--task tts).

    [bold]Examples[/]

      $ kimi-lora prepare -m ./Kimi-Audio-7B-Instruct --speech-tokenizer ./glm-4-voice-tokenizer -d train.jsonl -o train.prepared.jsonl

      $ kimi-lora prepare -m ./Kimi-Audio-7B-Instruct -d train.prepared.jsonl -o checked.jsonl   [dim]# checks only[/]

      $ kimi-lora prepare -m ./Kimi-Audio-7B-Instruct --speech-tokenizer ./glm-4-voice-tokenizer -d raw.jsonl -o out.jsonl --skip-bad --cache-features ./features

      $ kimi-lora prepare -m ./Kimi-Audio-7B-Instruct -d cv-corpus/en/train.tsv --dry-run   [dim]# summary only[/]

      $ kimi-lora prepare -m ./Kimi-Audio-7B-Instruct --speech-tokenizer ./glm-4-voice-tokenizer -d data/train -o train.jsonl --language zh   [dim]# a Kaldi folder[/]
    """
    from kimi_lora_cli.cli._output import err, fail, is_tty, out
    from kimi_lora_cli.data.prepare import DataProblems, PrepareSpec, result_json
    from kimi_lora_cli.data.prepare import prepare as run_prepare
    from kimi_lora_cli.data.sources import SourceOptions

    sources = SourceOptions(format=data_format, columns=columns, task=task, language=language,
                            instruction=instruction, max_audio_seconds=max_audio_seconds)
    spec = PrepareSpec(model=model, data=data, output=output, speech_tokenizer=speech_tokenizer,
                       recompute=recompute, cache_features=cache_features, skip_bad=skip_bad, rejects=rejects,
                       batch_size=batch_size, device=device or None, overwrite=overwrite, sources=sources,
                       dry_run=dry_run, model_max_length=model_max_length)
    display = _Progress(err, live=is_tty())
    try:
        with display:
            result = run_prepare(spec, progress=display.update, log=lambda m: err.print(m, markup=False))
    except DataProblems as e:
        for finding in e.findings:
            err.print(finding.render(e.data), markup=False, highlight=False, soft_wrap=True)
        raise fail(str(e)) from None
    if as_json:
        typer.echo(json.dumps(result_json(result), indent=1, ensure_ascii=False))
        return
    for note in result.notes:
        err.print(note, markup=False, highlight=False, style="dim")
    if result.summary is not None:
        out.print(summary_table(result.summary))
    if dry_run:
        out.print(f"Dry run: {result.lines_written} samples would be written, {result.lines_rejected} lines have "
                  "problems; nothing written.", markup=False)
        return
    parts = [f"{result.lines_written} lines"]
    if result.audio_tokenized:
        parts.append(f"{result.audio_tokenized} audio tokenized ({result.seconds_tokenized / 3600:.2f} h)")
    if result.audio_kept:
        parts.append(f"{result.audio_kept} kept")
    if result.features_written or result.features_reused:
        parts.append(f"features: {result.features_written} written, {result.features_reused} reused")
    if result.resumed_at_line:
        parts.append(f"resumed at line {result.resumed_at_line}")
    out.print(f"Wrote {result.output}: " + ", ".join(parts) + ".", markup=False)
    if result.lines_rejected:
        out.print(f"Skipped {result.lines_rejected} bad lines, listed in {result.rejects}.", markup=False)


def summary_table(s: dict):
    """The rich table of one input's summary (data/summary.py)."""
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=escape(f"{s['input']} ({s['format']})"), show_header=False, title_justify="left")
    t.add_column("what", style="bold")
    t.add_column("value")
    d = s["duration_s"]
    t.add_row("samples", str(s["samples"]))
    t.add_row("audio", f"{s['hours']:.3f} h in {s['clips']} clips")
    t.add_row("clip seconds", f"min {d['min']:.2f} / median {d['median']:.2f} / p95 {d['p95']:.2f} / max "
              f"{d['max']:.2f}")
    tok = s["tokens_per_sample"]
    if tok:
        t.add_row("tokens per sample", f"median {tok['median']} / max {tok['max']}")
    t.add_row(f"over --model-max-length {s['model_max_length']}", str(s["over_max_length"]))
    t.add_row("clips over 30 s", f"{s['clips_over_30s']}" + (" (read as the official 30 s pieces)"
                                                              if s["clips_over_30s"] else ""))
    skipped = f"{s['skipped']}"
    if s["skipped_reasons"]:
        skipped += ": " + "; ".join(f"{n} x {escape(reason)}" for reason, n in list(s["skipped_reasons"].items())[:5])
    t.add_row("skipped lines", skipped)
    if s["packed_fill"] is not None:
        t.add_row("packed rows", f"{s['packed_fill']:.1%} full (--packing at --model-max-length)")
    return t


class _Progress:
    """Rich bar on a terminal (files/s, audio hours/s); a plain line every 10 s otherwise."""

    def __init__(self, console, live: bool) -> None:
        self.console, self.live = console, live
        self.bar = None
        self.task = None
        self.start = time.monotonic()
        self.last_line = 0.0
        self.stage = ""

    def __enter__(self) -> _Progress:
        if self.live:
            from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                                TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=self.console,
                                transient=True)
            self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def update(self, p) -> None:
        if p.stage != self.stage:
            self.stage, self.start = p.stage, time.monotonic()
        elapsed = max(time.monotonic() - self.start, 1e-6)
        if p.stage == "check":
            rate = f"{p.lines_done / elapsed:.0f} lines/s"
            desc, done, total = f"checking line {p.lines_done}", p.lines_done, None
        else:
            rate = (f"{p.files_done / elapsed:.2f} files/s, {p.seconds_done / 3600 / elapsed:.4f} audio h/s "
                    f"({p.seconds_done / elapsed:.0f}x real time)")
            desc, done, total = "preparing", p.files_done, max(p.files_total, 1)
            if not p.files_total:
                done, total = p.lines_done, max(p.lines_total, 1)
        if self.bar is not None:
            if self.task is None:
                self.task = self.bar.add_task(desc, total=total, rate=rate)
            self.bar.update(self.task, description=desc, completed=done, total=total, rate=rate)
        elif p.stage != "check" and not (p.files_done or p.lines_done):
            self.last_line = time.monotonic()  # the start: a first line when there is progress to show
        elif p.stage != "check" and time.monotonic() - self.last_line >= 10:
            self.last_line = time.monotonic()
            self.console.print(f"prepare: {p.files_done}/{p.files_total} audio files, {p.lines_done}/"
                               f"{p.lines_total} lines, {rate}", markup=False, highlight=False)
