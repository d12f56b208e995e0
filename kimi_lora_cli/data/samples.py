"""Train's reader: a data set (any format `data.sources` reads) -> checked, tokenized `Sample`s.

`load_samples(path, tokenizer, config, max_length=..., too_long="error", speech_codes=None)` reads the
source, checks every record with `data.schema.check_record`, fills missing audio_tokens from
`speech_codes()` (a CodeStore) when given, and either returns the tokenized samples or raises one
DataError listing every problem as `FILE:LINE: ...`, sequences longer than `max_length` included
(policy "error", "skip" with a count, or "truncate").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kimi_lora_cli.data.conversation import (
    ConversationError,
    TokenizedConversation,
    output_type_for_task,
    tokenize_conversation,
)
from kimi_lora_cli.data.schema import (
    MAX_LISTED_PROBLEMS,
    NOT_JSONL_AFTER,
    TOO_LONG_POLICIES,
    AudioProbe,
    LineCheck,
    check_record,
)
from kimi_lora_cli.errors import DataError

if TYPE_CHECKING:
    from kimi_lora_cli.data.features import CodeStore
    from kimi_lora_cli.data.sources import SourceOptions


@dataclass
class Sample:
    """One training conversation, tokenized; `audio[k]` is the file of `seq.media[k]`."""

    line: int
    source: Path
    task_type: str
    output_type: str
    seq: TokenizedConversation
    audio: list[Path] = field(default_factory=list)
    truncated: bool = False
    # The checked messages, audio contents as resolved paths (evaluation decodes from these).
    conversation: list[dict[str, Any]] = field(default_factory=list, repr=False)
    location: str = ""  # FILE:LINE, or dataset[row]

    def __len__(self) -> int:
        return len(self.seq)

    @property
    def where(self) -> str:
        return self.location or f"{self.source}:{self.line}"


@dataclass
class LoadedData:
    samples: list[Sample]
    path: Path
    lines: int
    skipped_too_long: int = 0
    truncated: int = 0
    audio_tokenized: int = 0  # files given audio_tokens by the speech tokenizer
    cwd_paths: int = 0  # audio paths found only relative to the current folder
    skipped_bad: int = 0  # rows left out under skip_bad
    format: str = "jsonl"

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.samples)



def truncate(seq: TokenizedConversation, length: int) -> TokenizedConversation:
    """The first `length` positions; audio spans cut at the end (their features follow)."""
    from kimi_lora_cli.data.conversation import MediaSpan

    out = TokenizedConversation(
        audio_ids=seq.audio_ids[:length], text_ids=seq.text_ids[:length],
        is_continuous=seq.is_continuous[:length], audio_loss=seq.audio_loss[:length],
        text_loss=seq.text_loss[:length],
    )
    for m in seq.media:
        if m.start < length:
            out.media.append(MediaSpan(m.start, min(m.length, length - m.start), m.audio, m.message_index,
                                       m.continuous))
    return out


def has_loss(seq: TokenizedConversation) -> bool:
    """True when some position predicts a trained token (labels are shifted by one)."""
    return any(seq.text_loss[1:]) or any(seq.audio_loss[1:])


def load_samples(
    path: str | Path,
    tokenizer: Any,
    config: Any,
    *,
    max_length: int | None = None,
    too_long: str = "error",
    cwd: str | Path | None = None,
    speech_codes: Callable[[], CodeStore] | None = None,
    limit_flag: str = "--model-max-length",
    options: SourceOptions | None = None,
    skip_bad: bool = False,
) -> LoadedData:
    """Read and check the whole data set (any format `data.sources` reads, `options` saying how);
    raise one DataError listing every problem (file:line). With `skip_bad`, rows the source itself
    cannot turn into a conversation (unreadable audio, empty transcript ...) are left out and counted.

    With `speech_codes` (called only when some audio message lacks audio_tokens, so the speech
    tokenizer loads only then), those messages get their codes from it (each file once, cached like
    features) instead of being a problem."""
    from kimi_lora_cli.data.sources import open_source

    if too_long not in TOO_LONG_POLICIES:
        raise DataError(f"too-long policy {too_long!r} is unknown; use error, skip or truncate")
    source = open_source(str(path), options)
    path = Path(source.label)
    jsonl_dir = source.base_dir
    cwd = Path(cwd) if cwd is not None else Path.cwd()
    probe = AudioProbe()
    problems: list[tuple[int, str]] = []  # (line, message): reported in line order
    checked: list[tuple[str, dict[str, Any], LineCheck]] = []
    lines = skipped_bad = 0
    for rec in source:
        lineno, where, obj, error = rec.number, rec.where, rec.obj, rec.error
        lines += 1
        if error is not None and skip_bad and source.format != "jsonl":
            skipped_bad += 1
            continue
        if error is not None:
            problems.append((lineno, f"{where}: {error}"))
            if lines == NOT_JSONL_AFTER and len(problems) == lines and all(
                    "invalid JSON" in p or "not UTF-8" in p for _, p in problems):
                raise DataError(f"{path}: not a jsonl file (its first {lines} lines are not JSON objects); "
                                "pass the jsonl with one conversation per line")
            continue
        chk = check_record(obj, jsonl_dir, config.kimia_token_offset, config.vocab_size, line=lineno,
                           speech_tokenizer=speech_codes is not None, probe=probe, cwd=cwd)
        if chk.problems:
            problems.extend((lineno, f"{where}: {p}") for p in chk.problems)
        else:
            checked.append((where, obj, chk))
    tokenized = 0
    cwd_paths = len({ref.path for _, _, chk in checked for ref in chk.audios if ref.via_cwd})
    needed = [ref for _, _, chk in checked for ref in chk.audios if ref.needs_tokens]
    if needed and not problems:  # the speech tokenizer runs only on data that is otherwise sound
        paths = list(dict.fromkeys(ref.path for ref in needed))
        found = dict(zip(paths, speech_codes().codes(paths)))
        for _, obj, chk in checked:
            for ref in chk.audios:
                if ref.needs_tokens:
                    obj["conversation"][ref.index]["audio_tokens"] = found[ref.path]
        tokenized = len(paths)
    samples: list[Sample] = []
    skipped = truncated = 0
    for where, obj, chk in checked:
        if problems and any(ref.needs_tokens for ref in chk.audios):
            continue  # no codes yet: the length checks wait for a clean file
        task = obj.get("task_type", "understanding")
        output_type = output_type_for_task(task)
        try:
            seq = tokenize_conversation(obj["conversation"], tokenizer, config, output_type=output_type)
        except ConversationError as e:
            problems.append((chk.line, f"{where}: {e}"))
            continue
        if not has_loss(seq):
            problems.append((chk.line, f"{where}: nothing to learn (no trained token in the assistant messages); "
                                        "add the assistant's answer or drop the line"))
            continue
        cut = False
        if max_length is not None and len(seq) > max_length:
            if too_long == "error":
                problems.append((chk.line,
                                 f"{where}: {len(seq)} tokens, longer than {limit_flag} {max_length}; raise "
                                 "it, or pass --too-long skip (drop such lines) or --too-long truncate"))
                continue
            if too_long == "skip":
                skipped += 1
                continue
            seq = truncate(seq, max_length)
            if not has_loss(seq):
                skipped += 1
                continue
            truncated += 1
            cut = True
        audio = [ref.path for ref in chk.audios if ref.continuous]
        conversation = [dict(m) for m in obj["conversation"]]
        for ref in chk.audios:
            if ref.continuous:
                conversation[ref.index]["content"] = str(ref.path.resolve())
        samples.append(Sample(line=chk.line, source=path, task_type=task, output_type=output_type, seq=seq,
                              audio=audio[: len(seq.media)], truncated=cut, conversation=conversation,
                              location=where))
    if problems:
        problems = [p for _, p in sorted(problems, key=lambda item: item[0])]
        shown = problems[:MAX_LISTED_PROBLEMS]
        more = len(problems) - len(shown)
        head = (f"{path}: {len(problems)} problem{'s' if len(problems) > 1 else ''} in the training data "
                "(fix them and rerun):")
        raise DataError("\n".join([head, *("  " + p for p in shown)] + ([f"  ... and {more} more"] if more else [])))
    if not samples:
        reason = f" ({skipped} longer than {limit_flag} {max_length} were skipped)" if skipped else ""
        raise DataError(f"{path}: no usable samples{reason}; the file needs at least one conversation")
    return LoadedData(samples=samples, path=path, lines=lines, skipped_too_long=skipped, truncated=truncated,
                      audio_tokenized=tokenized, cwd_paths=cwd_paths, skipped_bad=skipped_bad, format=source.format)
