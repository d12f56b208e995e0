"""`KimiAudioConfig`: the release `config.json`, read as-is (no torch import here).

The class defaults of the official `configuration_moonshot_kimia.py` differ from the
release file (vocab, width, rope theta, audio delay), so values always come from
config.json; the defaults below only fill keys a file leaves out, and are the
release values.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

KIMI_ARCHITECTURES = ("MoonshotKimiaForCausalLM", "KimiAudioForCausalLM", "KimiAudioModel")
# Sizes that must be at least 1 (token ids and offsets may be 0).
POSITIVE_INTS = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "max_position_embeddings", "kimia_adaptor_input_dim",
                 "kimia_audio_output_vocab", "kimia_text_output_vocab", "kimia_mimo_layers"}


@dataclass
class KimiAudioConfig:
    vocab_size: int = 168448
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    hidden_act: str = "silu"
    max_position_embeddings: int = 8192
    rope_theta: float = 1000000.0
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    bos_token_id: int = 151643
    eos_token_ids: list[int] = field(default_factory=lambda: [151644, 151645])
    pad_token_id: int = 152063
    kimia_adaptor_input_dim: int = 5120
    kimia_audio_output_vocab: int = 16896
    kimia_text_output_vocab: int = 152064
    kimia_media_begin: int = 151661
    kimia_media_end: int = 151663
    kimia_mimo_audiodelaytokens: int = 6
    kimia_mimo_layers: int = 6
    kimia_mimo_transformer_from_layer_index: int = 21
    kimia_token_offset: int = 152064
    num_audio_special_tokens: int = 512
    num_base_tokens: int = 151643
    use_whisper_feature: bool = True
    torch_dtype: str | None = "bfloat16"
    # Not in the release file: how attention is computed here ("sdpa", "eager",
    # or "flash_attention_2" when flash-attn is installed and asked for).
    attn_implementation: str = "sdpa"
    # Every key of the original file, kept so that a merged model writes it back unchanged.
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def model_type(self) -> str:
        # What a transformers config carries (peft's causal-LM wrapper reads it); the official class
        # sets none, so "" unless config.json names one.
        return str(self.raw.get("model_type") or "")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KimiAudioConfig:
        known = {f.name for f in fields(cls)} - {"raw"}
        kwargs = {k: v for k, v in data.items() if k in known}
        if "torch_dtype" not in data and "dtype" in data:
            kwargs["torch_dtype"] = data["dtype"]
        if "eos_token_ids" not in data and "eos_token_id" in data:
            eos = data["eos_token_id"]
            kwargs["eos_token_ids"] = list(eos) if isinstance(eos, (list, tuple)) else [eos]
        if (data.get("rope_scaling") or {}).get("type", "default") not in ("default", None):
            raise ValueError("rope_scaling is not supported for Kimi-Audio (the release uses none)")
        cfg = cls(**kwargs)
        cfg.raw = dict(data)
        cfg.validate()
        return cfg

    @classmethod
    def from_json_file(cls, path: str | Path) -> KimiAudioConfig:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    @classmethod
    def from_pretrained(cls, folder: str | Path, **_: Any) -> KimiAudioConfig:
        """config.json of a local model folder (peft calls this on the base recorded in an adapter)."""
        return cls.from_json_file(Path(folder) / "config.json")

    def validate(self) -> None:
        for f in fields(self):
            if f.name in ("raw", "attn_implementation", "torch_dtype"):
                continue
            value = getattr(self, f.name)
            if f.type == "int":
                low = 1 if f.name in POSITIVE_INTS else 0
                if not isinstance(value, int) or isinstance(value, bool) or value < low:
                    raise ValueError(f"{f.name} = {value!r} is not valid (expected a whole number >= {low})")
            elif f.type == "float":
                if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                    raise ValueError(f"{f.name} = {value!r} is not valid (expected a positive number)")
            elif f.type == "bool" and not isinstance(value, bool):
                raise ValueError(f"{f.name} = {value!r} is not valid (expected true or false)")
            elif f.name == "eos_token_ids" and not (isinstance(value, list) and all(
                    isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)):
                raise ValueError(f"eos_token_ids = {value!r} is not valid (expected a list of token ids)")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if not 0 <= self.kimia_mimo_transformer_from_layer_index < self.num_hidden_layers:
            raise ValueError(
                f"kimia_mimo_transformer_from_layer_index {self.kimia_mimo_transformer_from_layer_index} "
                f"is outside 0..{self.num_hidden_layers - 1}"
            )

    def to_dict(self) -> dict[str, Any]:
        """The original keys, updated with the typed values (what a merged model writes)."""
        out = dict(self.raw)
        for f in fields(self):
            if f.name in ("raw", "attn_implementation"):
                continue
            if f.name == "torch_dtype" and "dtype" in out and "torch_dtype" not in out:
                out["dtype"] = self.torch_dtype
                continue
            out[f.name] = getattr(self, f.name)
        out.setdefault("architectures", ["MoonshotKimiaForCausalLM"])
        return out

    # peft reads the model config as a mapping (`model_config.get("tie_word_embeddings")`).
    def get(self, key: str, default: Any = None) -> Any:
        return self.to_dict().get(key, default)


def is_kimi_config(data: dict[str, Any]) -> bool:
    """True when a config.json describes a Kimi-Audio model (by class name or kimia_* keys)."""
    archs = data.get("architectures") or []
    if any(a in KIMI_ARCHITECTURES for a in archs):
        return True
    if data.get("model_type") in ("moonshot_kimia", "kimi_audio"):
        return True
    return "kimia_mimo_layers" in data and "kimia_token_offset" in data
