"""Micro-batches: right padding, attention mask, continuous features, shifted labels and loss masks.

Every sample keeps exactly the tensors it would have alone (padding sits after its last token and is
masked out of attention and of both losses), so the batched loss equals the mean of per-sample losses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kimi_lora_cli.data.conversation import place_features
from kimi_lora_cli.data.schema import Sample

if TYPE_CHECKING:
    import torch

BATCH_KEYS = ("input_ids", "text_input_ids", "attention_mask", "is_continuous_mask", "audio_labels",
              "text_labels", "audio_loss_mask", "text_loss_mask")


def collate(
    samples: list[Sample],
    pad_id: int,
    feature_dim: int,
    feature_rows: list[list[torch.Tensor]] | None = None,
    feature_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Stack `samples` into [B, L] tensors (L = longest sample); `feature_rows[b][k]` are the Whisper
    rows of sample b's k-th audio span. `continuous_features` is [B, L, feature_dim] or None."""
    import torch

    length = max(len(s) for s in samples)
    bsz = len(samples)
    out = {
        "input_ids": torch.full((bsz, length), pad_id, dtype=torch.long),
        "text_input_ids": torch.full((bsz, length), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros((bsz, length), dtype=torch.long),
        "is_continuous_mask": torch.zeros((bsz, length), dtype=torch.bool),
        "audio_labels": torch.full((bsz, length), pad_id, dtype=torch.long),
        "text_labels": torch.full((bsz, length), pad_id, dtype=torch.long),
        "audio_loss_mask": torch.zeros((bsz, length), dtype=torch.bool),
        "text_loss_mask": torch.zeros((bsz, length), dtype=torch.bool),
    }
    any_features = any(any(s.seq.is_continuous) for s in samples)
    features = None
    if any_features:
        if feature_rows is None:
            raise ValueError("samples have audio spans but no feature rows were given")
        dtype = feature_dtype or next(r.dtype for rows in feature_rows for r in rows)
        features = torch.zeros((bsz, length, feature_dim), dtype=dtype)
    for b, s in enumerate(samples):
        seq, n = s.seq, len(s)
        labels = seq.labels(pad_id)
        out["input_ids"][b, :n] = torch.tensor(seq.audio_ids)
        out["text_input_ids"][b, :n] = torch.tensor(seq.text_ids)
        out["attention_mask"][b, :n] = 1
        out["is_continuous_mask"][b, :n] = torch.tensor(seq.is_continuous)
        out["audio_labels"][b, :n] = torch.tensor(labels["audio_labels"])
        out["text_labels"][b, :n] = torch.tensor(labels["text_labels"])
        out["audio_loss_mask"][b, :n] = torch.tensor(labels["audio_loss_mask"])
        out["text_loss_mask"][b, :n] = torch.tensor(labels["text_loss_mask"])
        if features is not None and seq.media:
            features[b, :n] = place_features(seq, feature_rows[b], feature_dim).to(features.dtype)
    out["continuous_features"] = features
    return out


def batch_to(batch: dict[str, Any], device: Any, feature_dtype: Any = None) -> dict[str, Any]:
    out = {}
    for k, v in batch.items():
        if v is None:
            out[k] = None
        elif k == "continuous_features" and feature_dtype is not None:
            out[k] = v.to(device=device, dtype=feature_dtype, non_blocking=True)
        else:
            out[k] = v.to(device, non_blocking=True)
    return out
