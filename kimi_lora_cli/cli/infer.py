"""`kimi-lora infer`: generate with the base model and/or adapters, stream predictions, score WER/CER."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from kimi_lora_cli.cli._options import (
    AllowPickleOpt,
    ColumnsOpt,
    DeviceOpt,
    DtypeOpt,
    FormatOpt,
    InstructionOpt,
    JsonOpt,
    LanguageOpt,
    MaxAudioSecondsOpt,
    TaskOpt,
    clip_dir,
)

_GEN = "Generation"
_SAMPLING = "Sampling (official sampler; temperature 0 = greedy)"
_SPEECH = "Spoken answers (WAV files)"
MAX_TABLE_ROWS = 20
CELL_LINES = 3  # a prediction or reference cell shows at most about this many lines
ID_WIDTH = 10
MIN_CELL = 12


class _Progress:
    """Rich bar with samples/s and tokens/s on a terminal; plain lines on stderr otherwise."""

    def __init__(self, enabled: bool) -> None:
        from kimi_lora_cli.cli._output import err, is_tty

        self.console = err
        self.enabled = enabled
        self.tty = is_tty()
        self.bar = None
        self.task = None
        self.samples = 0
        self.tokens = 0
        self.total = 0
        self.t0 = time.perf_counter()

    def _rates(self) -> str:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        return f"{self.samples / dt:.2f} samples/s, {self.tokens / dt:.1f} tokens/s"

    def start(self, total_samples: int) -> None:
        self.total = total_samples
        self.t0 = time.perf_counter()
        if not self.enabled or total_samples == 0:
            return
        if self.tty:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("generating"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[rates]}"), TimeElapsedColumn(),
                                console=self.console, transient=True)
            self.bar.start()
            self.task = self.bar.add_task("infer", total=total_samples, rates="")

    def update(self, samples: int = 0, tokens: int = 0) -> None:
        self.samples += samples
        self.tokens += tokens
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, advance=samples, rates=self._rates())
        elif samples:
            self.console.print(f"infer: {self.samples}/{self.total} predictions, {self._rates()}")

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def infer(
    model: Annotated[Path, typer.Option("--model", "-m", help="Base model folder (the Kimi-Audio release "
                                        "folder), or a merged folder from `kimi-lora merge`.",
                                        show_default=False)],
    adapter: Annotated[list[str] | None, typer.Option(
        "--adapter", "-a", help="Adapter folder, as DIR or NAME=DIR; repeat to compare several (all are "
        "loaded once onto one base).", show_default=False)] = None,
    data: Annotated[str | None, typer.Option("--data", "-d", help="Data in any format `kimi-lora prepare` reads "
                                             "(official jsonl, NeMo, CSV/TSV, Kaldi, audio folder, LibriSpeech, "
                                             "HF dataset, chat JSON); the trailing assistant message is the "
                                             "reference.", show_default=False)] = None,
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="One text prompt (user message).",
                                               show_default=False)] = None,
    audio: Annotated[Path | None, typer.Option("--audio", help="With --prompt: an audio file appended as a "
                                               "user audio message (its codes from --audio-tokens or "
                                               "--speech-tokenizer).", show_default=False)] = None,
    audio_tokens: Annotated[Path | None, typer.Option(
        "--audio-tokens", help="With --audio: its semantic codes (ints separated by spaces/commas, or a "
        "JSON list; raw codes or codes + kimia_token_offset).", show_default=False)] = None,
    speech_tokenizer: Annotated[Path | None, typer.Option(
        "--speech-tokenizer", help="Local glm-4-voice-tokenizer folder: audio messages without audio_tokens "
        "(and --audio without --audio-tokens) are tokenized on the fly; loaded only when needed.",
        show_default=False)] = None,
    cache_features: Annotated[Path | None, typer.Option(
        "--cache-features", help="Keep speech codes and Whisper features on disk here (by audio content) and "
        "reuse them; the folder `kimi-lora prepare --cache-features` fills.", show_default=False)] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Predictions jsonl, one line per "
                                                "sample and adapter, written as they come (replaced "
                                                "unless --resume).",
                                                show_default=False)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Keep the lines already in --output and skip "
                                         "those (sample, adapter) pairs.")] = False,
    compare_base: Annotated[bool, typer.Option("--compare-base", help="Also run the base model (adapters "
                                               "disabled) on every sample.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Samples generated together "
                                            "(left padding; outputs equal batch size 1).",
                                            rich_help_panel=_GEN)] = 8,
    max_new_tokens: Annotated[int | None, typer.Option(
        "--max-new-tokens", help="Step budget per answer; a note says how many reached it. -1 = official "
        "(7500 - prompt length for text, 1500 - prompt length for both). \\[default: 512 for text answers, "
        "official for both]", rich_help_panel=_GEN, show_default=False)] = None,
    output_type: Annotated[str | None, typer.Option(
        "--output-type", help="text or both (text + audio codes). Default: from each line's task_type "
        "('understanding' -> text); text for --prompt.", rich_help_panel=_GEN, show_default=False)] = None,
    text_temperature: Annotated[float, typer.Option("--text-temperature", rich_help_panel=_SAMPLING)] = 0.0,
    text_top_k: Annotated[int, typer.Option("--text-top-k", help="0 = no top-k.",
                                            rich_help_panel=_SAMPLING)] = 5,
    text_repetition_penalty: Annotated[float, typer.Option("--text-repetition-penalty",
                                                           rich_help_panel=_SAMPLING)] = 1.0,
    text_repetition_window: Annotated[int, typer.Option("--text-repetition-window",
                                                        rich_help_panel=_SAMPLING)] = 16,
    audio_temperature: Annotated[float, typer.Option("--audio-temperature", rich_help_panel=_SAMPLING)] = 0.0,
    audio_top_k: Annotated[int, typer.Option("--audio-top-k", rich_help_panel=_SAMPLING)] = 5,
    audio_repetition_penalty: Annotated[float, typer.Option("--audio-repetition-penalty",
                                                            rich_help_panel=_SAMPLING)] = 1.0,
    audio_repetition_window: Annotated[int, typer.Option("--audio-repetition-window",
                                                         rich_help_panel=_SAMPLING)] = 64,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the per-sample generators (temperature > 0, "
                                      "and the detokenizer's initial noise).", rich_help_panel=_SAMPLING)] = 0,
    audio_dir: Annotated[Path | None, typer.Option(
        "--audio-dir", help="Write each spoken answer (output type both) as a 16-bit WAV here, named "
        "ID.ADAPTER.wav and listed in the jsonl (audio_path); a new or empty folder, or one infer made.",
        rich_help_panel=_SPEECH, show_default=False)] = None,
    detokenizer: Annotated[Path | None, typer.Option(
        "--detokenizer", help="Folder holding audio_detokenizer/ and vocoder/ (the Kimi-Audio release "
        "folder). Default: --model.", rich_help_panel=_SPEECH, show_default=False)] = None,
    ode_steps: Annotated[int, typer.Option("--ode-steps", help="Detokenizer flow-matching time points per "
                                           "chunk (official 30; fewer is faster, rougher).",
                                           rich_help_panel=_SPEECH)] = 30,
    no_kv_cache: Annotated[bool, typer.Option("--no-kv-cache", help="Recompute the whole sequence every "
                                              "step (slow; for checking).", rich_help_panel=_GEN)] = False,
    quantization: Annotated[str | None, typer.Option(
        "--quantization", help="nf4, fp4 or int8: load the linear layers of both decoder stacks quantized "
        "(bitsandbytes: pip install 'kimi-lora[qlora]'), e.g. to run a QLoRA adapter as it was trained; the rest "
        "stays in --dtype, the layers' compute dtype.", show_default=False)] = None,
    double_quant: Annotated[bool, typer.Option("--double-quant", help="With --quantization nf4/fp4: quantize the "
                                               "blocks' scales too.")] = False,
    device: DeviceOpt = "",
    dtype: DtypeOpt = "auto",
    as_json: JsonOpt = False,
    allow_pickle: AllowPickleOpt = False,
    data_format: FormatOpt = "auto",
    columns: ColumnsOpt = None,
    task: TaskOpt = "asr",
    language: LanguageOpt = "en",
    instruction: InstructionOpt = None,
    max_audio_seconds: MaxAudioSecondsOpt = None,
) -> None:
    """Generate answers with the base model and/or LoRA adapters; score them (WER/CER) when the data
    has references.

    Decoding follows the official Kimi-Audio loop (text and audio streams, audio delay, text eos).
    Audio messages need their semantic codes (audio_tokens): from the data, from `kimi-lora prepare`,
    or computed on the fly with --speech-tokenizer DIR. Spoken answers (--output-type both) become
    16-bit WAV files with --audio-dir DIR, made by the release's audio detokenizer and vocoder.

    [bold]Examples[/]

      $ kimi-lora infer --model ./Kimi-Audio-7B-Instruct --adapter out/asr --data test.jsonl -o preds.jsonl

      $ kimi-lora infer -m ./Kimi-Audio-7B-Instruct -a a=out/a -a b=out/b --compare-base -d test.jsonl

      $ kimi-lora infer -m ./merged --prompt 'Please transcribe the following audio:' --audio clip.wav --speech-tokenizer ./glm-4-voice-tokenizer

      $ kimi-lora infer -m ./merged -p 'Please transcribe the following audio:' --audio clip.wav --audio-tokens clip.codes

      $ kimi-lora infer -m ./Kimi-Audio-7B-Instruct -a out/tts -d tts_test.jsonl -o preds.jsonl --output-type both --audio-dir wavs/

      $ kimi-lora infer -m ./Kimi-Audio-7B-Instruct --quantization nf4 -a out/qlora -d test.jsonl -o preds.jsonl
    """
    from kimi_lora_cli.adapter_names import parse_named_adapters
    from kimi_lora_cli.data.sources import SourceOptions
    from kimi_lora_cli.errors import ConfigError
    from kimi_lora_cli.inference.runner import InferSpec, run_inference
    from kimi_lora_cli.inference.sampler import SamplingParams

    try:
        text_sampling = SamplingParams(text_temperature, text_top_k, text_repetition_penalty, text_repetition_window)
        audio_sampling = SamplingParams(audio_temperature, audio_top_k, audio_repetition_penalty,
                                        audio_repetition_window)
    except ValueError as e:
        raise ConfigError(f"sampling option: {e}") from None
    spec = InferSpec(
        model=model, adapters=parse_named_adapters(adapter or []), compare_base=compare_base, data=data,
        prompt=prompt, audio=audio, audio_tokens=audio_tokens, output=output, resume=resume,
        batch_size=batch_size, max_new_tokens=max_new_tokens, output_type=output_type,
        text_sampling=text_sampling, audio_sampling=audio_sampling, seed=seed, device=device or None,
        dtype=dtype, use_cache=not no_kv_cache, allow_pickle=allow_pickle, speech_tokenizer=speech_tokenizer,
        cache_features=cache_features, audio_dir=audio_dir, detokenizer=detokenizer, ode_steps=ode_steps,
        sources=SourceOptions(format=data_format, columns=columns, task=task, language=language,
                              instruction=instruction, max_audio_seconds=max_audio_seconds,
                              clip_dir=clip_dir(cache_features)),
        quantization=quantization, double_quant=double_quant,
    )
    progress = _Progress(enabled=True)
    try:
        report = run_inference(spec, progress=progress)
    finally:
        progress.stop()
    rates = {"samples_per_s": progress.samples / max(time.perf_counter() - progress.t0, 1e-9),
             "tokens_per_s": progress.tokens / max(time.perf_counter() - progress.t0, 1e-9)}
    if as_json:
        typer.echo(json.dumps(_json_payload(report, rates), indent=1, ensure_ascii=False))
    else:
        _print_report(report, rates)


def _json_payload(report: Any, rates: dict[str, float]) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "model": report.model,
        "output": report.output,
        "adapters": report.variants,
        "samples": len(report.samples),
        "skipped": report.skipped,
        "output_types": list(report.output_types),
        "audio_dir": report.audio_dir,
        "spoken_answers": report.spoken,
        "metrics": {
            name: {
                "predictions": s.samples, "scored": s.scored,
                "wer": s.counts.wer if s.scored else None, "cer": s.counts.cer if s.scored else None,
                "word_errors": s.counts.word_errors, "ref_words": s.counts.ref_words,
                "char_errors": s.counts.char_errors, "ref_chars": s.counts.ref_chars,
                "new_predictions": s.new_samples, "new_tokens": s.new_tokens,
                "tokens_per_s": round(s.tokens_per_s, 2),
            }
            for name, s in report.summaries.items()
        },
        **{k: round(v, 3) for k, v in rates.items()},
        "notes": report.notes,
    }
    if report.output is None:
        payload["predictions"] = report.records
    return payload


def _shown(text: str | None, limit: int | None = None) -> str:
    """Printable form of a prediction: control characters as \\xNN, cut to `limit` characters (with
    an ellipsis), rich markup escaped."""
    from rich.markup import escape

    text = "".join(ch if ch.isprintable() or ch == " " else f"\\x{ord(ch):02x}" for ch in (text or ""))
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "\u2026"
    return escape(text)


def cell_limit(width: int, text_columns: int) -> int:
    """Characters a table cell shows: CELL_LINES lines of its share of the terminal (the id column and
    the borders take the rest), so a runaway answer cannot fill the screen."""
    share = (width - ID_WIDTH - 3 * (text_columns + 1)) // max(text_columns, 1)
    return max(MIN_CELL, share) * CELL_LINES


def _durations(sample_id: str, variants: list[str], by_key: dict) -> str:
    """Seconds of each variant's WAV ("-" where there is none), e.g. "2.40" or "base 2.40 / a 1.92"."""
    from rich.markup import escape

    parts = []
    for v in variants:
        r = by_key.get((sample_id, v)) or {}
        secs = f"{r['audio_seconds']:.2f}" if r.get("audio_path") else "-"
        parts.append(secs if len(variants) == 1 else f"{escape(v)} {secs}")
    return " / ".join(parts)


