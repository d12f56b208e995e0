"""`prepare`: check a fine-tuning jsonl line by line, add semantic codes, cache Whisper features.

Input: the official format (reference document, section 2): one JSON object per line with a
`conversation` list of messages (`role`, `message_type`, `content`, optional `audio_tokens`).
Output: the same lines, each audio message carrying `audio_tokens` = GLM-4-Voice codes +
`kimia_token_offset`. Every line is checked first and all problems are reported with their line
numbers before any model is loaded; with `skip_bad` the bad lines go to a rejects file instead
(one JSON object per line: `line`, `problems`, `text`). A line never gets an empty token list.

Resuming: the output is written to `OUT.partial` with a state file `OUT.partial.json` (next input
line, byte sizes of the partial files, a hash of the input lines already done). Rerunning the
same command continues after the last committed batch as long as those input lines are
unchanged; lines after it may be edited (e.g. to fix a bad file). On success the partial file is
renamed to OUT and the state file removed.

Audio paths: absolute, else relative to the jsonl's folder, else to the working directory.
When OUT lives in another folder, paths found relative to the jsonl's folder are rewritten
relative to OUT's folder so the output reads the same files.

Other formats (NeMo, CSV/TSV, Kaldi, audio folders, LibriSpeech, HF datasets, chat JSON; see
`data/sources/`) are read as the official records they become, numbered by their line or row, and
streamed twice (check, then write) like a jsonl. Clips that are not files of their own (segments,
dataset rows) are written once into `OUT_STEM.clips/` beside the output. Every input gets a
summary (`data/summary.py`); `dry_run` stops after it.

Here: the spec, the option checks and the write pass; the check pass is in `prepare_check.py`,
the partial, state and rejects files in `prepare_files.py`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kimi_lora_cli.data.audio import RESAMPLER, AudioError, load_audio
from kimi_lora_cli.data.features import CodeStore, FeatureStore
from kimi_lora_cli.data.prepare_check import (
    DataProblems,
    Finding,
    PrepareProgress,
    has_work,
    model_vocab,
    read_records,
    scan,
    summary_tools,
)
from kimi_lora_cli.data.prepare_files import STATE_VERSION, PrepareFiles, finish_file, load_state, write_state
from kimi_lora_cli.data.schema import LineCheck, check_line
from kimi_lora_cli.data.sources import Source, SourceOptions, open_source
from kimi_lora_cli.errors import ConfigError, DataError
from kimi_lora_cli.fileops import naming_errors

__all__ = ["DataProblems", "Finding", "PrepareProgress", "PrepareResult", "PrepareSpec", "prepare", "result_json"]


@dataclass(frozen=True)
class PrepareSpec:
    model: Path
    data: Path | str
    output: Path | None  # None only with dry_run
    speech_tokenizer: Path | None = None
    recompute: bool = False
    cache_features: Path | None = None
    skip_bad: bool = False
    rejects: Path | None = None
    batch_size: int = 8
    device: str | None = None
    overwrite: bool = False
    sources: SourceOptions = field(default_factory=SourceOptions)
    dry_run: bool = False
    model_max_length: int | None = None  # None: the model's max_position_embeddings


@dataclass
class PrepareResult:
    output: Path
    rejects: Path | None = None
    lines_written: int = 0
    lines_rejected: int = 0
    audio_tokenized: int = 0
    audio_kept: int = 0
    seconds_tokenized: float = 0.0
    features_written: int = 0
    features_reused: int = 0
    resumed_at_line: int = 0
    paths_rewritten: int = 0
    notes: list[str] = field(default_factory=list)
    summary: dict[str, Any] | None = None  # data/summary.py DataSummary.as_dict()


# -------------------------------------------------------------------------------------------
# The command's core
# -------------------------------------------------------------------------------------------


def open_data(spec: PrepareSpec, clips: Path | None = None) -> Source:
    """The --data source (clips cut from recordings go to `clips`, beside the output)."""
    from dataclasses import replace

    return open_source(str(spec.data), replace(spec.sources, clip_dir=clips or spec.sources.clip_dir))


def _options_key(spec: PrepareSpec, offset: int) -> dict[str, Any]:
    st = str(spec.speech_tokenizer.expanduser().resolve()) if spec.speech_tokenizer else None
    data = Path(spec.data).expanduser()
    # the resampler too: lines an older version coded from other 16 kHz waveforms are not resumed
    return {"data": str(data.resolve()) if data.exists() else str(spec.data), "recompute": spec.recompute,
            "speech_tokenizer": st, "offset": offset, "resampler": RESAMPLER, "source": spec.sources.key()}


def _scan(spec: PrepareSpec, source: Source, offset: int, vocab: int, resume_line: int,
          progress: Callable[[PrepareProgress], None] | None, summary: Any,
          tokens_of: Callable[[LineCheck], int | None]) -> tuple[list[Finding], dict[int, list[str]], dict]:
    """The check pass (prepare_check.scan) with this run's options."""
    return scan(source, offset, vocab, resume_line, progress, summary, tokens_of, recompute=spec.recompute,
                have_tokenizer=spec.speech_tokenizer is not None or spec.dry_run,  # a dry run computes no codes
                features=spec.cache_features is not None)


