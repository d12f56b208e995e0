"""What frozen audio models make of each audio file (Whisper features, speech codes), computed once.

Both stores key a file by the sha256 of its bytes, keep results in memory up to a byte budget
(least recently used leave first) and, given `cache_dir`, on disk, where `kimi-lora prepare
--cache-features DIR` and `kimi-lora train --feature-cache-dir DIR` share them:

  DIR/<sha256>.safetensors        tensor `features` [rows, 4 * d_model] (Whisper rows, 12.5 Hz)
  DIR/<sha256>.codes.safetensors  tensor `codes` [n] int32 (GLM-4-Voice codes, no offset)

The header metadata holds `samples` (16 kHz length), `rows`, the model folder and its
`fingerprint()` (`whisper_fingerprint` / `speech_tokenizer_fingerprint`): an entry made by other
weights is ignored and recomputed. The fingerprint covers weights, not dtype, so features made in
bfloat16 serve a float32 run (cast on read) and the other way round. `resampler` (data/audio.py's
RESAMPLER) names how the file was brought to 16 kHz: an entry without it (written before soxr
replaced the hand-written resampler) or with another one is recomputed, unless the file is at
16 kHz already, where no version resampled anything. Files are written to a temporary name and
renamed, so a present file is complete; a damaged one is recomputed.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kimi_lora_cli.data.audio import RESAMPLER, TARGET_SR
from kimi_lora_cli.errors import ConfigError, DataError
from kimi_lora_cli.fileops import naming_errors

if TYPE_CHECKING:
    import numpy as np
    import torch


def file_sha256(path: str | Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


FINGERPRINT_SAMPLES = 4096


def fingerprint(module: torch.nn.Module) -> str:
    """Short id of a model's weights: every tensor's name and shape, plus up to 4096 evenly spaced
    float32 values of each (two models that differ in any layer differ here; dtype does not count,
    so features made in bf16 serve a float32 run). Cheap even for Whisper-large-v3."""
    import torch

    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // FINGERPRINT_SAMPLES)
        sample = flat[::step][:FINGERPRINT_SAMPLES].to("cpu", torch.float32).contiguous()
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def _same_waveform(meta: Mapping[str, str], path: Path) -> bool:
    """Was the entry made from the 16 kHz waveform load_audio gives today? Yes when the same
    resampler made it. An older entry stands only for a file at 16 kHz (nothing was resampled and
    the channel mean never changed) that is not mp3 (earlier versions decoded mp3 after a seek,
    one float32 step off at places). Only the header is read."""
    if meta.get("resampler") == RESAMPLER:
        return True
    import soundfile as sf

    try:
        info = sf.info(str(path))
    except Exception:  # unreadable now: recomputing names the problem (load_audio's message)
        return False
    return info.samplerate == TARGET_SR and info.format != "MP3"


@dataclass
class CacheStats:
    hits: int = 0  # found in memory
    disk_hits: int = 0  # read from cache_dir
    computed: int = 0  # files run through the model
    seconds_computing: float = 0.0


class _AudioStore:
    """Per-file results of one frozen model, by content hash: memory, then disk, then the model."""

    tensor_name = ""
    suffix = ".safetensors"
    model_key = ""  # metadata key of the fingerprint

    def __init__(self, model: Any, fingerprint_: str, cache_dir: str | Path | None, memory_budget_bytes: int,
                 batch_size: int) -> None:
        self.model = model
        self.fingerprint = fingerprint_
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.memory_budget = memory_budget_bytes
        self.batch_size = batch_size
        self.stats = CacheStats()
        self._memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._memory_bytes = 0
        self._digests: dict[tuple[str, int, int], str] = {}
        self._clean_dead_tmp()

    def _clean_dead_tmp(self) -> None:
        """Remove `.<sha256><suffix>.<pid>.tmp` files that killed runs of this tool left in the cache."""
        if self.cache_dir is None or not self.cache_dir.is_dir():
            return
        from kimi_lora_cli.outputs import pid_alive

        pattern = re.compile(rf"^\.[0-9a-f]{{64}}{re.escape(self.suffix)}\.(\d+)\.tmp$")
        for f in self.cache_dir.iterdir():
            m = pattern.match(f.name)
            if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
                f.unlink(missing_ok=True)

    # -- what a subclass supplies ---------------------------------------------------------------
    def _compute(self, waves: list[np.ndarray]) -> list[torch.Tensor]:
        raise NotImplementedError

    def _metadata(self) -> dict[str, str]:
        return {}

    def _on_read(self, t: torch.Tensor) -> torch.Tensor:
        return t

    # -- keys and files -------------------------------------------------------------------------
    def key(self, path: Path) -> str:
        """sha256 of the file's bytes (re-hashed only when its size or modification time changes)."""
        st = path.stat()
        stamp = (str(path), st.st_size, st.st_mtime_ns)
        digest = self._digests.get(stamp)
        if digest is None:
            digest = self._digests[stamp] = file_sha256(path)
        return digest

    def cache_file(self, digest: str) -> Path | None:
        return self.cache_dir / f"{digest}{self.suffix}" if self.cache_dir else None

    def _disk_metadata(self, digest: str, path: Path) -> dict[str, str] | None:
        """Header metadata of a usable entry (present, readable, made by this model from the
        waveform this version's loader gives for `path`), else None."""
        f = self.cache_file(digest)
        if f is None or not f.is_file():
            return None
        from safetensors import safe_open

        try:
            with safe_open(str(f), framework="pt") as h:
                meta = dict(h.metadata() or {})
                ok = self.tensor_name in h.keys() and meta.get(self.model_key) == self.fingerprint
        except Exception:  # a broken entry counts as absent and is rewritten
            return None
        return meta if ok and _same_waveform(meta, path) else None

    def _read_disk(self, digest: str, path: Path) -> torch.Tensor | None:
        if self._disk_metadata(digest, path) is None:
            return None
        from safetensors.torch import load_file

        try:
            return self._on_read(load_file(str(self.cache_file(digest)))[self.tensor_name])
        except Exception:  # damaged after its header: recomputed, never trusted
            return None

    def _write_disk(self, digest: str, value: torch.Tensor, samples: int) -> None:
        f = self.cache_file(digest)
        if f is None:
            return
        from safetensors.torch import save_file

        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_name(f".{f.name}.{os.getpid()}.tmp")
        meta = {"format": "pt", "samples": str(samples), "rows": str(value.shape[0]), "dtype": str(value.dtype),
                "resampler": RESAMPLER, self.model_key: self.fingerprint, **self._metadata()}
        try:
            with naming_errors(f):
                save_file({self.tensor_name: value.detach().to("cpu").contiguous()}, str(tmp), metadata=meta)
                os.replace(tmp, f)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _remember(self, digest: str, value: torch.Tensor) -> None:
        if digest in self._memory:
            self._memory.move_to_end(digest)
            return
        size = value.numel() * value.element_size()
        if size > self.memory_budget:
            return
        self._memory[digest] = value
        self._memory_bytes += size
        while self._memory_bytes > self.memory_budget:
            _, old = self._memory.popitem(last=False)
            self._memory_bytes -= old.numel() * old.element_size()

    # -- the two ways in ------------------------------------------------------------------------
    def get(self, paths: Sequence[Path], waves: Mapping[Path, Any] | None = None) -> list[torch.Tensor]:
        """One result per path, in order; misses are decoded (unless in `waves`) and run together."""
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
            cached = self._read_disk(k, p)
            if cached is not None:
                found[k] = cached
                self._remember(k, cached)
                self.stats.disk_hits += 1
                continue
            todo[k] = p
        for k, value in self._run(todo, waves).items():
            found[k] = value
            self._remember(k, value)
        return [found[k] for k in keys]

    def fill(self, paths: Sequence[Path], waves: Mapping[Path, Any] | None = None) -> int:
        """Make sure every path has a disk entry without reading the ones present; returns how many
        files were computed (the rest were cached or repeated)."""
        todo: dict[str, Path] = {}
        for p in paths:
            k = self.key(p)
            if k not in todo and self._disk_metadata(k, p) is None:
                todo[k] = p
        return len(self._run(todo, waves))

    def _run(self, todo: dict[str, Path], waves: Mapping[Path, Any] | None) -> dict[str, torch.Tensor]:
        if not todo:
            return {}
        from kimi_lora_cli.data.audio import AudioError, load_audio

        start = time.perf_counter()
        decoded = []
        for p in todo.values():
            if waves is not None and p in waves:
                decoded.append(waves[p])
                continue
            try:
                decoded.append(load_audio(p))
            except AudioError as e:
                raise DataError(f"{e}; fix or remove the lines that use it") from None
        out = {}
        for (k, _), wave, value in zip(todo.items(), decoded, self._compute(decoded)):
            out[k] = value
            self._write_disk(k, value, samples=len(wave))
        self.stats.computed += len(todo)
        self.stats.seconds_computing += time.perf_counter() - start
        return out


