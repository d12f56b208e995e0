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
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kimi_lora_cli.data.audio import RESAMPLER, AudioError, load_audio
from kimi_lora_cli.data.features import CodeStore, FeatureStore
from kimi_lora_cli.data.schema import AudioRef, LineCheck, check_line, decode_line, read_lines
from kimi_lora_cli.errors import ConfigError, DataError, ModelLoadError
from kimi_lora_cli.fileops import naming_errors, write_atomic

STATE_VERSION = 1


@dataclass(frozen=True)
class PrepareSpec:
    model: Path
    data: Path
    output: Path
    speech_tokenizer: Path | None = None
    recompute: bool = False
    cache_features: Path | None = None
    skip_bad: bool = False
    rejects: Path | None = None
    batch_size: int = 8
    device: str | None = None
    overwrite: bool = False


@dataclass
class Finding:
    line: int
    message: str

    def render(self, data: Path | str) -> str:
        return f"{data}:{self.line}: {self.message}"


class DataProblems(DataError):
    """Every problem found in a data file; `str()` is the one-line summary, `.findings` the list."""

    def __init__(self, data: Path, findings: list[Finding], hint: str = "") -> None:
        self.data = data
        self.findings = findings
        n_lines = len({f.line for f in findings})
        super().__init__(f"{data}: {len(findings)} problem{'s' if len(findings) != 1 else ''} in {n_lines} "
                         f"line{'s' if n_lines != 1 else ''}{hint}")


@dataclass
class PrepareProgress:
    stage: str  # "check" | "prepare"
    lines_done: int = 0
    lines_total: int = 0
    files_done: int = 0
    files_total: int = 0
    seconds_done: float = 0.0
    seconds_total: float = 0.0


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


# -------------------------------------------------------------------------------------------
# The command's core
# -------------------------------------------------------------------------------------------


@dataclass
class _Paths:
    output: Path
    partial: Path
    state: Path
    rejects: Path
    rejects_partial: Path

    @classmethod
    def of(cls, spec: PrepareSpec) -> _Paths:
        out = spec.output
        rejects = spec.rejects or out.with_name(f"{out.stem}.rejects{out.suffix or '.jsonl'}")
        return cls(out, out.with_name(out.name + ".partial"), out.with_name(out.name + ".partial.json"),
                   rejects, rejects.with_name(rejects.name + ".partial"))


def _has_work(ref: AudioRef, features: bool) -> bool:
    """Codes to compute, or Whisper features to cache (audio-text history has no features)."""
    return ref.needs_tokens or (features and ref.continuous)


def _read_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    yield from read_lines(path)


def _decode(raw: bytes, line: int) -> tuple[str | None, Finding | None]:
    text, problem = decode_line(raw)
    return text, Finding(line, problem) if problem else None


def _model_vocab(model: Path) -> tuple[int, int]:
    from kimi_lora_cli.loading import inspect_folder, kimi_config

    info = inspect_folder(model, need_weights=False)
    if not info.is_kimi:
        raise ModelLoadError(f"{model / 'config.json'}: not a Kimi-Audio config (no kimia_* keys); pass the "
                             "Kimi-Audio model folder as --model")
    cfg = kimi_config(info)  # every value checked
    return cfg.kimia_token_offset, cfg.vocab_size


def _options_key(spec: PrepareSpec, offset: int) -> dict[str, Any]:
    st = str(spec.speech_tokenizer.expanduser().resolve()) if spec.speech_tokenizer else None
    # the resampler too: lines an older version coded from other 16 kHz waveforms are not resumed
    return {"data": str(spec.data.resolve()), "recompute": spec.recompute, "speech_tokenizer": st, "offset": offset,
            "resampler": RESAMPLER}


