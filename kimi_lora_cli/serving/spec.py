"""What `kimi-lora serve` was asked to run: one frozen spec, checked before anything loads (no torch import)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from kimi_lora_cli.adapter_names import parse_named_adapters
from kimi_lora_cli.errors import ConfigError

API_KEY_ENV = "KIMI_LORA_API_KEY"
SERVE_EXTRA_HINT = "pip install 'kimi-lora[serve]' (FastAPI, uvicorn and python-multipart)"


@dataclass(frozen=True)
class ServeSpec:
    model: Path
    adapters: tuple[tuple[str, Path], ...] = ()
    speech_tokenizer: Path | None = None  # glm-4-voice-tokenizer folder: uploaded audio -> codes
    detokenizer: Path | None = None  # audio_detokenizer/ + vocoder/ (default: the model folder, when it has them)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_batch_size: int = 8
    max_queue: int = 64
    batch_wait_ms: float = 10.0  # how long an idle worker waits for more requests to join a decode
    max_loaded_adapters: int = 0  # 0: every adapter stays loaded
    max_new_tokens: int | None = None  # budget of a request without max_tokens (None: infer's default; -1: official)
    max_upload_mb: float = 25.0
    max_audio_seconds: float = 600.0
    device: str | None = None
    dtype: str = "auto"
    allow_pickle: bool = False
    ode_steps: int = 30

    @property
    def loaded_adapter_slots(self) -> int:
        """How many adapters may sit in memory at once."""
        n = len(self.adapters)
        return n if self.max_loaded_adapters <= 0 else min(n, self.max_loaded_adapters)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * (1 << 20))

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


def parse_adapters(values: list[str]) -> tuple[tuple[str, Path], ...]:
    """`NAME=DIR` or `DIR` (named after the folder); names unique, not 'base', usable as a `model` value."""
    return parse_named_adapters(values, usage="NAME=DIR or DIR", model_ids=True)


def api_key_from(value: str | None) -> str | None:
    """--api-key, else the environment variable; an empty key counts as none."""
    key = value if value is not None else os.environ.get(API_KEY_ENV)
    return key or None


def check_spec(spec: ServeSpec) -> None:
    """Option values and folders that must exist - one line each, before any weight is read."""
    from kimi_lora_cli.devices import check_device

    check_device(spec.device)
    if not Path(spec.model).is_dir():
        raise ConfigError(f"--model {spec.model}: no such folder; pass the Kimi-Audio release folder or a merged one")
    for name, folder in spec.adapters:
        if not folder.is_dir():
            raise ConfigError(f"--adapter {name}={folder}: no such adapter folder; pass the output folder of "
                              "`kimi-lora train`")
    if spec.speech_tokenizer is not None and not Path(spec.speech_tokenizer).is_dir():
        raise ConfigError(f"--speech-tokenizer {spec.speech_tokenizer}: no such folder; pass the local "
                          "glm-4-voice-tokenizer folder")
    if spec.detokenizer is not None and not Path(spec.detokenizer).is_dir():
        raise ConfigError(f"--detokenizer {spec.detokenizer}: no such folder; pass the folder holding "
                          "audio_detokenizer/ and vocoder/")
    for flag, value, low in (("--max-batch-size", spec.max_batch_size, 1), ("--max-queue", spec.max_queue, 1),
                             ("--max-loaded-adapters", spec.max_loaded_adapters, 0)):
        if value < low:
            raise ConfigError(f"{flag} must be >= {low}, not {value}")
    if spec.batch_wait_ms < 0:
        raise ConfigError(f"--batch-wait-ms must be >= 0, not {spec.batch_wait_ms}")
    if not 0 <= spec.port <= 65535:
        raise ConfigError(f"--port must be in 0..65535 (0: any free port), not {spec.port}")
    if spec.max_new_tokens is not None and (spec.max_new_tokens == 0 or spec.max_new_tokens < -1):
        raise ConfigError(f"--max-new-tokens must be > 0 (or -1 for the official budget), not {spec.max_new_tokens}")
    if spec.max_upload_mb <= 0:
        raise ConfigError(f"--max-upload-mb must be > 0, not {spec.max_upload_mb}")
    if spec.max_audio_seconds <= 0:
        raise ConfigError(f"--max-audio-seconds must be > 0, not {spec.max_audio_seconds}")
    if spec.ode_steps < 2:
        raise ConfigError(f"--ode-steps must be >= 2 (time points from 0 to 1), not {spec.ode_steps}")
