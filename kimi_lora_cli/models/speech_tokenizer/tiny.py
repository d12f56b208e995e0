"""Seeded tiny GLM-4-Voice speech tokenizer in the real folder layout (tests, demo, benchmarks).

`build_tiny_speech_tokenizer(folder)` writes what `THUDM/glm-4-voice-tokenizer` holds, at toy
width: `config.json` with the Whisper + VQ key set, `preprocessor_config.json` and a single
`model.safetensors` that also carries what the encoder does not use (EMA buffers,
`embed_positions2`, a layer after `quantize_position`, a final `layer_norm`), under bare names
(`conv1.*`, `layers.N.*`, `codebook.*`) or, with `key_prefix="model.encoder."`, the prefixed
ones. Geometry kept from the real file: 128 mel bins, 1500 positions, causal convolutions,
block-causal attention with 200-frame blocks, average pooling by 4, quantization right after
pooling. Same seed, same bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path


@dataclass(frozen=True)
class TinySpeechSpec:
    d_model: int = 16
    heads: int = 2
    ffn: int = 32
    quantize_position: int = 2
    pooling_position: int = 2
    file_layers: int = 3  # layers stored in the file (the ones past quantize_position are unused)
    vocab: int = 128
    block: int = 200
    pool: int = 4
    max_source_positions: int = 1500
    seed: int = 0
    key_prefix: str = ""
    dtype: str = "float32"


def tiny_speech_config(spec: TinySpeechSpec) -> dict:
    """The real file's key set at tiny sizes (decoder and training keys kept for realism)."""
    return {
        "architectures": ["WhisperVQEncoder"],
        "model_type": "whisper",
        "activation_dropout": 0.0,
        "activation_function": "gelu",
        "attention_dropout": 0.0,
        "d_model": spec.d_model,
        "decoder_attention_heads": spec.heads,
        "decoder_ffn_dim": spec.ffn,
        "decoder_layers": 2,
        "dropout": 0.0,
        "encoder_attention_heads": spec.heads,
        "encoder_causal_attention": False,
        "encoder_causal_convolution": True,
        "encoder_ffn_dim": spec.ffn,
        "encoder_layers": spec.file_layers,
        "max_source_positions": spec.max_source_positions,
        "max_target_positions": 448,
        "num_hidden_layers": spec.file_layers,
        "num_mel_bins": 128,
        "pooling_kernel_size": spec.pool,
        "pooling_position": spec.pooling_position,
        "pooling_type": "avg",
        "quantize_causal_block_size": spec.block,
        "quantize_causal_encoder": False,
        "quantize_commit_coefficient": 0.25,
        "quantize_ema_decay": 0.99,
        "quantize_encoder_only": True,
        "quantize_loss_scale": 10.0,
        "quantize_position": spec.quantize_position,
        "quantize_restart_interval": 100,
        "quantize_vocab_size": spec.vocab,
        "scale_embedding": False,
        "torch_dtype": spec.dtype,
        "transformers_version": "4.44.1",
        "vocab_size": 51866,
    }