def _load_state(paths: _Paths, options: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    if overwrite or not (paths.state.is_file() and paths.partial.is_file()):
        return None
    try:
        state = json.loads(paths.state.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if state.get("version") != STATE_VERSION or state.get("options") != options:
        return None
    if paths.partial.stat().st_size < state.get("output_bytes", -1):
        return None
    if state.get("rejects_bytes", 0) and (not paths.rejects_partial.is_file()
                                          or paths.rejects_partial.stat().st_size < state["rejects_bytes"]):
        return None
    return state


def _write_state(paths: _Paths, state: dict[str, Any]) -> None:
    write_atomic(paths.state, json.dumps(state, indent=1))


def _scan(spec: PrepareSpec, offset: int, vocab: int, resume_line: int,
          progress: Callable[[PrepareProgress], None] | None) -> tuple[list[Finding], dict[int, list[str]], dict]:
    """Check every line. Returns (findings, problems by line, totals of the work left after resume)."""
    data_dir = spec.data.parent
    findings: list[Finding] = []
    bad: dict[int, list[str]] = {}
    totals = {"lines": 0, "files": 0, "seconds": 0.0, "tokens": 0, "prefix_sha256": hashlib.sha256(),
              "records": 0, "cwd_paths": set()}
    have_tokenizer = spec.speech_tokenizer is not None
    tick = PrepareProgress("check")
    for number, raw in _read_lines(spec.data):
        if number < resume_line:
            totals["prefix_sha256"].update(raw)
        tick.lines_done = number
        if progress and number % 200 == 0:
            progress(tick)
        text, finding = _decode(raw, number)
        if finding:
            findings.append(finding)
            bad[number] = [finding.message]
            continue
        if not text.strip():
            continue
        chk = check_line(text, number, data_dir, offset, vocab, recompute=spec.recompute,
                         speech_tokenizer=have_tokenizer)
        if chk.problems:
            findings.extend(Finding(number, p) for p in chk.problems)
            bad[number] = chk.problems
            continue
        totals["records"] += 1
        totals["cwd_paths"].update(ref.path for ref in chk.audios if ref.via_cwd)
        if number >= resume_line:
            totals["lines"] += 1
            for ref in chk.audios:
                if _has_work(ref, spec.cache_features is not None):
                    totals["files"] += 1
                    totals["seconds"] += ref.seconds
                totals["tokens"] += ref.needs_tokens
    totals["prefix_sha256"] = totals["prefix_sha256"].hexdigest()
    return findings, bad, totals


def check_paths(spec: PrepareSpec) -> _Paths:
    """Every check of the options and paths, before anything is read or written: the output and the
    rejects file are new files (or, with --overwrite, earlier results), never an input."""
    from kimi_lora_cli.devices import check_device
    from kimi_lora_cli.outputs import check_output

    if not spec.data.exists():
        raise DataError(f"{spec.data}: no such data file; pass the jsonl with --data")
    if not spec.data.is_file():
        from kimi_lora_cli.data.schema import check_data_file

        check_data_file(spec.data, "--data")
        raise DataError(f"{spec.data}: not a file; pass the jsonl with --data")
    if spec.batch_size < 1:
        raise ConfigError(f"--batch-size {spec.batch_size}: must be at least 1")
    if spec.recompute and spec.speech_tokenizer is None:
        raise ConfigError("--recompute needs --speech-tokenizer DIR (the glm-4-voice-tokenizer folder)")
    check_device(spec.device)
    paths = _Paths.of(spec)
    inputs = [("--data file", spec.data), ("model folder", spec.model),
              ("speech tokenizer folder", spec.speech_tokenizer)]
    if spec.output.resolve() == spec.data.resolve():
        raise ConfigError(f"{spec.output}: --output must differ from --data (the input is never rewritten)")
    check_output(spec.output, inputs, flag="--output", kind="file")
    check_output(paths.rejects, [*inputs, ("--output file", spec.output)], flag="--rejects", kind="file")
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
    with naming_errors(paths.output.parent):
        paths.output.parent.mkdir(parents=True, exist_ok=True)
    with FolderLock.beside(paths.output, "prepare") as lock:
        if lock.note:
            log(lock.note)
        check_paths(spec)  # again under the lock: a run that just finished may have written the output
        return _prepare_locked(spec, paths, progress, log)


def _prepare_locked(spec: PrepareSpec, paths: _Paths, progress: Callable[[PrepareProgress], None] | None,
                    log: Callable[[str], None]) -> PrepareResult:
    offset, vocab = _model_vocab(spec.model)
    options = _options_key(spec, offset)
    state = _load_state(paths, options, spec.overwrite)
    resume_line = state["next_line"] if state else 1

    findings, bad, totals = _scan(spec, offset, vocab, resume_line, progress)
    if state and totals["prefix_sha256"] != state["prefix_sha256"]:
        log(f"{paths.partial}: the first {resume_line - 1} lines of {spec.data} changed since the interrupted run; "
            "starting over")
        state, resume_line = None, 1
        findings, bad, totals = _scan(spec, offset, vocab, 1, progress)
    if findings and not spec.skip_bad:
        raise DataProblems(spec.data, findings, "; fix them (or pass --skip-bad to write the bad lines to a "
                                                "rejects file and go on)")
    if not totals["records"] and not findings:
        raise DataError(f"{spec.data}: no samples (the file is empty); pass a jsonl with one conversation per line")

    result = PrepareResult(output=paths.output, resumed_at_line=resume_line if state else 0)
    if spec.speech_tokenizer is not None and totals["records"] and not totals["tokens"] and not state:
        result.notes.append("every audio message already has audio_tokens: --speech-tokenizer was not needed")
    if totals["cwd_paths"]:
        result.notes.append(f"{len(totals['cwd_paths'])} audio paths are not next to {spec.data} and were found "
                            f"relative to the current folder {Path.cwd()}; {paths.output} names them by absolute "
                            "path")
    runner = _Runner(spec, paths, offset, vocab, totals, result, progress)
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

    def __init__(self, spec: PrepareSpec, paths: _Paths, offset: int, vocab: int, totals: dict,
                 result: PrepareResult, progress: Callable[[PrepareProgress], None] | None) -> None:
        self.spec, self.paths, self.offset, self.vocab = spec, paths, offset, vocab
        self.result, self.progress_cb = result, progress
        self.tick = PrepareProgress("prepare", lines_total=totals["lines"], files_total=totals["files"],
                                    seconds_total=totals["seconds"])
        self.need_tokens = totals["tokens"] > 0
        self.codes: CodeStore | None = None
        self.features: FeatureStore | None = None
        self.out_dir = paths.output.parent.resolve()
        self.data_dir = spec.data.parent

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
            for number, raw in _read_lines(spec.data):
                if number < start:
                    prefix.update(raw)
                    continue
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
                                raise DataProblems(spec.data, [Finding(number, p) for p in chk.problems],
                                                   "; fix them and rerun to continue where it stopped")
                            bad[number] = chk.problems
                        work += sum(1 for a in chk.audios if _has_work(a, self.features is not None))
                    pending.append((number, raw, chk))
                if work >= spec.batch_size or len(pending) >= 512:
                    self._commit(pending, bad, out, rej, prefix)
                    pending, work = [], 0
            self._commit(pending, bad, out, rej, prefix)
        finally:
            out.close()
            rej.close()
        _finish(paths.partial, paths.output)
        if res.lines_rejected:
            _finish(paths.rejects_partial, paths.rejects)
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
        _write_state(self.paths, {
            "version": STATE_VERSION, "options": _options_key(self.spec, self.offset),
            "next_line": pending[-1][0] + 1, "prefix_sha256": prefix.copy().hexdigest(),
            "output_bytes": out.tell(), "rejects_bytes": rej.tell(), "counters": counters,
        })

    def _process(self, checks: list[LineCheck]) -> dict[int, list[str]]:
        """Fill audio_tokens (and the feature cache) for these lines; returns failures by line."""
        failed: dict[int, list[str]] = {}
        res, spec = self.result, self.spec
        jobs = [(chk, ref) for chk in checks for ref in chk.audios if _has_work(ref, self.features is not None)]
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


def _finish(partial: Path, final: Path) -> None:
    """Record the finished file as prepare's, then rename it into place in one step."""
    from kimi_lora_cli.outputs import record_file

    with naming_errors(final):
        record_file(final, partial, "prepare")
        os.replace(partial, final)


def result_json(result: PrepareResult) -> dict[str, Any]:
    out = asdict(result)
    out["output"] = str(result.output)
    out["rejects"] = str(result.rejects) if result.rejects else None
    return out
