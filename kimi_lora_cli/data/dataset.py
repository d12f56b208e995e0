"""Checked samples + cached Whisper features -> ready micro-batches."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kimi_lora_cli.data.collate import collate
from kimi_lora_cli.data.features import FeatureStore
from kimi_lora_cli.data.schema import Sample


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
        chosen = [self.samples[i] for i in indices]
        rows = None
        paths = [p for s in chosen for p in s.audio]
        if paths:
            if self.store is None:
                raise ValueError("samples hold audio but the dataset has no feature store")
            flat = self.store.rows(paths)
            rows, k = [], 0
            for s in chosen:
                rows.append(flat[k : k + len(s.audio)])
                k += len(s.audio)
        return collate(chosen, self.pad_id, self.feature_dim, rows)