def _tensors(spec: TinySpeechSpec) -> dict:
    import torch

    g = torch.Generator().manual_seed(spec.seed)
    d, f = spec.d_model, spec.ffn

    def rnd(*shape: int, scale: float) -> torch.Tensor:
        return scale * torch.randn(*shape, generator=g)

    t = {
        "conv1.weight": rnd(d, 128, 3, scale=0.15),
        "conv1.bias": rnd(d, scale=0.05),
        "conv2.weight": rnd(d, d, 3, scale=0.25),
        "conv2.bias": rnd(d, scale=0.05),
        "embed_positions.weight": rnd(spec.max_source_positions, d, scale=0.05),
    }
    for i in range(spec.file_layers):
        p = f"layers.{i}."
        for name in ("q_proj", "v_proj", "out_proj"):
            t[p + f"self_attn.{name}.weight"] = rnd(d, d, scale=0.3)
            t[p + f"self_attn.{name}.bias"] = rnd(d, scale=0.02)
        t[p + "self_attn.k_proj.weight"] = rnd(d, d, scale=0.3)
        for norm in ("self_attn_layer_norm", "final_layer_norm"):
            t[p + f"{norm}.weight"] = 1.0 + rnd(d, scale=0.1)
            t[p + f"{norm}.bias"] = rnd(d, scale=0.02)
        t[p + "fc1.weight"] = rnd(f, d, scale=0.25)
        t[p + "fc1.bias"] = rnd(f, scale=0.02)
        t[p + "fc2.weight"] = rnd(d, f, scale=0.2)
        t[p + "fc2.bias"] = rnd(d, scale=0.02)
    t["layer_norm.weight"] = torch.ones(d)
    t["layer_norm.bias"] = torch.zeros(d)
    t["codebook.weight"] = _fitted_codebook(spec, t, g)
    t["ema_count"] = torch.ones(spec.vocab)
    t["ema_weight"] = t["codebook.weight"].clone()
    t["embed_positions2.weight"] = rnd(spec.max_source_positions // spec.pool, d, scale=0.05)
    dtype = getattr(torch, spec.dtype)
    return {k: v.to(dtype).contiguous() for k, v in t.items()}


def synthetic_speech(seconds: float, seed: int = 0, sr: int = 16000):
    """Deterministic speech-like float32 waveform: gliding harmonics, syllable envelope, noise."""
    import numpy as np

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f0 = 120 + 40 * np.sin(2 * np.pi * 0.7 * t) + 25 * np.sin(2 * np.pi * 2.3 * t + seed)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    voice = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = np.clip(np.sin(2 * np.pi * 3.1 * t + rng.uniform(0, 6)), 0, None) ** 2
    noise = rng.standard_normal(t.size) * (0.02 + 0.2 * (envelope < 0.05))
    return (0.25 * voice * envelope + 0.05 * noise).astype(np.float32)


def _fitted_codebook(spec: TinySpeechSpec, tensors: dict, g):
    """Codebook rows spread around the encoder's own outputs (as a trained codebook is), so random
    weights still give varied codes: per-dimension mean + std * noise of the pre-codebook states."""
    import torch

    from kimi_lora_cli.models.speech_tokenizer.configuration import SpeechTokenizerConfig
    from kimi_lora_cli.models.speech_tokenizer.modeling import SpeechTokenizer, build_encoder

    cfg = SpeechTokenizerConfig.from_dict(tiny_speech_config(spec))
    state = dict(tensors, **{"codebook.weight": torch.zeros(spec.vocab, spec.d_model)})
    state = {k: v for k, v in state.items() if k.split(".")[0] in ("conv1", "conv2", "embed_positions",
                                                                    "codebook") or
             (k.startswith("layers.") and int(k.split(".")[1]) < spec.quantize_position)}
    enc = build_encoder(cfg, state, torch.float64, "cpu")
    hidden = []
    enc.quantize = lambda h: hidden.append(h) or torch.zeros(h.shape[:-1], dtype=torch.long)
    SpeechTokenizer(enc).tokenize_batch([synthetic_speech(6.0, seed=s) for s in range(2)])
    states = torch.cat([h.reshape(-1, spec.d_model) for h in hidden])
    mean, std = states.mean(0).float(), states.std(0).float()
    return mean + std * torch.randn(spec.vocab, spec.d_model, generator=g)


def build_tiny_speech_tokenizer(folder: str | Path, spec: TinySpeechSpec | None = None, **overrides) -> Path:
    """Write a tiny random `glm-4-voice-tokenizer` folder (created if absent) and return it."""
    from safetensors.torch import save_file

    spec = replace(spec or TinySpeechSpec(), **overrides)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(tiny_speech_config(spec), indent=2))
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "chunk_length": 30, "feature_extractor_type": "WhisperFeatureExtractor", "feature_size": 128,
        "hop_length": 160, "n_fft": 400, "n_samples": 480000, "nb_max_frames": 3000,
        "padding_side": "right", "padding_value": 0.0, "processor_class": "WhisperProcessor",
        "return_attention_mask": False, "sampling_rate": 16000,
    }, indent=2))
    tensors = {spec.key_prefix + k: v for k, v in sorted(_tensors(spec).items())}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


if __name__ == "__main__":  # python -m kimi_lora_cli.models.speech_tokenizer.tiny FOLDER
    import sys

    print(build_tiny_speech_tokenizer(sys.argv[1] if len(sys.argv) > 1 else "glm-4-voice-tokenizer-tiny"))