def _print_report(report: Any, rates: dict[str, float]) -> None:
    from rich.markup import escape
    from rich.table import Table

    from kimi_lora_cli.cli._output import out

    by_key = {(r["id"], r["adapter"]): r for r in report.records}
    single = len(report.samples) == 1 and report.samples[0].source == "--prompt"
    if single:
        s = report.samples[0]
        for v in report.variants:
            r = by_key.get((s.id, v))
            if r is None:
                continue
            label = f"[bold]{escape(v)}[/]: " if len(report.variants) > 1 else ""
            out.print(f"{label}{_shown(r['prediction'])}")
            if "audio_tokens" in r:
                out.print(f"[dim]{escape(v)} audio codes ({len(r['audio_tokens'])}): "
                          f"{' '.join(map(str, r['audio_tokens'][:40]))}{' ...' if len(r['audio_tokens']) > 40 else ''}[/]")
            if r.get("audio_path"):
                out.print(f"{escape(v)} spoken answer: {escape(r['audio_path'])} ({r['audio_seconds']:.2f} s)")
    else:
        shown = report.samples[:MAX_TABLE_ROWS]
        table = Table(title="Predictions", title_justify="left", show_lines=True)
        table.add_column("id", overflow="fold")
        if any(s.reference is not None for s in shown):
            table.add_column("reference", overflow="fold")
        for v in report.variants:
            table.add_column(v, overflow="fold")
        with_ref = len(table.columns) > len(report.variants) + 1
        with_audio = report.audio_dir is not None
        if with_audio:
            table.add_column("audio (s)", justify="right")
        limit = cell_limit(out.width, len(report.variants) + (1 if with_ref else 0))
        cut = False
        for s in shown:
            texts = ([s.reference or ""] if with_ref else []) + [
                by_key[(s.id, v)]["prediction"] if (s.id, v) in by_key else None for v in report.variants]
            cut |= any(t is not None and len(_shown(t)) > limit for t in texts)
            row = [_shown(s.id)] + [_shown(t, limit) if t is not None else "[dim]-[/]" for t in texts]
            if with_audio:
                row.append(_durations(s.id, report.variants, by_key))
            table.add_row(*row)
        out.print(table)
        if cut:
            where = (f"the full text is in {escape(report.output)}" if report.output
                     else "pass --output FILE (or --json) for the full text")
            out.print(f"[dim]Long cells are cut to about {CELL_LINES} lines; {where}[/]")
        if len(report.samples) > len(shown):
            more = len(report.samples) - len(shown)
            where = f" (all in {escape(report.output)})" if report.output else ""
            out.print(f"[dim]... {more} more samples{where}[/]")

    if any(s.scored for s in report.summaries.values()):
        table = Table(title="Scores (normalised: lower-case, punctuation stripped, whitespace collapsed, "
                      "CJK per character)", title_justify="left")
        for col in ("adapter", "predictions", "scored", "WER", "CER", "word errors / words"):
            table.add_column(col, justify="left" if col == "adapter" else "right")
        for name, s in report.summaries.items():
            table.add_row(escape(name), str(s.samples), str(s.scored),
                          f"{100 * s.counts.wer:.2f}%" if s.scored else "-",
                          f"{100 * s.counts.cer:.2f}%" if s.scored else "-",
                          f"{s.counts.word_errors} / {s.counts.ref_words}")
        out.print(table)
    new = sum(s.new_samples for s in report.summaries.values())
    line = f"{new} new predictions ({rates['samples_per_s']:.2f} samples/s, {rates['tokens_per_s']:.1f} tokens/s)"
    if report.skipped:
        line += f", {report.skipped} already in {escape(report.output or '')} (skipped)"
    if report.output:
        line += f"; predictions in {escape(report.output)}"
    if report.audio_dir:
        line += (f"; {report.spoken} spoken answer{'s' if report.spoken != 1 else ''} in {escape(report.audio_dir)}"
                 if report.spoken else "; no spoken answer (see the note below)")
    out.print(line)
    for note in report.notes:
        out.print(f"[yellow]Note:[/] {escape(note)}")
