"""Whisper feature rows per audio file, computed once and cached (memory, optionally disk).

Whisper is frozen in every training mode here, so a file's rows never change during a run: they are
keyed by the file's content hash plus a fingerprint of the encoder (weights and dtype), kept in memory
up to a byte budget (least recently used leave first) and, with `cache_dir`, written as safetensors
files that later runs and resumed runs reuse. Misses of one micro-batch are encoded together.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass
class CacheStats:
    hits: int = 0
    disk_hits: int = 0
    computed: int = 0
    seconds_computing: float = 0.0


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def encoder_fingerprint(encoder: Any) -> str:
    """Short hash of the Whisper weights' first layer plus dtype and geometry."""
    import torch

    conv = encoder.encoder.conv1.weight.detach()
    h = hashlib.sha256()
    h.update(f"{conv.dtype}|{encoder.row_dim}|{encoder.n_mels}|{tuple(conv.shape)}".encode())
    h.update(conv.to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class FeatureStore:
    """`rows(paths)` -> one [rows, dim] CPU tensor per file, computing only what is not cached."""

    def __init__(self, encoder: Any, cache_dir: str | Path | None = None,
                 memory_budget_bytes: int = 4 << 30) -> None:
        self.encoder = encoder
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.memory_budget = memory_budget_bytes
        self.fingerprint = encoder_fingerprint(encoder)
        self.stats = CacheStats()
        self._memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._memory_bytes = 0
        self._digests: dict[tuple[str, int, int], str] = {}

    def key(self, path: Path) -> str:
        st = path.stat()
        stamp = (str(path), st.st_size, st.st_mtime_ns)
        digest = self._digests.get(stamp)
        if digest is None:
            digest = self._digests[stamp] = file_digest(path)
        return f"{digest[:32]}-{self.fingerprint}"

    def _remember(self, key: str, rows: torch.Tensor) -> None:
        if key in self._memory:
            self._memory.move_to_end(key)
            return
        size = rows.numel() * rows.element_size()
        if size > self.memory_budget:
            return
        self._memory[key] = rows
        self._memory_bytes += size
        while self._memory_bytes > self.memory_budget:
            _, old = self._memory.popitem(last=False)
            self._memory_bytes -= old.numel() * old.element_size()

    def _disk_file(self, key: str) -> Path | None:
        return self.cache_dir / key[:2] / f"{key}.safetensors" if self.cache_dir else None

    def _read_disk(self, key: str) -> torch.Tensor | None:
        f = self._disk_file(key)
        if f is None or not f.is_file():
            return None
        from safetensors.torch import load_file

        try:
            return load_file(str(f))["rows"]
        except Exception:  # a damaged cache file is recomputed, never trusted
            return None

    def _write_disk(self, key: str, rows: torch.Tensor) -> None:
        f = self._disk_file(key)
        if f is None:
            return
        from safetensors.torch import save_file

        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_name(f"{f.name}.{os.getpid()}.tmp")
        save_file({"rows": rows.contiguous()}, str(tmp))
        os.replace(tmp, f)

    def rows(self, paths: list[Path]) -> list[torch.Tensor]:
        import time

        from kimi_lora_cli.data.audio import AudioError, load_audio
        from kimi_lora_cli.errors import DataError

        keys = [self.key(p) for p in paths]
        found: dict[str, torch.Tensor] = {}
        todo: dict[str, Path] = {}
        for p, k in zip(paths, keys):
            if k in found or k in todo:
                continue
            if k in self._memory:
                self._memory.move_to_end(k)
                found[k] = self._memory[k]
                self.stats.hits += 1
                continue
            cached = self._read_disk(k)
            if cached is not None:
                found[k] = cached
                self._remember(k, cached)
                self.stats.disk_hits += 1
                continue
            todo[k] = p
        if todo:
            start = time.perf_counter()
            waves = []
            for p in todo.values():
                try:
                    waves.append(load_audio(p))
                except AudioError as e:
                    raise DataError(f"{e}; fix or remove the lines that use it") from None
            computed = self.encoder.encode_batch(waves)
            for (k, _), rows in zip(todo.items(), computed):
                rows = rows.detach().to("cpu")
                found[k] = rows
                self._remember(k, rows)
                self._write_disk(k, rows)
            self.stats.computed += len(todo)
            self.stats.seconds_computing += time.perf_counter() - start
        return [found[k] for k in keys]