def check_paths(spec: PrepareSpec) -> PrepareFiles | None:
    """Every check of the options and paths, before anything is read or written: the output and the
    rejects file are new files (or, with --overwrite, earlier results), never an input."""
    from kimi_lora_cli.devices import check_device
    from kimi_lora_cli.outputs import check_output

    spec.sources.check()
    data = Path(spec.data).expanduser()
    if not data.exists() and spec.sources.format in ("auto", "jsonl") and str(spec.data).endswith(".jsonl"):
        raise DataError(f"{spec.data}: no such data file; pass the jsonl with --data")
    open_data(spec)  # the format and its columns, checked before any model loads
    if spec.output is None or spec.dry_run:
        if not spec.dry_run:
            raise ConfigError("--output is needed (or --dry-run for the summary alone)")
        return None
    if spec.batch_size < 1:
        raise ConfigError(f"--batch-size {spec.batch_size}: must be at least 1")
    if spec.recompute and spec.speech_tokenizer is None:
        raise ConfigError("--recompute needs --speech-tokenizer DIR (the glm-4-voice-tokenizer folder)")
    check_device(spec.device)
    paths = PrepareFiles.of(spec.output, spec.rejects)
    inputs = [(f"--data {'file' if data.is_file() else 'folder'}", data if data.exists() else None), ("model folder", spec.model),
              ("speech tokenizer folder", spec.speech_tokenizer)]
    if spec.output.resolve() == data.resolve():
        raise ConfigError(f"{spec.output}: --output must differ from --data (the input is never rewritten)")
    check_output(spec.output, inputs, flag="--output", kind="file")
    check_output(paths.rejects, [*inputs, ("--output file", spec.output)], flag="--rejects", kind="file")
    check_output(paths.clips, [*inputs, ("--output file", spec.output)], flag="--output (its clips folder)")
    _check_replaceable(paths.output, "--output", spec.overwrite)
    _check_replaceable(paths.rejects, "--rejects", spec.overwrite)
    return paths


def _check_replaceable(path: Path, flag: str, overwrite: bool) -> None:
    """An existing output or rejects file is replaced only with --overwrite, and only when an
    earlier prepare wrote it (its record beside it matches the bytes)."""
    from kimi_lora_cli.outputs import file_written_by

    if not path.exists():
        return
    if not file_written_by(path, "prepare"):
        raise ConfigError(f"{flag} {path}: already exists and is not a file `kimi-lora prepare` wrote (or it "
                          f"changed since); it is never replaced - choose another {flag}")
    if not overwrite:
        raise ConfigError(f"{flag} {path}: already exists (written by an earlier `kimi-lora prepare`); pass "
                          f"--overwrite to rebuild it or choose another {flag}")


def prepare(spec: PrepareSpec, progress: Callable[[PrepareProgress], None] | None = None,
            log: Callable[[str], None] | None = None) -> PrepareResult:
    """Run `kimi-lora prepare` (see module docstring). Raises DataProblems listing every bad line."""
    from kimi_lora_cli.outputs import FolderLock

    log = log or (lambda _msg: None)
    paths = check_paths(spec)
    if paths is None:  # --dry-run without --output
        return _dry_run(spec, progress)
    with naming_errors(paths.output.parent):
        paths.output.parent.mkdir(parents=True, exist_ok=True)
    with FolderLock.beside(paths.output, "prepare") as lock:
        if lock.note:
            log(lock.note)
        check_paths(spec)  # again under the lock: a run that just finished may have written the output
        return _prepare_locked(spec, paths, progress, log)


