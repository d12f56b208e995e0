"""What a data set holds, in numbers: `prepare`'s summary table (samples, hours, clip durations,
tokens per sample, samples over the length limit, clips over 30 s, skipped rows by reason, packed-row fill).

Only a float and an int per sample are kept (never the rows), so a 100,000-row source is summed up
in a few megabytes."""

from __future__ import annotations

import re
from array import array
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

PIECE_SECONDS = 30.0


def _quantile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    k = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return float(sorted_values[k])


def reason_of(message: str) -> str:
    """A problem's kind, for counting: the message without its row's names and numbers."""
    text = re.sub(r"^message \d+: ", "", message)
    text = re.sub(r"'[^']*'|\"[^\"]*\"|`[^`]*`", "…", text)
    text = re.sub(r"\d+(\.\d+)?", "N", text)
    return text.split(";")[0].strip()


@dataclass
class DataSummary:
    label: str
    format: str
    limit: int | None = None  # --model-max-length
    samples: int = 0
    seconds: array = field(default_factory=lambda: array("d"))  # one per audio clip
    tokens: array = field(default_factory=lambda: array("l"))  # one per sample (0: not counted)
    skipped: Counter = field(default_factory=Counter)

    def add(self, clip_seconds: list[float], tokens: int | None) -> None:
        self.samples += 1
        self.seconds.extend(clip_seconds)
        if tokens is not None:
            self.tokens.append(tokens)

    def skip(self, message: str) -> None:
        self.skipped[reason_of(message)] += 1

    def as_dict(self) -> dict[str, Any]:
        secs = sorted(self.seconds)
        toks = sorted(self.tokens)
        fill = None
        if toks and self.limit:
            from kimi_lora_cli.training.plan import pack_rows

            fitting = [t for t in toks if t <= self.limit]
            if fitting:
                rows = pack_rows(list(range(len(fitting))), fitting, self.limit)
                fill = sum(fitting) / (len(rows) * self.limit)
        return {
            "input": self.label, "format": self.format, "samples": self.samples,
            "hours": sum(secs) / 3600, "clips": len(secs),
            "duration_s": {"min": secs[0] if secs else 0.0, "median": _quantile(secs, 0.5),
                           "p95": _quantile(secs, 0.95), "max": secs[-1] if secs else 0.0},
            "tokens_per_sample": {"median": int(_quantile(toks, 0.5)), "max": int(toks[-1]) if toks else 0}
            if toks else None,
            "model_max_length": self.limit,
            "over_max_length": sum(1 for t in toks if self.limit and t > self.limit),
            "clips_over_30s": sum(1 for s in secs if s > PIECE_SECONDS),
            "skipped": sum(self.skipped.values()),
            "skipped_reasons": dict(self.skipped.most_common()),
            "packed_fill": fill,
        }


def sequence_length(conversation: list[dict[str, Any]], samples: dict[int, int], tokenizer: Any, config: Any,
                    output_type: str) -> int:
    """Tokens of a conversation as training lays it out, audio messages counted from their clip's
    length (the codes need not be computed yet): `samples[i]` is message i's 16 kHz length."""
    from kimi_lora_cli.data.conversation import tokenize_conversation
    from kimi_lora_cli.models.kimi_audio.whisper import rows_for_samples

    messages = []
    for i, m in enumerate(conversation):
        m = dict(m)
        if m.get("message_type") in ("audio", "audio-text") and not m.get("audio_tokens"):
            m["audio_tokens"] = [config.kimia_token_offset] * max(1, rows_for_samples(samples.get(i, 0)))
        messages.append(m)
    return len(tokenize_conversation(messages, tokenizer, config, output_type=output_type))
