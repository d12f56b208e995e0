"""LibriSpeech-like ASR samples for the packing benchmarks (CPU and GPU): realistic lengths, random ids.

Durations are drawn from a histogram shaped like LibriSpeech's training utterances (about 1 to 35 s,
most of them 12-17 s, mean about 12.5 s); each sample is an ASR conversation laid out like
`kimi-lora train` lays it out (user instruction, media_begin, one audio code per 80 ms with its
Whisper row, media_end, ct, msg_end, assistant transcript at ~3.6 BPE tokens per second of speech
with text loss, eos, msg_end). Token ids and Whisper rows are random: only the lengths matter here.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

# (seconds from, seconds to): share of utterances. "train-clean": LibriSpeech's training utterances
# (segmented to <= 35 s, most 12-17 s, mean ~12.5 s). "dev-clean": its dev/test sets (and typical
# fine-tuning sets of short prompts and answers): mostly 2-10 s with a long tail, mean ~8 s, median ~6 s.
DEV_CLEAN_HISTOGRAM = [
    ((1, 2), 6.0), ((2, 4), 21.0), ((4, 6), 21.0), ((6, 8), 15.0), ((8, 10), 10.0), ((10, 12), 7.0),
    ((12, 14), 5.5), ((14, 16), 4.5), ((16, 20), 4.5), ((20, 25), 3.0), ((25, 30), 1.5), ((30, 35), 0.6),
]
DURATION_HISTOGRAM = [
    ((1, 2), 1.5), ((2, 4), 3.0), ((4, 6), 4.0), ((6, 8), 5.0), ((8, 10), 6.0), ((10, 12), 9.0),
    ((12, 14), 18.0), ((14, 16), 30.0), ((16, 18), 13.0), ((18, 20), 4.0), ((20, 25), 3.5), ((25, 30), 2.0),
    ((30, 35), 1.0),
]
CODES_PER_SECOND = 12.5
TEXT_TOKENS_PER_SECOND = 3.6  # read speech: ~2.7 words/s, ~1.35 BPE tokens per word
INSTRUCTION_TOKENS = 10


def durations(n: int, seed: int = 0, kind: str = "train-clean") -> list[float]:
    rng = random.Random(seed)
    histogram = {"train-clean": DURATION_HISTOGRAM, "dev-clean": DEV_CLEAN_HISTOGRAM}[kind]
    bins = [b for b, _ in histogram]
    weights = [w for _, w in histogram]
    return [rng.uniform(*rng.choices(bins, weights)[0]) for _ in range(n)]


class RowStore:
    """Precomputed Whisper rows by path: what FeatureStore serves from memory after the first epoch."""

    def __init__(self) -> None:
        self.table: dict[Path, Any] = {}

    def rows(self, paths):
        return [self.table[p] for p in paths]


def asr_samples(n: int, config: Any, seed: int = 0, feature_dtype: Any = None, kind: str = "train-clean"):
    """(samples, RowStore, longest sample in tokens) for `n` LibriSpeech-like utterances."""
    import torch

    from kimi_lora_cli.data.conversation import MediaSpan, TokenizedConversation
    from kimi_lora_cli.data.samples import Sample

    rng = random.Random(seed + 1)
    gen = torch.Generator().manual_seed(seed)
    text_hi = min(config.kimia_media_begin, config.kimia_token_offset) - 16
    blank, user, assistant, ct, msg_end, eos = (text_hi + k for k in range(6))
    store = RowStore()
    samples = []
    for i, sec in enumerate(durations(n, seed, kind)):
        codes = max(1, math.ceil(sec * CODES_PER_SECOND))
        words = max(1, round(sec * TEXT_TOKENS_PER_SECOND * rng.uniform(0.8, 1.2)))
        seq = TokenizedConversation()
        seq._push(user, blank)
        for _ in range(INSTRUCTION_TOKENS):
            seq._push(blank, rng.randrange(text_hi))
        seq._push(config.kimia_media_begin, blank)
        seq.media.append(MediaSpan(start=len(seq), length=codes, audio=f"clip_{i}", message_index=1))
        for _ in range(codes):
            seq._push(rng.randrange(config.kimia_token_offset, config.vocab_size), blank, cont=True)
        seq._push(config.kimia_media_end, blank)
        seq._push(ct, blank)
        seq._push(msg_end, blank)
        seq._push(assistant, blank)
        for _ in range(words):
            seq._push(blank, rng.randrange(text_hi), t_loss=True)
        seq._push(blank, eos, t_loss=True)
        seq._push(msg_end, blank)
        path = Path(f"clip_{i}.wav")
        rows = torch.randn((codes, config.kimia_adaptor_input_dim), generator=gen)
        store.table[path] = rows.to(feature_dtype) if feature_dtype is not None else rows
        samples.append(Sample(line=i + 1, source=Path("librispeech-like.jsonl"), task_type="understanding",
                              output_type="text", seq=seq, audio=[path]))
    return samples, store, max(len(s) for s in samples)
