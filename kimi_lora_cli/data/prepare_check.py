"""`prepare`'s check pass: every line of the input read and checked before any model loads, each problem
a `Finding` (FILE:LINE), the work left after a resume counted, and the input's summary filled."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from kimi_lora_cli.data.schema import AudioRef, LineCheck, check_line, decode_line
from kimi_lora_cli.data.sources import Source
from kimi_lora_cli.data.sources.jsonl import read_lines
from kimi_lora_cli.data.summary import DataSummary, sequence_length
from kimi_lora_cli.errors import DataError, ModelLoadError


@dataclass
class Finding:
    line: int
    message: str
    where: str = ""  # FILE:LINE or dataset[row] of a non-jsonl source

    def render(self, data: Path | str) -> str:
        return f"{self.where or f'{data}:{self.line}'}: {self.message}"


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



def has_work(ref: AudioRef, features: bool) -> bool:
    """Codes to compute, or Whisper features to cache (audio-text history has no features)."""
    return ref.needs_tokens or (features and ref.continuous)


def read_records(source: Source) -> Iterator[tuple[int, bytes, str, str | None]]:
    """(number, bytes of the official line, where, problem) of every record. A jsonl is passed on as
    written (its bytes hashed for resuming); other formats as the JSON of the records they become."""
    if source.format == "jsonl":
        path = Path(source.label)
        for number, raw in read_lines(path):
            yield number, raw, "", None
        return
    for rec in source:
        if rec.error is not None:
            yield rec.number, (rec.text or rec.where).encode() + b"\n", rec.where, rec.error
        else:
            yield rec.number, (json.dumps(rec.obj, ensure_ascii=False) + "\n").encode(), rec.where, None


def _decode(raw: bytes, line: int) -> tuple[str | None, Finding | None]:
    text, problem = decode_line(raw)
    return text, Finding(line, problem) if problem else None


def model_vocab(model: Path) -> tuple[int, int]:
    from kimi_lora_cli.loading import inspect_folder, kimi_config

    info = inspect_folder(model, need_weights=False)
    if not info.is_kimi:
        raise ModelLoadError(f"{model / 'config.json'}: not a Kimi-Audio config (no kimia_* keys); pass the "
                             "Kimi-Audio model folder as --model")
    cfg = kimi_config(info)  # every value checked
    return cfg.kimia_token_offset, cfg.vocab_size


def summary_tools(model: Path, max_length: int | None,
                  source: Source) -> tuple[DataSummary, Callable[[LineCheck], int | None]]:
    """An empty summary of this input and the function giving a checked line's token count (the
    model's tokenizer and config, read without weights)."""
    from kimi_lora_cli.data.conversation import ConversationError, output_type_for_task
    from kimi_lora_cli.loading import load_model

    skeleton = load_model(model, weights=False, load_whisper=False)
    limit = max_length or skeleton.config.max_position_embeddings

    def tokens_of(chk: LineCheck) -> int | None:
        try:
            return sequence_length(chk.record["conversation"], {r.index: r.samples for r in chk.audios},
                                   skeleton.tokenizer, skeleton.config,
                                   output_type_for_task(chk.record.get("task_type")))
        except (ConversationError, KeyError, TypeError):
            return None

    return DataSummary(source.label, source.format, limit), tokens_of


def scan(source: Source, offset: int, vocab: int, resume_line: int,
         progress: Callable[[PrepareProgress], None] | None, summary: DataSummary | None = None,
         tokens_of: Callable[[LineCheck], int | None] | None = None, *, recompute: bool = False,
         have_tokenizer: bool = False, features: bool = False,
         ) -> tuple[list[Finding], dict[int, list[str]], dict]:
    """Check every line. Returns (findings, problems by line, totals of the work left after resume);
    `summary` hears of every sample and skipped line. `have_tokenizer`: codes can be computed;
    `features`: Whisper features are cached (both count as work)."""
    data_dir = source.base_dir
    findings: list[Finding] = []
    bad: dict[int, list[str]] = {}
    totals = {"lines": 0, "files": 0, "seconds": 0.0, "tokens": 0, "prefix_sha256": hashlib.sha256(),
              "records": 0, "cwd_paths": set()}
    tick = PrepareProgress("check")
    for number, raw, where, error in read_records(source):
        if number < resume_line:
            totals["prefix_sha256"].update(raw)
        tick.lines_done = number
        if progress and number % 200 == 0:
            progress(tick)
        if error is not None:
            findings.append(Finding(number, error, where))
            bad[number] = [error]
            if summary is not None:
                summary.skip(error)
            continue
        text, finding = _decode(raw, number)
        if finding:
            findings.append(finding)
            bad[number] = [finding.message]
            if summary is not None:
                summary.skip(finding.message)
            continue
        if not text.strip():
            continue
        chk = check_line(text, number, data_dir, offset, vocab, recompute=recompute,
                         speech_tokenizer=have_tokenizer)
        if chk.problems:
            findings.extend(Finding(number, p, where) for p in chk.problems)
            bad[number] = chk.problems
            if summary is not None:
                summary.skip(chk.problems[0])
            continue
        totals["records"] += 1
        if summary is not None:
            summary.add([ref.seconds for ref in chk.audios if ref.continuous], tokens_of(chk) if tokens_of else None)
        totals["cwd_paths"].update(ref.path for ref in chk.audios if ref.via_cwd)
        if number >= resume_line:
            totals["lines"] += 1
            for ref in chk.audios:
                if has_work(ref, features):
                    totals["files"] += 1
                    totals["seconds"] += ref.seconds
                totals["tokens"] += ref.needs_tokens
    totals["prefix_sha256"] = totals["prefix_sha256"].hexdigest()
    return findings, bad, totals
