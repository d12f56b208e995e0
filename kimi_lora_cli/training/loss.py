"""The official Kimi-Audio loss, computed per sample so a micro-batch equals the mean of its samples.

Per sample: text CE (lm_head) over its masked positions divided by (mask sum + 1e-4), the same for
audio (mimo_output); total = text_weight * text + audio_weight * audio. The heads run only on masked
rows (`text_logits_mask` / `audio_logits_mask`), which is what makes large vocabularies affordable.
In a packed batch (`sequence_ids`) a sample is a run of positions, not a row; the per-sample values
are the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

EPS = 1e-4


@dataclass
class LossParts:
    total: torch.Tensor  # [S] per-sample weighted loss (differentiable), one per sample (= row unless packed)
    text: torch.Tensor  # [B] per-sample text loss (detached)
    audio: torch.Tensor  # [B] per-sample audio loss (detached)
    tokens: int  # real (non-padding) positions


def _per_sample(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, sample_of: torch.Tensor,
                n: int) -> torch.Tensor:
    """Masked CE summed per sample / (mask count + EPS). `logits` holds only the masked rows;
    `sample_of` [B, L] says which sample each position belongs to."""
    sample_of_row = sample_of[mask]
    ce = F.cross_entropy(logits.float(), labels[mask], reduction="none")
    sums = torch.zeros(n, dtype=ce.dtype, device=ce.device).index_add(0, sample_of_row, ce)
    counts = torch.zeros(n, dtype=ce.dtype, device=ce.device).index_add(0, sample_of_row, torch.ones_like(ce))
    return sums / (counts + EPS)


def model_forward(model: Any, batch: dict[str, Any]):
    return model(
        input_ids=batch["input_ids"],
        text_input_ids=batch["text_input_ids"],
        is_continuous_mask=batch["is_continuous_mask"],
        continuous_features=batch.get("continuous_features"),
        attention_mask=batch["attention_mask"],
        sequence_ids=batch.get("sequence_ids"),
        text_logits_mask=batch["text_loss_mask"],
        audio_logits_mask=batch["audio_loss_mask"],
    )


def samples_of(batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
    """([B, L] sample number of every position, number of samples): a packed batch's `sequence_ids`,
    else the batch row."""
    ids = batch.get("sequence_ids")
    if ids is not None:
        return ids, int(ids.max()) + 1
    bsz, length = batch["input_ids"].shape
    return torch.arange(bsz, device=batch["input_ids"].device)[:, None].expand(bsz, length), bsz


def compute_loss(model: Any, batch: dict[str, Any], text_weight: float = 1.0, audio_weight: float = 1.0) -> LossParts:
    out = model_forward(model, batch)
    sample_of, n = samples_of(batch)
    text = _per_sample(out.text_logits, batch["text_labels"], batch["text_loss_mask"], sample_of, n)
    audio = _per_sample(out.audio_logits, batch["audio_labels"], batch["audio_loss_mask"], sample_of, n)
    total = text_weight * text + audio_weight * audio
    return LossParts(total=total, text=text.detach(), audio=audio.detach(),
                     tokens=int(batch["attention_mask"].sum()))