class FeatureStore(_AudioStore):
    """`rows(paths)` -> one [rows, dim] CPU tensor per file (Whisper features, the encoder's dtype)."""

    tensor_name = "features"
    model_key = "whisper_fingerprint"

    def __init__(self, encoder: Any, cache_dir: str | Path | None = None, memory_budget_bytes: int = 4 << 30,
                 batch_size: int = 8) -> None:
        # The mel rounding changes every row, so it is part of the entry's identity.
        mel = str(getattr(encoder, "mel_dtype", None)).replace("torch.", "")
        super().__init__(encoder, f"{fingerprint(encoder.encoder)}:mel-{mel}", cache_dir, memory_budget_bytes,
                         batch_size)

    @property
    def encoder(self) -> Any:
        return self.model

    def _compute(self, waves):
        return [r.detach().to("cpu") for r in self.model.encode_batch(waves, max_pieces=self.batch_size)]

    def _metadata(self) -> dict[str, str]:
        return {"whisper": str(getattr(self.model, "source", ""))}

    def _on_read(self, t):
        return t.to(self.model.dtype)

    def rows(self, paths: Sequence[Path], waves: Mapping[Path, Any] | None = None) -> list[torch.Tensor]:
        return self.get(paths, waves)


class CodeStore(_AudioStore):
    """`codes(paths)` -> each file's GLM-4-Voice codes plus kimia_token_offset (what audio_tokens hold)."""

    tensor_name = "codes"
    suffix = ".codes.safetensors"
    model_key = "speech_tokenizer_fingerprint"

    def __init__(self, tokenizer: Any, offset: int, vocab_size: int, cache_dir: str | Path | None = None,
                 memory_budget_bytes: int = 256 << 20, batch_size: int = 8) -> None:
        if offset + tokenizer.vocab_size > vocab_size:
            raise ConfigError(
                f"{tokenizer.source or 'speech tokenizer'}: {tokenizer.vocab_size} codes + kimia_token_offset "
                f"{offset} exceed the model's vocab_size {vocab_size}; use the speech tokenizer that belongs to "
                "the model (glm-4-voice-tokenizer for Kimi-Audio)"
            )
        enc = tokenizer.encoder
        super().__init__(tokenizer, fingerprint(enc), cache_dir,
                         memory_budget_bytes, batch_size)
        self.offset = offset

    def _compute(self, waves):
        import torch

        return [torch.tensor(c, dtype=torch.int32) for c in self.model.tokenize_batch(waves, batch_size=self.batch_size)]

    def _metadata(self) -> dict[str, str]:
        return {"speech_tokenizer": str(getattr(self.model, "source", ""))}

    def codes(self, paths: Sequence[Path], waves: Mapping[Path, Any] | None = None) -> list[list[int]]:
        return [(c.long() + self.offset).tolist() for c in self.get(paths, waves)]
