"""Parity check: kimi-lora's detokenizer vs the official `kimia_infer` one, same files, same noise (CPU).

    git clone https://github.com/MoonshotAI/Kimi-Audio /tmp/Kimi-Audio      # any checkout with kimia_infer/
    pip install --no-deps --target /tmp/torchdyn-pkg torchdyn               # the official ODE solver
    python benchmarks/official_parity.py --official /tmp/Kimi-Audio --torchdyn /tmp/torchdyn-pkg

Not part of the test suite (it needs the official code, which kimi-lora never vendors). It builds
three tiny release-layout detokenizer folders (rotary + no absolute positions + SnakeBeta + clamp;
sincos positions + Snake + tanh; learnable positions + rotary), loads each with the OFFICIAL loader
(`StreamingSemanticFMWrapper.from_pretrained`, BigVGAN on its torch path, since the fused CUDA kernel
needs nvcc) and with `load_detokenizer`, runs the official `detokenize_audio` loop (chunks of 30,
upsample 4, look-ahead 12, bfloat16, torchdyn Euler, 30 points) after `torch.manual_seed(7)` and
ours with a generator seeded 7, and prints whether the waveforms are identical. flash-attn, timm,
librosa and torchdyn's unused imports are replaced by small CPU stand-ins written to a temp folder
(flash_attn_varlen_func -> scaled_dot_product_attention per sequence; timm's Mlp layout).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package

STANDINS = {
    "flash_attn/__init__.py": '''
import torch
import torch.nn.functional as F

def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, **kw):
    outs = []
    for i in range(len(cu_seqlens_q) - 1):
        qs = q[cu_seqlens_q[i]:cu_seqlens_q[i + 1]].transpose(0, 1)[None]
        ks = k[cu_seqlens_k[i]:cu_seqlens_k[i + 1]].transpose(0, 1)[None]
        vs = v[cu_seqlens_k[i]:cu_seqlens_k[i + 1]].transpose(0, 1)[None]
        outs.append(F.scaled_dot_product_attention(qs, ks, vs)[0].transpose(0, 1))
    return torch.cat(outs)

def flash_attn_varlen_qkvpacked_func(*a, **k):
    raise NotImplementedError
''',
    "timm/__init__.py": "",
    "timm/models/__init__.py": "",
    "timm/models/vision_transformer.py": '''
from torch import nn

class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features, act_layer, drop=0.0):
        super().__init__()
        self.fc1, self.act, self.drop1 = nn.Linear(in_features, hidden_features), act_layer(), nn.Dropout(drop)
        self.norm, self.fc2, self.drop2 = nn.Identity(), nn.Linear(hidden_features, in_features), nn.Dropout(drop)

    def forward(self, x):
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))
''',
    "librosa/__init__.py": "",
    "librosa/filters/__init__.py": "def mel(*a, **k):\n    raise NotImplementedError\n",
    "pytorch_lightning/__init__.py": "from torch import nn\n\nclass LightningModule(nn.Module):\n    pass\n",
    "torchcde/__init__.py": "CubicSpline = hermite_cubic_coefficients_with_backward_differences = natural_cubic_coeffs = None\n",
    "torchsde/__init__.py": "",
}


def official_detokenizer(folder: Path):
    import torch
    from kimia_infer.models.detokenizer import PrefixStreamingFlowMatchingDetokenizer
    from kimia_infer.models.detokenizer.bigvgan_wrapper import BigVGANWrapper
    from kimia_infer.models.detokenizer.semantic_fm_prefix_streaming import StreamingSemanticFMWrapper
    from kimia_infer.models.detokenizer.vocoder.bigvgan import BigVGAN
    from kimia_infer.models.detokenizer.vocoder.utils import AttrDict

    h = AttrDict(json.loads((folder / "vocoder" / "config.json").read_text()))
    vocoder = BigVGAN(h, False)
    vocoder.load_state_dict(torch.load(folder / "vocoder" / "model.pt", weights_only=True)["generator"])
    fm = StreamingSemanticFMWrapper.from_pretrained(str(folder / "audio_detokenizer" / "config.yaml"),
                                                    str(folder / "audio_detokenizer" / "model.pt"), "cpu",
                                                    max_prompt_chunk=10, use_cfg=False)
    return PrefixStreamingFlowMatchingDetokenizer(BigVGANWrapper(vocoder, "cpu", h), fm, look_ahead_tokens=12)


def official_loop(det, codes):
    """The chunk loop of the official `KimiAudio.detokenize_audio` (first 30, then 30 at a time)."""
    import torch

    det.clear_states()
    n, pieces = codes.size(1), []
    pieces.append(det.detokenize_streaming(codes[:, :30], is_final=n <= 30, upsample_factor=4))
    rest = codes[:, 30:]
    for i in range(0, rest.size(1), 30):
        pieces.append(det.detokenize_streaming(rest[:, i:i + 30], upsample_factor=4, is_final=i + 30 >= rest.size(1)))
    return torch.cat(pieces, dim=-1)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--official", required=True, type=Path, help="checkout holding kimia_infer/")
    ap.add_argument("--torchdyn", required=True, type=Path, help="folder torchdyn was installed into (--target)")
    ap.add_argument("--lengths", default="1,30,75,1100", help="code counts to compare")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="kimi-parity-"))
    for rel, text in STANDINS.items():
        (work / "standins" / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / "standins" / rel).write_text(text)
    sys.path[:0] = [str(args.official), str(work / "standins"), str(args.torchdyn)]

    import torch

    from kimi_lora_cli.loading import load_detokenizer
    from kimi_lora_cli.models.detokenizer.config import DiTConfig, VocoderConfig
    from kimi_lora_cli.models.detokenizer.tiny import TinyDetokenizerSpec, build_tiny_detokenizer

    small = dict(semantic_vocab_size=128, hidden_size=32, depth=2, num_heads=2, mlp_ratio=2.0)
    variants = {
        "rotary, no absolute positions, SnakeBeta, clamp": TinyDetokenizerSpec(),
        "sincos positions, Snake, tanh": TinyDetokenizerSpec(
            dit=DiTConfig(**small, use_rope=False, position_embedding_type="sincos"),
            vocoder=VocoderConfig(upsample_rates=(8, 6, 10), upsample_kernel_sizes=(16, 12, 20),
                                  upsample_initial_channel=32, resblock_kernel_sizes=(3, 5),
                                  resblock_dilation_sizes=((1, 3), (1, 3)), activation="snake",
                                  snake_logscale=False)),
        "learnable positions + rotary": TinyDetokenizerSpec(
            dit=DiTConfig(**small, use_rope=True, position_embedding_type="learnable")),
    }
    failures = 0
    for k, (name, spec) in enumerate(variants.items()):
        folder = build_tiny_detokenizer(work / f"release{k}", spec)
        ref, ours = official_detokenizer(folder), load_detokenizer(folder, dtype="bfloat16")
        for n in map(int, args.lengths.split(",")):
            codes = torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(n))
            torch.manual_seed(7)
            t = time.perf_counter()
            a = official_loop(ref, codes)
            ta = time.perf_counter() - t
            t = time.perf_counter()
            b = ours.detokenize(codes[0], generator=torch.Generator().manual_seed(7))
            tb = time.perf_counter() - t
            same = a.shape == b.shape and torch.equal(a, b)
            diff = (a - b).abs().max().item() if a.shape == b.shape else float("nan")
            failures += not same
            print(f"{name:48s} {n:5d} codes: {b.numel()} samples, identical={same} max|diff|={diff:.3g} "
                  f"(official {ta:.1f} s, kimi-lora {tb:.1f} s)", flush=True)
    if failures:
        raise SystemExit(f"{failures} comparisons differ")


if __name__ == "__main__":
    main()
