"""BigVGAN vocoder (mel [B, mels, frames] -> waveform [B, 1, frames * hop]) in plain PyTorch.

conv_pre, then per stage a transposed-conv upsampler and `len(resblock_kernel_sizes)` AMP blocks
whose outputs are averaged, then an anti-aliased activation, conv_post and tanh (or a clamp to
[-1, 1]). An AMP block (resblock "1") adds, per dilation d, act -> conv(k, d) -> act -> conv(k, 1)
to its input. Every activation is anti-aliased: upsample x2 (zero-stuffing + Kaiser-windowed sinc,
replicate padding), Snake / SnakeBeta, low-pass and decimate x2.

The convolutions here carry plain `weight` tensors; the release `vocoder/model.pt` stores them
weight-normalised (`weight_g`, `weight_v`), which `checkpoint.py` folds (w = g * v / |v|, norm over
every dim but the first) while loading. Tensor names otherwise match the file: conv_pre, ups.I.0,
resblocks.J.convs1.K / convs2.K, resblocks.J.activations.K.{act.alpha, act.beta, upsample.filter,
downsample.lowpass.filter}, activation_post.*, conv_post.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kimi_lora_cli.models.detokenizer.config import VocoderConfig

ALIAS_KERNEL = 12


def kaiser_sinc_filter(cutoff: float, half_width: float, kernel_size: int) -> Tensor:
    """Low-pass FIR [1, 1, K]: Kaiser window (beta from the transition width) times a sinc, sum 1."""
    even = kernel_size % 2 == 0
    half = kernel_size // 2
    attenuation = 2.285 * (half - 1) * math.pi * (4 * half_width) + 7.95  # dB
    if attenuation > 50.0:
        beta = 0.1102 * (attenuation - 8.7)
    elif attenuation >= 21.0:
        beta = 0.5842 * (attenuation - 21) ** 0.4 + 0.07886 * (attenuation - 21.0)
    else:
        beta = 0.0
    window = torch.kaiser_window(kernel_size, beta=beta, periodic=False)
    time = (torch.arange(-half, half) + 0.5) if even else (torch.arange(kernel_size) - half)
    taps = 2 * cutoff * window * torch.sinc(2 * cutoff * time)
    taps = taps / taps.sum()
    return taps.view(1, 1, kernel_size)


class UpSample1d(nn.Module):
    """x ratio: replicate-pad, transposed conv with the low-pass taps (times ratio), crop to ratio * T."""

    def __init__(self, ratio: int = 2, kernel_size: int = ALIAS_KERNEL) -> None:
        super().__init__()
        self.ratio, self.kernel_size = ratio, kernel_size
        self.pad = kernel_size // ratio - 1
        self.crop_left = self.pad * ratio + (kernel_size - ratio) // 2
        self.crop_right = self.pad * ratio + (kernel_size - ratio + 1) // 2
        self.register_buffer("filter", kaiser_sinc_filter(0.5 / ratio, 0.6 / ratio, kernel_size))

    def taps(self) -> Tensor:
        return kaiser_sinc_filter(0.5 / self.ratio, 0.6 / self.ratio, self.kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        channels = x.shape[1]
        x = F.pad(x, (self.pad, self.pad), mode="replicate")
        x = self.ratio * F.conv_transpose1d(x, self.filter.expand(channels, -1, -1), stride=self.ratio,
                                            groups=channels)
        return x[..., self.crop_left : x.shape[-1] - self.crop_right]


class LowPassFilter1d(nn.Module):
    def __init__(self, cutoff: float, half_width: float, stride: int, kernel_size: int) -> None:
        super().__init__()
        self.stride, self.cutoff, self.half_width, self.kernel_size = stride, cutoff, half_width, kernel_size
        self.pad_left = kernel_size // 2 - int(kernel_size % 2 == 0)
        self.pad_right = kernel_size // 2
        self.register_buffer("filter", kaiser_sinc_filter(cutoff, half_width, kernel_size))

    def taps(self) -> Tensor:
        return kaiser_sinc_filter(self.cutoff, self.half_width, self.kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        channels = x.shape[1]
        x = F.pad(x, (self.pad_left, self.pad_right), mode="replicate")
        return F.conv1d(x, self.filter.expand(channels, -1, -1), stride=self.stride, groups=channels)


class DownSample1d(nn.Module):
    def __init__(self, ratio: int = 2, kernel_size: int = ALIAS_KERNEL) -> None:
        super().__init__()
        self.lowpass = LowPassFilter1d(0.5 / ratio, 0.6 / ratio, ratio, kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.lowpass(x)


class Snake(nn.Module):
    """x + sin^2(a x) / a per channel (a = exp(alpha) with logscale); SnakeBeta divides by b instead."""

    def __init__(self, channels: int, logscale: bool, beta: bool) -> None:
        super().__init__()
        self.logscale = logscale
        init = torch.zeros(channels) if logscale else torch.ones(channels)
        self.alpha = nn.Parameter(init.clone())
        self.beta = nn.Parameter(init.clone()) if beta else None

    def forward(self, x: Tensor) -> Tensor:
        alpha = self.alpha[None, :, None]
        beta = self.beta[None, :, None] if self.beta is not None else alpha
        if self.logscale:
            alpha, beta = torch.exp(alpha), torch.exp(beta)
        return x + (1.0 / (beta + 1e-9)) * torch.sin(x * alpha).pow(2)


class Activation1d(nn.Module):
    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.act = act
        self.upsample = UpSample1d(2)
        self.downsample = DownSample1d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.downsample(self.act(self.upsample(x)))


def same_padding(kernel_size: int, dilation: int = 1) -> int:
    return (kernel_size * dilation - dilation) // 2


class AMPBlock1(nn.Module):
    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...], make_act) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(nn.Conv1d(channels, channels, kernel_size, dilation=d,
                                              padding=same_padding(kernel_size, d)) for d in dilations)
        self.convs2 = nn.ModuleList(nn.Conv1d(channels, channels, kernel_size, padding=same_padding(kernel_size))
                                    for _ in dilations)
        self.activations = nn.ModuleList(Activation1d(make_act(channels)) for _ in range(2 * len(dilations)))

    def forward(self, x: Tensor) -> Tensor:
        for k, (c1, c2) in enumerate(zip(self.convs1, self.convs2)):
            a1, a2 = self.activations[2 * k], self.activations[2 * k + 1]
            x = x + c2(a2(c1(a1(x))))
        return x


class BigVGAN(nn.Module):
    def __init__(self, cfg: VocoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        beta = cfg.activation == "snakebeta"

        def make_act(channels: int) -> nn.Module:
            return Snake(channels, cfg.snake_logscale, beta)

        c0 = cfg.upsample_initial_channel
        self.conv_pre = nn.Conv1d(cfg.num_mels, c0, 7, 1, padding=3)
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        for i, (rate, kernel) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)):
            ch = c0 // 2 ** (i + 1)
            self.ups.append(nn.ModuleList([nn.ConvTranspose1d(c0 // 2**i, ch, kernel, rate,
                                                              padding=(kernel - rate) // 2)]))
            for k, dil in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes):
                self.resblocks.append(AMPBlock1(ch, k, dil, make_act))
        self.activation_post = Activation1d(make_act(ch))
        self.conv_post = nn.Conv1d(ch, 1, 7, 1, padding=3, bias=cfg.use_bias_at_final)

    def forward(self, mel: Tensor) -> Tensor:
        x = self.conv_pre(mel)
        n = len(self.cfg.resblock_kernel_sizes)
        for i, up in enumerate(self.ups):
            x = up[0](x)
            blocks = self.resblocks[i * n : (i + 1) * n]
            total = blocks[0](x)
            for block in blocks[1:]:
                total = total + block(x)
            x = total / n
        x = self.conv_post(self.activation_post(x))
        return torch.tanh(x) if self.cfg.use_tanh_at_final else torch.clamp(x, -1.0, 1.0)

    def weight_normed(self) -> list[str]:
        """Names of the convolutions the release file stores as weight_g / weight_v."""
        return [name for name, m in self.named_modules() if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d))]