def _dry_run(spec: PrepareSpec, progress: Callable[[PrepareProgress], None] | None) -> PrepareResult:
    """Check every line and sum the input up; nothing is written, no audio is tokenized."""
    offset, vocab = model_vocab(spec.model)
    source = open_data(spec)
    summary, tokens_of = summary_tools(spec.model, spec.model_max_length, source)
    findings, _, totals = _scan(spec, source, offset, vocab, 1, progress, summary, tokens_of)
    result = PrepareResult(output=Path(spec.output) if spec.output else Path(""), summary=summary.as_dict())
    result.lines_rejected = len({f.line for f in findings})
    result.lines_written = totals["records"]
    if findings:
        result.notes.extend(f.render(spec.data) for f in findings[:20])
        if len(findings) > 20:
            result.notes.append(f"... and {len(findings) - 20} more problems")
    return result


def _prepare_locked(spec: PrepareSpec, paths: PrepareFiles, progress: Callable[[PrepareProgress], None] | None,
                    log: Callable[[str], None]) -> PrepareResult:
    offset, vocab = model_vocab(spec.model)
    options = _options_key(spec, offset)
    state = load_state(paths, options, spec.overwrite)
    resume_line = state["next_line"] if state else 1
    source = open_data(spec, paths.clips)
    summary, tokens_of = summary_tools(spec.model, spec.model_max_length, source)

    findings, bad, totals = _scan(spec, source, offset, vocab, resume_line, progress, summary, tokens_of)
    if state and totals["prefix_sha256"] != state["prefix_sha256"]:
        log(f"{paths.partial}: the first {resume_line - 1} lines of {spec.data} changed since the interrupted run; "
            "starting over")
        state, resume_line = None, 1
        summary, tokens_of = summary_tools(spec.model, spec.model_max_length, source)
        findings, bad, totals = _scan(spec, source, offset, vocab, 1, progress, summary, tokens_of)
    if findings and not spec.skip_bad:
        raise DataProblems(spec.data, findings, "; fix them (or pass --skip-bad to write the bad lines to a "
                                                "rejects file and go on)")
    if not totals["records"] and not findings:
        raise DataError(f"{spec.data}: no samples (the file is empty); pass a jsonl with one conversation per line")

    result = PrepareResult(output=paths.output, resumed_at_line=resume_line if state else 0,
                           summary=summary.as_dict())
    if spec.speech_tokenizer is not None and totals["records"] and not totals["tokens"] and not state:
        result.notes.append("every audio message already has audio_tokens: --speech-tokenizer was not needed")
    if totals["cwd_paths"]:
        result.notes.append(f"{len(totals['cwd_paths'])} audio paths are not next to {spec.data} and were found "
                            f"relative to the current folder {Path.cwd()}; {paths.output} names them by absolute "
                            "path")
    runner = _Runner(spec, source, paths, offset, vocab, totals, result, progress)
    runner.run(state, bad)
    if not result.lines_written:
        # --skip-bad promises "the good lines"; with none, an empty file would only move the error to
        # `train` ("no usable samples"). The rejects file stays: it says what is wrong with each line.
        paths.output.unlink(missing_ok=True)
        raise DataError(f"{spec.data}: none of its {result.lines_rejected} lines is usable, so nothing was written; "
                        f"each line and its problems are in {result.rejects}: fix them and rerun (with --overwrite "
                        "to replace that rejects file)")
    return result


