"""Checked samples + cached Whisper features -> ready micro-batches."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kimi_lora_cli.data.collate import collate, collate_packed
from kimi_lora_cli.data.features import FeatureStore
from kimi_lora_cli.data.samples import Sample


class KimiDataset:
    """Indexable samples; `batch(indices)` collates them with their features (computed at most once)."""

    def __init__(self, samples: Sequence[Sample], pad_id: int, feature_dim: int, store: FeatureStore | None) -> None:
        self.samples = list(samples)
        self.pad_id = pad_id
        self.feature_dim = feature_dim
        self.store = store

    def __len__(self) -> int:
        return len(self.samples)

    def lengths(self) -> list[int]:
        return [len(s) for s in self.samples]

    def batch(self, indices: Sequence[int]) -> dict[str, Any]:
        """Padded micro-batch of `indices`; packed rows when `indices` carries `.rows` (the packing
        plan's micro-batches: a list of the samples that also says which ones share a row)."""
        rows = getattr(indices, "rows", None)
        if rows is not None:
            return self.batch_rows(rows, getattr(indices, "length", None))
        return self._collate([[i] for i in indices], packed=False)

    def batch_rows(self, rows: Sequence[Sequence[int]], length: int | None = None) -> dict[str, Any]:
        """Packed micro-batch: `rows[r]` are the samples laid end to end in row r, rows padded to
        `length` (at least the longest row)."""
        return self._collate(rows, packed=True, length=length)

    def _collate(self, rows: Sequence[Sequence[int]], packed: bool, length: int | None = None) -> dict[str, Any]:
        chosen = [[self.samples[i] for i in row] for row in rows]
        flat_samples = [s for row in chosen for s in row]
        feature_rows = None
        paths = [p for s in flat_samples for p in s.audio]
        if paths:
            if self.store is None:
                raise ValueError("samples hold audio but the dataset has no feature store")
            flat = self.store.rows(paths)
            feature_rows, k = [], 0
            for s in flat_samples:
                feature_rows.append(flat[k : k + len(s.audio)])
                k += len(s.audio)
        if packed:
            return collate_packed(chosen, self.pad_id, self.feature_dim, feature_rows, length=length)
        return collate(flat_samples, self.pad_id, self.feature_dim, feature_rows)
