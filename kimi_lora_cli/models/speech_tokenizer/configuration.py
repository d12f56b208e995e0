"""`SpeechTokenizerConfig`: the GLM-4-Voice tokenizer's `config.json` (a Whisper config plus VQ keys).

Only the keys the encoder-up-to-the-codebook needs are read; the rest of the file (decoder sizes,
EMA settings, ...) is kept in `.raw`. No torch import here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class SpeechTokenizerConfig:
    d_model: int = 1280
    num_mel_bins: int = 128
    encoder_layers: int = 32
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    max_source_positions: int = 1500
    activation_function: str = "gelu"
    encoder_causal_convolution: bool = True
    encoder_causal_attention: bool = False
    pooling_kernel_size: int | None = 4
    pooling_position: int | None = 16
    pooling_type: str = "avg"
    quantize_position: int = 16
    quantize_vocab_size: int | None = 16384
    quantize_causal_block_size: int | None = 200
    quantize_encoder_only: bool = True
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpeechTokenizerConfig:
        if not isinstance(data, dict) or "quantize_vocab_size" not in data:
            raise ValueError("no quantize_vocab_size: this is a plain Whisper config, not the "
                             "glm-4-voice-tokenizer (Whisper-VQ) config")
        known = {f.name for f in fields(cls)} - {"raw"}
        cfg = cls(**{k: v for k, v in data.items() if k in known}, raw=dict(data))
        cfg.validate()
        return cfg

    @classmethod
    def from_json_file(cls, path: str | Path) -> SpeechTokenizerConfig:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def validate(self) -> None:
        """Raise ValueError naming the key when the config cannot describe a speech tokenizer."""
        if not self.quantize_vocab_size or self.quantize_vocab_size < 1:
            raise ValueError("no quantize_vocab_size: this is a plain Whisper config, not the "
                             "glm-4-voice-tokenizer (Whisper-VQ) config")
        if not 1 <= self.quantize_position <= self.encoder_layers:
            raise ValueError(f"quantize_position {self.quantize_position} must be within 1..encoder_layers "
                             f"({self.encoder_layers})")
        if self.pooling_kernel_size:
            if self.pooling_type not in ("avg", "max"):
                raise ValueError(f"pooling_type {self.pooling_type!r} is not supported (avg or max)")
            if not self.pooling_position or not 1 <= self.pooling_position <= self.quantize_position:
                raise ValueError(f"pooling_position {self.pooling_position} must be within 1..quantize_position "
                                 f"({self.quantize_position}): codes are taken after pooling")
        if self.d_model % self.encoder_attention_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by encoder_attention_heads "
                             f"{self.encoder_attention_heads}")
        if self.activation_function not in ("gelu", "gelu_new", "relu"):
            raise ValueError(f"activation_function {self.activation_function!r} is not supported")
        if self.quantize_causal_block_size is not None and self.quantize_causal_block_size < 1:
            raise ValueError("quantize_causal_block_size must be positive")

    @property
    def frame_stride(self) -> int:
        """Mel frames per encoder frame after the two convolutions (strides 1 and 2)."""
        return 2

    @property
    def pool(self) -> int:
        return self.pooling_kernel_size or 1

    @property
    def samples_per_code(self) -> int:
        """16 kHz samples per code: hop 160 x conv stride 2 x pooling (1280 for GLM-4-Voice)."""
        return 160 * self.frame_stride * self.pool

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.raw)
        out.update({f.name: getattr(self, f.name) for f in fields(self) if f.name != "raw"})
        return out
