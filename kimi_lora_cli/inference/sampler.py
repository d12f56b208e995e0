"""Token sampler of the official Kimi-Audio inference loop (one per stream, own parameters).

Rules (reference document, section 5), applied to last-position logits [B, V]:
  1. repetition penalty, only when `repetition_penalty > 1` and the stream's generated history
     is longer than `repetition_window`: over the ids of the last `window` tokens, positive
     logits are divided by the penalty and negative ones multiplied (once per distinct id);
  2. log_softmax in float32;
  3. temperature > 1e-6: log-probs divided by the temperature, then a multinomial draw over the
     top-k probabilities when `top_k > 0`, else over the full distribution;
  4. otherwise greedy argmax.
Draws use one `torch.Generator` per batch row, so a sample's sampled output does not depend on
which other samples share its batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

GREEDY_EPS = 1e-6


@dataclass(frozen=True)
class SamplingParams:
    """Sampling parameters of one stream. Defaults are the official `generate()` defaults (greedy)."""

    temperature: float = 0.0
    top_k: int = 5
    repetition_penalty: float = 1.0
    repetition_window: int = 64

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, not {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = no top-k), not {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition penalty must be > 0, not {self.repetition_penalty}")
        if self.repetition_window < 0:
            raise ValueError(f"repetition window must be >= 0, not {self.repetition_window}")

    @property
    def greedy(self) -> bool:
        return self.temperature <= GREEDY_EPS


# Official defaults: text window 16, audio window 64 (both unused while the penalty is 1.0).
TEXT_DEFAULTS = SamplingParams(temperature=0.0, top_k=5, repetition_penalty=1.0, repetition_window=16)
AUDIO_DEFAULTS = SamplingParams(temperature=0.0, top_k=5, repetition_penalty=1.0, repetition_window=64)


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor | None, penalty: float,
                             window: int) -> torch.Tensor:
    """Penalised copy of `logits` [B, V]; `history` [B, T] holds the ids generated so far."""
    if penalty <= 1.0 or history is None or history.shape[-1] <= window:
        return logits
    recent = history[:, history.shape[-1] - window :].long()
    scores = logits.gather(1, recent)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.scatter(1, recent, scores)


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    history: torch.Tensor | None = None,
    generators: Sequence[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """Next token ids [B] from `logits` [B, V] (or [B, 1, V]) by the official sampler rules."""
    if logits.dim() == 3:
        logits = logits[:, -1]
    logits = apply_repetition_penalty(logits, history, params.repetition_penalty, params.repetition_window)
    logprobs = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
    if params.greedy:
        return logprobs.argmax(dim=-1)
    probs = (logprobs / params.temperature).exp()
    if params.top_k > 0:
        probs, candidates = probs.topk(min(params.top_k, probs.shape[-1]), dim=-1)
    else:
        candidates = None
    rows = []
    for r in range(probs.shape[0]):
        gen = generators[r] if generators is not None else None
        rows.append(torch.multinomial(probs[r : r + 1], 1, generator=gen))
    picked = torch.cat(rows, dim=0)  # [B, 1]
    if candidates is not None:
        picked = candidates.gather(-1, picked)
    return picked.squeeze(-1)
