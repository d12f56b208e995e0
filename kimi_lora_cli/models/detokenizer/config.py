"""The detokenizer's two config files, read into frozen dataclasses (no torch here).

`audio_detokenizer/config.yaml`: the keys the official loader reads are `model.dit.*` (input_size,
semantic_vocab_size, hidden_size, depth, num_heads, mlp_ratio, position_embedding_type,
max_seq_len; optional ffn_type, use_rope, rope_params) and the top-level normalize_mel, mel_mean,
mel_std. Optional keys default as in the official code. Other keys (training settings) are ignored.

`vocoder/config.json`: a BigVGAN hyper-parameter file (num_mels, upsample_rates,
upsample_kernel_sizes, upsample_initial_channel, resblock, resblock_kernel_sizes,
resblock_dilation_sizes, activation, snake_logscale, sampling_rate; optional use_bias_at_final,
use_tanh_at_final, both true by default). Training keys are ignored.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

ROPE_DEFAULTS = {"max_position_embeddings": 4096, "rope_base": 10000.0, "rope_interpolation_factor": 1.0}
POSITION_TYPES = ("learnable", "sincos", "skip")


class ConfigValueError(ValueError):
    """A config value is missing or unusable (the loader adds the file name)."""


def _need(data: dict[str, Any], key: str, where: str) -> Any:
    if key not in data:
        raise ConfigValueError(f"missing key {where}{key}")
    return data[key]


def _int(value: Any, key: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigValueError(f"{key} must be an integer >= {minimum}, not {value!r}")
    return value


def _num(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigValueError(f"{key} must be a number, not {value!r}")
    return float(value)


def _ints(value: Any, key: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigValueError(f"{key} must be a non-empty list of integers, not {value!r}")
    return tuple(_int(v, key) for v in value)


@dataclass(frozen=True)
class DiTConfig:
    input_size: int = 80  # mel bins
    semantic_vocab_size: int = 16384  # codes; the embedding has one more row (the CFG token)
    hidden_size: int = 2304
    depth: int = 16
    num_heads: int = 18
    mlp_ratio: float = 4.0
    ffn_type: str = "vanilla_mlp"
    use_rope: bool = True
    rope_max_positions: int = 4096
    rope_base: float = 10000.0
    rope_interpolation_factor: float = 1.0
    position_embedding_type: str = "skip"
    max_seq_len: int = 4096
    normalize_mel: bool = True
    mel_mean: float = -4.479605
    mel_std: float = 3.4584913

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.use_rope and (self.hidden_size // self.num_heads) % 2:
            raise ConfigValueError(f"use_rope needs an even head size, not {self.hidden_size // self.num_heads}")
        if self.ffn_type != "vanilla_mlp":
            raise ConfigValueError(f"model.dit.ffn_type {self.ffn_type!r} is not supported (the official "
                                   "detokenizer implements only 'vanilla_mlp')")
        if self.position_embedding_type not in POSITION_TYPES:
            raise ConfigValueError(f"model.dit.position_embedding_type {self.position_embedding_type!r}: "
                                   f"expected one of {', '.join(POSITION_TYPES)}")
        if self.normalize_mel and self.mel_std == 0:
            raise ConfigValueError("mel_std must not be 0 when normalize_mel is true")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @classmethod
    def from_yaml_dict(cls, data: Any) -> DiTConfig:
        if not isinstance(data, dict):
            raise ConfigValueError("expected a YAML mapping with a `model: dit:` section")
        model = _need(data, "model", "")
        if not isinstance(model, dict) or not isinstance(model.get("dit"), dict):
            raise ConfigValueError("missing key model.dit (a mapping)")
        dit = model["dit"]
        rope = dit.get("rope_params") or ROPE_DEFAULTS
        if not isinstance(rope, dict):
            raise ConfigValueError(f"model.dit.rope_params must be a mapping, not {rope!r}")
        p = "model.dit."
        return cls(
            input_size=_int(_need(dit, "input_size", p), p + "input_size"),
            semantic_vocab_size=_int(_need(dit, "semantic_vocab_size", p), p + "semantic_vocab_size"),
            hidden_size=_int(_need(dit, "hidden_size", p), p + "hidden_size"),
            depth=_int(_need(dit, "depth", p), p + "depth"),
            num_heads=_int(_need(dit, "num_heads", p), p + "num_heads"),
            mlp_ratio=_num(_need(dit, "mlp_ratio", p), p + "mlp_ratio"),
            ffn_type=str(dit.get("ffn_type", "conv1d_conv1d")),
            use_rope=bool(dit.get("use_rope", False)),
            rope_max_positions=_int(rope.get("max_position_embeddings", 4096), p + "rope_params.max_position_embeddings"),
            rope_base=_num(rope.get("rope_base", 10000.0), p + "rope_params.rope_base"),
            rope_interpolation_factor=_num(rope.get("rope_interpolation_factor", 1.0),
                                           p + "rope_params.rope_interpolation_factor"),
            position_embedding_type=str(_need(dit, "position_embedding_type", p)),
            max_seq_len=_int(_need(dit, "max_seq_len", p), p + "max_seq_len"),
            normalize_mel=bool(_need(data, "normalize_mel", "")),
            mel_mean=_num(_need(data, "mel_mean", ""), "mel_mean"),
            mel_std=_num(_need(data, "mel_std", ""), "mel_std"),
        )

    def to_yaml_dict(self) -> dict[str, Any]:
        """The config.yaml structure the official loader reads (what the tiny builder writes)."""
        return {
            "model": {"dit": {
                "input_size": self.input_size, "semantic_vocab_size": self.semantic_vocab_size,
                "hidden_size": self.hidden_size, "depth": self.depth, "num_heads": self.num_heads,
                "mlp_ratio": self.mlp_ratio, "ffn_type": self.ffn_type, "use_rope": self.use_rope,
                "rope_params": {"max_position_embeddings": self.rope_max_positions, "rope_base": self.rope_base,
                                "rope_interpolation_factor": self.rope_interpolation_factor},
                "position_embedding_type": self.position_embedding_type, "max_seq_len": self.max_seq_len,
            }},
            "normalize_mel": self.normalize_mel, "mel_mean": self.mel_mean, "mel_std": self.mel_std,
        }


@dataclass(frozen=True)
class VocoderConfig:
    num_mels: int = 80
    upsample_rates: tuple[int, ...] = (5, 2, 2, 2, 2, 3, 2)
    upsample_kernel_sizes: tuple[int, ...] = (9, 4, 4, 4, 4, 5, 4)
    upsample_initial_channel: int = 2048
    resblock: str = "1"
    resblock_kernel_sizes: tuple[int, ...] = (3, 5, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5),) * 4
    activation: str = "snakebeta"
    snake_logscale: bool = True
    use_bias_at_final: bool = True
    use_tanh_at_final: bool = True
    sampling_rate: int = 24000
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # other keys, kept for writing

    def __post_init__(self) -> None:
        if len(self.upsample_rates) != len(self.upsample_kernel_sizes):
            raise ConfigValueError("upsample_rates and upsample_kernel_sizes differ in length")
        if len(self.resblock_kernel_sizes) != len(self.resblock_dilation_sizes):
            raise ConfigValueError("resblock_kernel_sizes and resblock_dilation_sizes differ in length")
        if self.resblock != "1":
            raise ConfigValueError(f"resblock {self.resblock!r} is not supported (the official vocoder runs "
                                   "AMPBlock1, resblock \"1\")")
        if self.activation not in ("snake", "snakebeta"):
            raise ConfigValueError(f"activation {self.activation!r}: expected snake or snakebeta")
        if self.upsample_initial_channel >> len(self.upsample_rates) < 1:
            raise ConfigValueError(f"upsample_initial_channel {self.upsample_initial_channel} is too small for "
                                   f"{len(self.upsample_rates)} upsampling stages")
        hop = self.extra.get("hop_size")
        if hop is not None and hop != self.hop_size:
            raise ConfigValueError(f"hop_size {hop} but upsample_rates {list(self.upsample_rates)} multiply to "
                                   f"{self.hop_size}")

    @property
    def hop_size(self) -> int:
        """Waveform samples per mel frame."""
        return math.prod(self.upsample_rates)

    @classmethod
    def from_json_dict(cls, data: Any) -> VocoderConfig:
        if not isinstance(data, dict):
            raise ConfigValueError("expected a JSON object")
        dil = _need(data, "resblock_dilation_sizes", "")
        if not isinstance(dil, list) or not dil:
            raise ConfigValueError(f"resblock_dilation_sizes must be a list of lists, not {dil!r}")
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        return cls(
            num_mels=_int(_need(data, "num_mels", ""), "num_mels"),
            upsample_rates=_ints(_need(data, "upsample_rates", ""), "upsample_rates"),
            upsample_kernel_sizes=_ints(_need(data, "upsample_kernel_sizes", ""), "upsample_kernel_sizes"),
            upsample_initial_channel=_int(_need(data, "upsample_initial_channel", ""), "upsample_initial_channel"),
            resblock=str(_need(data, "resblock", "")),
            resblock_kernel_sizes=_ints(_need(data, "resblock_kernel_sizes", ""), "resblock_kernel_sizes"),
            resblock_dilation_sizes=tuple(_ints(d, "resblock_dilation_sizes") for d in dil),
            activation=str(_need(data, "activation", "")),
            snake_logscale=bool(_need(data, "snake_logscale", "")),
            use_bias_at_final=bool(data.get("use_bias_at_final", True)),
            use_tanh_at_final=bool(data.get("use_tanh_at_final", True)),
            sampling_rate=_int(_need(data, "sampling_rate", ""), "sampling_rate"),
            extra={k: v for k, v in data.items() if k not in known},
        )

    def to_json_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "extra"}
        out["upsample_rates"] = list(self.upsample_rates)
        out["upsample_kernel_sizes"] = list(self.upsample_kernel_sizes)
        out["resblock_kernel_sizes"] = list(self.resblock_kernel_sizes)
        out["resblock_dilation_sizes"] = [list(d) for d in self.resblock_dilation_sizes]
        return {**self.extra, **out}
