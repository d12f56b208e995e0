"""Seeded tiny `audio_detokenizer/` + `vocoder/` folders in the release file layout (tests, demo).

`build_tiny_detokenizer(folder)` adds to `folder` (a tiny Kimi-Audio release folder, or any folder)
  audio_detokenizer/config.yaml   the keys the official loader reads (model.dit.*, normalize_mel, ...)
  audio_detokenizer/model.pt      torch.save({"state_dict": {"speech_model.<name>": tensor}})
  vocoder/config.json             BigVGAN hyper-parameters (plus the usual mel keys)
  vocoder/model.pt                torch.save({"generator": {...}}), convolutions as weight_g / weight_v
at toy sizes with the real mel rate: 80 mels, hop 480 at 24 kHz (50 frames/s), so n codes give
n * 4 * 480 samples. Random weights: the audio is noise. Same seed, same tensors.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from kimi_lora_cli.models.detokenizer.checkpoint import DETOKENIZER_DIR, DIT_PREFIX, VOCODER_DIR
from kimi_lora_cli.models.detokenizer.config import DiTConfig, VocoderConfig

MEL_KEYS = {"hop_size": 480, "n_fft": 1920, "win_size": 1920, "fmin": 0, "fmax": None}


@dataclass(frozen=True)
class TinyDetokenizerSpec:
    dit: DiTConfig = field(default_factory=lambda: DiTConfig(
        semantic_vocab_size=128, hidden_size=32, depth=2, num_heads=2, mlp_ratio=2.0))
    vocoder: VocoderConfig = field(default_factory=lambda: VocoderConfig(
        upsample_rates=(8, 6, 10), upsample_kernel_sizes=(16, 12, 20), upsample_initial_channel=32,
        resblock_kernel_sizes=(3, 5), resblock_dilation_sizes=((1, 3), (1, 3)), use_tanh_at_final=False,
        use_bias_at_final=False, extra=dict(MEL_KEYS)))
    seed: int = 0


def dit_tensors(cfg: DiTConfig, generator) -> dict:
    """Random DiT weights (names without the `speech_model.` prefix)."""
    import torch

    from kimi_lora_cli.models.detokenizer.dit import DiT

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in DiT(cfg).state_dict().items()}
    out = {}
    for name, shape in shapes.items():
        if name.endswith("_float_tensor"):
            t = torch.zeros(shape)
        elif name.endswith("embedding.weight"):
            t = 0.5 * torch.randn(shape, generator=generator)
        elif name.endswith("bias"):
            t = 0.02 * torch.randn(shape, generator=generator)
        else:
            t = torch.randn(shape, generator=generator) / shape[-1] ** 0.5
        out[name] = t
    return out


def vocoder_tensors(cfg: VocoderConfig, generator) -> dict:
    """Random BigVGAN weights in the release form: weight_g / weight_v per convolution, the
    anti-aliasing filters as computed, log-scale Snake parameters near 0."""
    import torch

    from kimi_lora_cli.models.detokenizer.vocoder import BigVGAN

    model = BigVGAN(cfg)  # small: built for real, so the filter buffers hold their computed taps
    normed = set(model.weight_normed())
    out = {}
    for name, t in model.state_dict().items():
        prefix, _, leaf = name.rpartition(".")
        if leaf == "weight" and prefix in normed:
            v = torch.randn(t.shape, generator=generator)
            fan_in = t[0].numel()
            norms = v.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))
            gain = 0.15 if prefix == "conv_pre" else 0.4 if prefix.startswith("resblocks") else 1.0
            scale = gain / fan_in**0.5 * (0.5 + torch.rand(norms.shape, generator=generator))
            out[f"{prefix}.weight_g"] = norms * scale
            out[f"{prefix}.weight_v"] = v
        elif leaf in ("alpha", "beta"):
            out[name] = 0.2 * torch.randn(t.shape, generator=generator)
        elif leaf == "bias":
            out[name] = 0.02 * torch.randn(t.shape, generator=generator)
        else:
            out[name] = t.detach().clone()
    return out


def build_tiny_detokenizer(folder: str | Path, spec: TinyDetokenizerSpec | None = None) -> Path:
    """Write audio_detokenizer/ and vocoder/ into `folder` (created if absent; neither may exist)."""
    import torch
    import yaml

    spec = spec or TinyDetokenizerSpec()
    folder = Path(folder)
    for name in (DETOKENIZER_DIR, VOCODER_DIR):
        if (folder / name).exists():
            raise FileExistsError(f"{folder / name}: exists; the tiny detokenizer is written next to nothing")
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(spec.seed)
    tmp = Path(tempfile.mkdtemp(prefix=".detokenizer.partial-", dir=folder))
    try:
        det, voc = tmp / DETOKENIZER_DIR, tmp / VOCODER_DIR
        det.mkdir()
        voc.mkdir()
        (det / "config.yaml").write_text(yaml.safe_dump(spec.dit.to_yaml_dict(), sort_keys=False))
        dit = {DIT_PREFIX + k: v for k, v in dit_tensors(spec.dit, generator).items()}
        torch.save({"state_dict": dit}, det / "model.pt")
        (voc / "config.json").write_text(json.dumps(spec.vocoder.to_json_dict(), indent=2))
        torch.save({"generator": vocoder_tensors(spec.vocoder, generator)}, voc / "model.pt")
        det.rename(folder / DETOKENIZER_DIR)
        voc.rename(folder / VOCODER_DIR)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def random_detokenizer(dit_cfg: DiTConfig | None = None, vocoder_cfg: VocoderConfig | None = None, *,
                       device="cpu", dtype=None, seed: int = 0, rules=None):
    """A `Detokenizer` with random weights at any size (default: the release sizes), allocated directly
    in `dtype` on `device` (no float32 copy: 1.5 B DiT parameters take 3 GB in bfloat16). For
    benchmarks; the anti-aliasing filters hold their real taps."""
    import torch
    from torch import nn

    from kimi_lora_cli.models.detokenizer.dit import DiT
    from kimi_lora_cli.models.detokenizer.streaming import Detokenizer, StreamingRules
    from kimi_lora_cli.models.detokenizer.vocoder import BigVGAN

    dtype = dtype or torch.bfloat16
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        dit = DiT(dit_cfg or DiTConfig()).to(dtype)
        voc = BigVGAN(vocoder_cfg or VocoderConfig()).to(dtype)
    models = []
    for model, gain in ((dit, 1.0), (voc, 0.5)):
        model = model.to_empty(device=device).requires_grad_(False).eval()
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, gain / p[0].numel() ** 0.5, generator=generator)
            else:
                p.zero_()
        for m in model.modules():
            if hasattr(m, "taps"):
                m.filter.copy_(m.taps())
            if isinstance(m, nn.Embedding):
                m.weight.normal_(0.0, 0.5, generator=generator)
        models.append(model)
    return Detokenizer(models[0], models[1], rules or StreamingRules())


if __name__ == "__main__":  # python -m kimi_lora_cli.models.detokenizer.tiny FOLDER
    import sys

    print(build_tiny_detokenizer(sys.argv[1] if len(sys.argv) > 1 else "kimi-audio-detokenizer-tiny"))
