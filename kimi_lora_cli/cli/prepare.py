"""`kimi-lora prepare`: raw audio paths + transcripts -> training-ready jsonl (codes, checks, features)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from kimi_lora_cli.cli._options import DeviceOpt, JsonOpt


def prepare(
    model: Annotated[Path, typer.Option("--model", "-m", help="Kimi-Audio model folder (its config gives the "
                                        "code offset; its whisper-large-v3/ makes --cache-features).",
                                        show_default=False)],
    data: Annotated[Path, typer.Option("--data", "-d", help="Input jsonl (official fine-tuning format).",
                                       show_default=False)],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output jsonl with audio_tokens on every audio "
                                         "message.", show_default=False)],
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
) -> None:
    """Check a fine-tuning jsonl and add audio_tokens (GLM-4-Voice codes) to its audio messages.

    Every line is checked first; all problems are listed as FILE:LINE before any model loads.
    The output is written as it goes: rerun the same command after an interruption to continue.

    [bold]Examples[/]

      $ kimi-lora prepare -m ./Kimi-Audio-7B-Instruct --speech-tokenizer ./glm-4-voice-tokenizer -d train.jsonl -o train.prepared.jsonl

      $ kimi-lora prepare -m ./Kimi-Audio-7B-Instruct -d train.prepared.jsonl -o checked.jsonl   [dim]# checks only[/]

      $ kimi-lora prepare -m ./Kimi-Audio-7B-Instruct --speech-tokenizer ./glm-4-voice-tokenizer -d raw.jsonl -o out.jsonl --skip-bad --cache-features ./features
    """
    from kimi_lora_cli.cli._output import err, fail, is_tty, out
    from kimi_lora_cli.data.prepare import DataProblems, PrepareSpec, result_json
    from kimi_lora_cli.data.prepare import prepare as run_prepare

    spec = PrepareSpec(model=model, data=data, output=output, speech_tokenizer=speech_tokenizer,
                       recompute=recompute, cache_features=cache_features, skip_bad=skip_bad, rejects=rejects,
                       batch_size=batch_size, device=device or None, overwrite=overwrite)
    display = _Progress(err, live=is_tty())
    try:
        with display:
            result = run_prepare(spec, progress=display.update, log=lambda m: err.print(m, markup=False))
    except DataProblems as e:
        for finding in e.findings:
            err.print(finding.render(e.data), markup=False, highlight=False, soft_wrap=True)
        raise fail(str(e)) from None
    if as_json:
        typer.echo(json.dumps(result_json(result), indent=1))
        return
    for note in result.notes:
        err.print(f"[dim]{note}[/]")
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