class _Runner:
    """The writing pass: batches of lines, tokenized and/or featurized together, committed in order."""

    def __init__(self, spec: PrepareSpec, source: Source, paths: PrepareFiles, offset: int, vocab: int, totals: dict,
                 result: PrepareResult, progress: Callable[[PrepareProgress], None] | None) -> None:
        self.spec, self.source, self.paths, self.offset, self.vocab = spec, source, paths, offset, vocab
        self.result, self.progress_cb = result, progress
        self.tick = PrepareProgress("prepare", lines_total=totals["lines"], files_total=totals["files"],
                                    seconds_total=totals["seconds"])
        self.need_tokens = totals["tokens"] > 0
        self.codes: CodeStore | None = None
        self.features: FeatureStore | None = None
        self.out_dir = paths.output.parent.resolve()
        self.data_dir = source.base_dir

    # -- models ------------------------------------------------------------------------------

    def _device(self) -> str:
        if self.spec.device:
            return self.spec.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def load_models(self) -> None:
        from kimi_lora_cli.loading import load_feature_encoder, load_speech_tokenizer

        device = self._device()
        if self.need_tokens:
            # Memory only: the codes go into the output; a file repeated across batches is tokenized once.
            self.codes = CodeStore(load_speech_tokenizer(self.spec.speech_tokenizer, device=device), self.offset,
                                   self.vocab, batch_size=self.spec.batch_size)
        if self.spec.cache_features and self.tick.files_total:
            encoder = load_feature_encoder(self.spec.model, device=device,
                                           dtype="float32" if device == "cpu" else "auto")
            self.features = FeatureStore(encoder, cache_dir=self.spec.cache_features, memory_budget_bytes=0,
                                         batch_size=self.spec.batch_size)

    # -- main loop ---------------------------------------------------------------------------

    def run(self, state: dict[str, Any] | None, bad: dict[int, list[str]]) -> None:
        spec, paths, res = self.spec, self.paths, self.result
        paths.output.parent.mkdir(parents=True, exist_ok=True)
        paths.rejects.parent.mkdir(parents=True, exist_ok=True)
        if state:
            for name, value in state.get("counters", {}).items():
                setattr(res, name, value)
            res.resumed_at_line = state["next_line"]
        if self.tick.files_total:
            self.load_models()
        if self.progress_cb:
            self.progress_cb(self.tick)  # starts the clock for the rates
        out = open(paths.partial, "r+b" if state else "wb")  # noqa: SIM115 - closed in finally
        rej = open(paths.rejects_partial, "r+b" if state and paths.rejects_partial.is_file() else "wb")  # noqa: SIM115
        try:
            if state:
                out.truncate(state["output_bytes"])
                rej.truncate(state.get("rejects_bytes", 0))
                out.seek(0, os.SEEK_END)
                rej.seek(0, os.SEEK_END)
            prefix = hashlib.sha256()
            start = state["next_line"] if state else 1
            pending: list[tuple[int, bytes, LineCheck | None]] = []
            work = 0
            for number, raw, where, error in read_records(self.source):
                if number < start:
                    prefix.update(raw)
                    continue
                if error is not None and number not in bad:  # the data changed since the check pass
                    if not spec.skip_bad:
                        raise DataProblems(spec.data, [Finding(number, error, where)],
                                           "; fix them and rerun to continue where it stopped")
                    bad[number] = [error]
                if number in bad:
                    pending.append((number, raw, None))
                else:
                    text = raw.decode("utf-8")
                    chk = None
                    if text.strip():
                        chk = check_line(text, number, self.data_dir, self.offset, self.vocab,
                                         recompute=spec.recompute, speech_tokenizer=spec.speech_tokenizer is not None)
                        if chk.problems:  # the files changed since the check pass
                            if not spec.skip_bad:
                                raise DataProblems(spec.data, [Finding(number, p, where) for p in chk.problems],
                                                   "; fix them and rerun to continue where it stopped")
                            bad[number] = chk.problems
                        work += sum(1 for a in chk.audios if has_work(a, self.features is not None))
                    pending.append((number, raw, chk))
                if work >= spec.batch_size or len(pending) >= 512:
                    self._commit(pending, bad, out, rej, prefix)
                    pending, work = [], 0
            self._commit(pending, bad, out, rej, prefix)
        finally:
            out.close()
            rej.close()
        finish_file(paths.partial, paths.output)
        if res.lines_rejected:
            finish_file(paths.rejects_partial, paths.rejects)
            res.rejects = paths.rejects
        else:
            paths.rejects_partial.unlink(missing_ok=True)
            if spec.overwrite and paths.rejects.exists():
                from kimi_lora_cli.outputs import file_written_by, forget_file

                if file_written_by(paths.rejects, "prepare"):  # an earlier run's, now out of date
                    forget_file(paths.rejects)
        paths.state.unlink(missing_ok=True)

    def _commit(self, pending, bad, out, rej, prefix) -> None:
        """Process a group of lines and append them (or their rejects) in input order, then save state."""
        if not pending:
            return
        failed = self._process([chk for n, _, chk in pending if chk is not None and n not in bad])
        res = self.result
        for number, raw, chk in pending:
            prefix.update(raw)
            problems = bad.get(number) or (failed.get(number) if chk is not None else None)
            if problems:
                with naming_errors(self.paths.rejects_partial):
                    rej.write((json.dumps({"line": number, "problems": problems,
                                           "text": raw.decode("utf-8", "replace").rstrip("\n")},
                                          ensure_ascii=False) + "\n").encode())
                res.lines_rejected += 1
            elif chk is not None:
                with naming_errors(self.paths.partial):
                    out.write((json.dumps(chk.record, ensure_ascii=False) + "\n").encode())
                res.lines_written += 1
        with naming_errors(self.paths.partial):
            out.flush()
        with naming_errors(self.paths.rejects_partial):
            rej.flush()
        counters = {k: getattr(res, k) for k in ("lines_written", "lines_rejected", "audio_tokenized", "audio_kept",
                                                 "seconds_tokenized", "features_written", "features_reused",
                                                 "paths_rewritten")}
        write_state(self.paths, {
            "version": STATE_VERSION, "options": _options_key(self.spec, self.offset),
            "next_line": pending[-1][0] + 1, "prefix_sha256": prefix.copy().hexdigest(),
            "output_bytes": out.tell(), "rejects_bytes": rej.tell(), "counters": counters,
        })

    def _process(self, checks: list[LineCheck]) -> dict[int, list[str]]:
        """Fill audio_tokens (and the feature cache) for these lines; returns failures by line."""
        failed: dict[int, list[str]] = {}
        res, spec = self.result, self.spec
        jobs = [(chk, ref) for chk in checks for ref in chk.audios if has_work(ref, self.features is not None)]
        waves: dict[Path, Any] = {}
        for chk, ref in jobs:
            if ref.path in waves:
                continue
            try:
                waves[ref.path] = load_audio(ref.path)
            except AudioError as e:
                failed.setdefault(chk.line, []).append(f"message {ref.index}: {e}")
        if failed and not spec.skip_bad:
            raise DataProblems(spec.data, [Finding(line, p) for line, ps in failed.items() for p in ps],
                               "; fix them (or pass --skip-bad to write the bad lines to a rejects file); "
                               "rerun to continue where it stopped")
        jobs = [(chk, ref) for chk, ref in jobs if chk.line not in failed]

        token_paths = list(dict.fromkeys(ref.path for _, ref in jobs if ref.needs_tokens))
        if token_paths:
            codes = dict(zip(token_paths, self.codes.codes(token_paths, waves)))
            for chk, ref in jobs:
                if ref.needs_tokens:
                    ids = codes[ref.path]
                    if not ids:  # never write an empty token list
                        failed.setdefault(chk.line, []).append(f"message {ref.index}: the audio yields no codes")
                        continue
                    chk.record["conversation"][ref.index]["audio_tokens"] = ids
                    res.audio_tokenized += 1
                    res.seconds_tokenized += ref.seconds
        feature_paths = [ref.path for _, ref in jobs if ref.continuous]
        if self.features is not None and feature_paths:
            written = self.features.fill(feature_paths, waves)
            res.features_written += written
            res.features_reused += len(feature_paths) - written  # cached, or the same content earlier in this batch
        for chk in checks:
            if chk.line in failed:
                continue
            for ref in chk.audios:
                msg = chk.record["conversation"][ref.index]
                if not ref.needs_tokens:
                    res.audio_kept += 1
                new = None
                if ref.via_data_dir and self.data_dir.resolve() != self.out_dir:
                    new = os.path.relpath(ref.path.resolve(), self.out_dir)
                elif ref.via_cwd:  # valid only from this folder: written resolved
                    new = str(ref.path.resolve())
                if new is not None:
                    if isinstance(msg["content"], list):  # audio-text: [audio_path, text]
                        msg["content"][0] = new
                    else:
                        msg["content"] = new
                    res.paths_rewritten += 1
        self.tick.lines_done += len(checks)
        self.tick.files_done += len(jobs)
        self.tick.seconds_done += sum(ref.seconds for _, ref in jobs)
        if self.progress_cb:
            self.progress_cb(self.tick)
        return failed


def result_json(result: PrepareResult) -> dict[str, Any]:
    out = asdict(result)
    out["output"] = str(result.output)
    out["rejects"] = str(result.rejects) if result.rejects else None
    return out
