"""Spoken answers of `infer`: audio codes -> waveform (detokenizer) -> one 16-bit PCM WAV per prediction.

`AudioFolder(path)` is the folder `--audio-dir` names. It must be new, empty, or one `infer` made
before (it holds the marker file `.kimi-lora-audio`), so no file of the user's is ever replaced.
Each WAV is written under a temporary name (`.NAME.partial-PID`) and renamed into place, so a WAV
under its final name is complete; temporary files a killed run left behind are removed on the
next run. Names are `<sample id>.<adapter>.wav` (characters outside [A-Za-z0-9._-] replaced, with a
short hash then added so that different ids never share a file).

Noise: each sample's detokenizer noise comes from its own CPU generator seeded from (seed, sample
id), so a WAV does not depend on the batch it was generated in, and adapters answering the same
sample start from the same noise.
"""

from __future__ import annotations

import os
import re
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

from kimi_lora_cli.errors import ConfigError

if TYPE_CHECKING:
    import torch

MARKER = ".kimi-lora-audio"
PARTIAL = re.compile(r"^\..+\.wav\.partial-\d+$")


def wav_name(sample_id: str, variant: str) -> str:
    def safe(text: str) -> str:
        clean = re.sub(r"[^A-Za-z0-9._-]", "_", text).strip(".") or "_"
        return clean if clean == text else f"{clean}-{zlib.crc32(text.encode()):08x}"

    return f"{safe(sample_id)}.{safe(variant)}.wav"


def noise_generator(seed: int, sample_id: str) -> torch.Generator:
    import torch

    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{sample_id}".encode()))


class AudioFolder:
    """Checked on construction (nothing written); `open()` creates it and removes torn leftovers."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        what = f"--audio-dir {self.path}"
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"{what}: is a file; pass a folder for the WAV files")
        try:
            if self.path.is_dir() and any(self.path.iterdir()) and not (self.path / MARKER).is_file():
                raise ConfigError(f"{what}: folder is not empty and was not made by `kimi-lora infer`; pass a new "
                                  "or empty folder (infer writes its WAV files only where it made the folder)")
        except OSError as e:
            raise ConfigError(f"{what}: cannot read it ({e.strerror or e}); pick another folder") from None

    def open(self) -> AudioFolder:
        what = f"--audio-dir {self.path}"
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            if not (self.path / MARKER).is_file():
                (self.path / MARKER).write_text("WAV files written by kimi-lora infer; reruns replace them\n")
            for leftover in self.path.iterdir():
                if PARTIAL.match(leftover.name) and leftover.is_file():
                    leftover.unlink()
        except OSError as e:
            raise ConfigError(f"{what}: cannot write there ({e.strerror or e}); pick another folder") from None
        return self

    def write(self, name: str, wav: torch.Tensor, rate: int) -> Path:
        """`wav` float in [-1, 1] (clipped) -> `name` as 16-bit PCM mono at `rate` Hz, atomically."""
        import numpy as np
        import soundfile as sf

        final = self.path / name
        tmp = self.path / f".{name}.partial-{os.getpid()}"
        pcm = np.round(wav.detach().float().clamp(-1.0, 1.0).cpu().numpy() * 32767).astype(np.int16)
        try:
            sf.write(str(tmp), pcm, rate, subtype="PCM_16", format="WAV")
            os.replace(tmp, final)
        except (OSError, RuntimeError) as e:  # soundfile reports disk errors as RuntimeError
            tmp.unlink(missing_ok=True)
            raise ConfigError(f"{final}: cannot write the WAV file ({e}); free some space or pick another "
                              "--audio-dir") from None
        return final
