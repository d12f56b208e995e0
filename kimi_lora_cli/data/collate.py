"""Micro-batches: right padding, attention mask, continuous features, shifted labels and loss masks.

Every sample keeps exactly the tensors it would have alone (padding sits after its last token and is
masked out of attention and of both losses), so the batched loss equals the mean of per-sample losses.
With packing (`collate_packed`) several samples share a row, kept apart by `sequence_ids`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kimi_lora_cli.data.conversation import place_features
from kimi_lora_cli.data.samples import Sample

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
    return _rows([[s] for s in samples], pad_id, feature_dim, feature_rows, feature_dtype, packed=False)


def collate_packed(
    rows: list[list[Sample]],
    pad_id: int,
    feature_dim: int,
    feature_rows: list[list[torch.Tensor]] | None = None,
    feature_dtype: torch.dtype | None = None,
    length: int | None = None,
) -> dict[str, Any]:
    """Packed rows: `rows[r]` are the samples laid end to end in row r ([R, L], L = `length` or, when
    longer, the longest row).

    Each sample keeps exactly its own streams, labels and masks (its last position predicts nothing, so
    no label links two samples); `sequence_ids` numbers the samples 0..S-1 in row order (-1 on
    padding) and tells the model where one sample ends and the loss which sample a position belongs to.
    `feature_rows` follows the samples in that order."""
    return _rows(rows, pad_id, feature_dim, feature_rows, feature_dtype, packed=True, length=length)


def _rows(rows: list[list[Sample]], pad_id: int, feature_dim: int, feature_rows: list[list[torch.Tensor]] | None,
          feature_dtype: torch.dtype | None, packed: bool, length: int | None = None) -> dict[str, Any]:
    import torch

    length = max(length or 0, max(sum(len(s) for s in row) for row in rows))
    bsz = len(rows)
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
    if packed:
        out["sequence_ids"] = torch.full((bsz, length), -1, dtype=torch.long)
    samples = [s for row in rows for s in row]
    any_features = any(any(s.seq.is_continuous) for s in samples)
    features = None
    if any_features:
        if feature_rows is None:
            raise ValueError("samples have audio spans but no feature rows were given")
        dtype = feature_dtype or next(r.dtype for rows_ in feature_rows for r in rows_)
        features = torch.zeros((bsz, length, feature_dim), dtype=dtype)
    k = 0
    for b, row in enumerate(rows):
        start = 0
        for s in row:
            seq, n = s.seq, len(s)
            end = start + n
            labels = seq.labels(pad_id)
            out["input_ids"][b, start:end] = torch.tensor(seq.audio_ids)
            out["text_input_ids"][b, start:end] = torch.tensor(seq.text_ids)
            out["attention_mask"][b, start:end] = 1
            out["is_continuous_mask"][b, start:end] = torch.tensor(seq.is_continuous)
            out["audio_labels"][b, start:end] = torch.tensor(labels["audio_labels"])
            out["text_labels"][b, start:end] = torch.tensor(labels["text_labels"])
            out["audio_loss_mask"][b, start:end] = torch.tensor(labels["audio_loss_mask"])
            out["text_loss_mask"][b, start:end] = torch.tensor(labels["text_loss_mask"])
            if packed:
                out["sequence_ids"][b, start:end] = k
            if features is not None and seq.media:
                features[b, start:end] = place_features(seq, feature_rows[k], feature_dim).to(features.dtype)
            start, k = end, k + 1
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
