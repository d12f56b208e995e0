"""Cached Whisper continuous features, keyed by the audio file's content (written by `prepare`).

Layout: `DIR/<sha256 of the audio file's bytes>.safetensors`, one tensor named `features` of shape
[rows, 4 * d_model] (rows = 1 per 1280 samples per 30 s piece, the same count as the file's
semantic codes; 5120 columns for Whisper-large-v3), in the encoder's dtype. The header metadata
holds `samples` (16 kHz length), `rows`, `whisper` (the encoder folder) and `whisper_fingerprint`
(`encoder_fingerprint()` of the encoder that made it): a reader compares the fingerprint with its
own encoder and ignores entries made by another one. Files are written to a temporary name and
renamed, so a present file is always complete.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

TENSOR_NAME = "features"


def file_sha256(path: str | Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def cache_file(cache_dir: str | Path, digest: str) -> Path:
    return Path(cache_dir) / f"{digest}.safetensors"


def encoder_fingerprint(encoder: Any) -> str:
    """Short id of a WhisperFeatureEncoder's weights (hash of its first convolution)."""
    import torch

    w = encoder.encoder.conv1.weight.detach().to("cpu", torch.float32).contiguous()
    return hashlib.sha256(w.numpy().tobytes()).hexdigest()[:16]


def read_metadata(path: Path) -> dict[str, str] | None:
    """Header metadata of a cache entry, or None when the file is absent or unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            if TENSOR_NAME not in f.keys():
                return None
            return dict(f.metadata() or {})
    except Exception:  # a broken entry counts as absent and is rewritten
        return None


def load_features(cache_dir: str | Path, audio_path: str | Path, fingerprint: str | None = None,
                  digest: str | None = None) -> torch.Tensor | None:
    """The cached [rows, dim] features of `audio_path`, or None (absent, broken, other encoder)."""
    from safetensors.torch import load_file

    path = cache_file(cache_dir, digest or file_sha256(audio_path))
    meta = read_metadata(path)
    if meta is None or (fingerprint and meta.get("whisper_fingerprint") != fingerprint):
        return None
    return load_file(str(path))[TENSOR_NAME]


def save_features(cache_dir: str | Path, digest: str, features: torch.Tensor, *, samples: int,
                  whisper: str, fingerprint: str) -> Path:
    from safetensors.torch import save_file

    path = cache_file(cache_dir, digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    meta = {"format": "pt", "samples": str(samples), "rows": str(features.shape[0]), "whisper": whisper,
            "whisper_fingerprint": fingerprint}
    save_file({TENSOR_NAME: features.detach().to("cpu").contiguous()}, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path
