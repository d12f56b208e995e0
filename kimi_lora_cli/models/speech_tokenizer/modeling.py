"""GLM-4-Voice speech tokenizer: the Whisper-VQ encoder up to its codebook, and the audio front end.

Python API::

    from kimi_lora_cli.loading import load_speech_tokenizer
    tok = load_speech_tokenizer("glm-4-voice-tokenizer")         # config.json + model.safetensors
    codes = tok.tokenize(wave16k)                                # [codes_for_samples(len(wave))] ints
    codes = tok.tokenize_batch([w1, w2, ...], batch_size=8)      # same codes as one by one

Encoder (reference document, section 7): causal Conv1d(k3, s1) -> GELU -> causal Conv1d(k3, s2)
-> GELU (left padding 2 frames, so no frame sees the future), plus learned positions; then the
first `quantize_position` Whisper encoder layers with block-causal attention (a frame sees every
frame of its own block of `quantize_causal_block_size` frames and of all earlier blocks); after
layer `pooling_position` an average pool by `pooling_kernel_size` (right-padded to a multiple),
the block shrinking by the same factor; after layer `quantize_position` the index of the nearest
(L2) codebook row. No final layer norm: the codes are taken inside the encoder.

Front end: the audio is cut into 30 s pieces. Each piece is zero-padded to a multiple of 1280
samples (hop 160 x conv stride 2 x pool 4) and turned into Whisper's 128-bin log-mel. A frame
is valid when its first sample lies inside the audio (frame f: f * 160 < L); subsampling that
mask by 2 (conv) and by 4 (pool) selects the valid codes, so a piece of L samples yields
ceil(L / 1280) codes. The official extractor pads every piece of a batch to the longest one
before the log-mel, which can change the last frames of shorter pieces (the STFT reflects at the
end of the padded array); here each piece is padded on its own (what the official code computes
for a batch of one), then the mel frames are padded for batching. Convolutions are causal and
padded keys are masked, so a piece's codes do not depend on what it is batched with.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kimi_lora_cli.models.kimi_audio.whisper import HOP, log_mel
from kimi_lora_cli.models.speech_tokenizer.configuration import SpeechTokenizerConfig

SAMPLE_RATE = 16000
CHUNK_SAMPLES = 30 * SAMPLE_RATE


def chunk_lengths(num_samples: int) -> list[int]:
    """Lengths of the 30 s pieces a waveform of `num_samples` is cut into."""
    return [min(CHUNK_SAMPLES, num_samples - s) for s in range(0, num_samples, CHUNK_SAMPLES)]


def codes_for_samples(num_samples: int, samples_per_code: int = 1280) -> int:
    """Codes a waveform yields: ceil(L / 1280) per 30 s piece (0 for an empty waveform)."""
    return sum(-(-n // samples_per_code) for n in chunk_lengths(num_samples))


def padded_length(num_samples: int, multiple: int = 1280) -> int:
    return -(-num_samples // multiple) * multiple


def frame_mask(num_samples: int, num_frames: int) -> torch.Tensor:
    """[num_frames] bool: mel frame f is valid when sample f * hop lies inside the audio."""
    return torch.arange(num_frames) * HOP < num_samples


class CausalConv1d(nn.Conv1d):
    """Conv1d padded on the left only, so output frame t sees input frames up to t."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0)
        self.left_pad = kernel_size - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.left_pad, 0)))


class VQSelfAttention(nn.Module):
    """Whisper encoder self-attention (q, v, out with bias; k without) over a boolean mask."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
        b, t, d = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, d))


class VQEncoderLayer(nn.Module):
    """Pre-norm Whisper encoder layer; tensor names as in the checkpoint (`layers.N.*`)."""

    def __init__(self, config: SpeechTokenizerConfig) -> None:
        super().__init__()
        d = config.d_model
        self.self_attn = VQSelfAttention(d, config.encoder_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, config.encoder_ffn_dim)
        self.fc2 = nn.Linear(config.encoder_ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)
        act = config.activation_function
        self.act = {"gelu": F.gelu, "relu": F.relu}.get(act) or (lambda x: F.gelu(x, approximate="tanh"))

    def forward(self, x: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), allowed)
        return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))


def attention_allowed(valid: torch.Tensor, block: int | None, causal: bool) -> torch.Tensor:
    """[B, 1, T, T] bool: query i may attend key j (key valid, and j's block <= i's block)."""
    t = valid.shape[1]
    idx = torch.arange(t, device=valid.device)
    if block:
        structure = (idx[None, :] // block) <= (idx[:, None] // block)
    elif causal:
        structure = idx[None, :] <= idx[:, None]
    else:
        structure = torch.ones(t, t, dtype=torch.bool, device=valid.device)
    return structure[None, None] & valid[:, None, None, :]


class WhisperVQEncoder(nn.Module):
    """Mel frames -> code indices at 12.5 Hz (for the GLM-4-Voice config)."""

    def __init__(self, config: SpeechTokenizerConfig) -> None:
        super().__init__()
        self.config = config
        d, mels = config.d_model, config.num_mel_bins
        if config.encoder_causal_convolution:
            self.conv1 = CausalConv1d(mels, d, 3, stride=1)
            self.conv2 = CausalConv1d(d, d, 3, stride=2)
        else:
            self.conv1 = nn.Conv1d(mels, d, 3, stride=1, padding=1)
            self.conv2 = nn.Conv1d(d, d, 3, stride=2, padding=1)
        self.embed_positions = nn.Embedding(config.max_source_positions, d)
        # Only the layers before the codebook matter for the codes.
        self.layers = nn.ModuleList(VQEncoderLayer(config) for _ in range(config.quantize_position))
        self.codebook = nn.Embedding(config.quantize_vocab_size, d)

    def forward(self, mel: torch.Tensor, mel_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mel [B, n_mels, T], mel_valid [B, T] bool -> (codes [B, T'], valid [B, T'])."""
        cfg = self.config
        x = F.gelu(self.conv1(mel))
        x = F.gelu(self.conv2(x)).transpose(1, 2)
        valid = mel_valid[:, :: cfg.frame_stride]
        t = x.shape[1]
        if t > cfg.max_source_positions:
            raise ValueError(f"{t} encoder frames exceed max_source_positions {cfg.max_source_positions}")
        x = x + self.embed_positions.weight[:t].to(x.dtype)
        block = cfg.quantize_causal_block_size
        allowed = attention_allowed(valid, block, cfg.encoder_causal_attention)
        for i, layer in enumerate(self.layers, start=1):
            x = layer(x, allowed)
            if cfg.pooling_kernel_size and i == cfg.pooling_position:
                k = cfg.pooling_kernel_size
                h = x.transpose(1, 2)
                if h.shape[-1] % k:
                    h = F.pad(h, (0, k - h.shape[-1] % k))
                h = F.avg_pool1d(h, k) if cfg.pooling_type == "avg" else F.max_pool1d(h, k)
                x = h.transpose(1, 2)
                valid = valid[:, ::k]
                block = block // k if block else None
                allowed = attention_allowed(valid, block, cfg.encoder_causal_attention)
        return self.quantize(x), valid

    def quantize(self, hidden: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codebook row (squared L2, computed in float32)."""
        flat = hidden.reshape(-1, hidden.shape[-1]).float()
        book = self.codebook.weight.float()
        dist = torch.addmm((book * book).sum(1)[None] + (flat * flat).sum(1, keepdim=True), flat, book.t(),
                           alpha=-2.0)
        return dist.argmin(dim=1).reshape(hidden.shape[:-1])


class SpeechTokenizer:
    """The encoder plus the 16 kHz front end: waveforms -> GLM-4-Voice codes (no offset)."""

    def __init__(self, encoder: WhisperVQEncoder, source: str = "") -> None:
        self.encoder = encoder.eval().requires_grad_(False)
        self.config = encoder.config
        self.source = source

    @property
    def device(self) -> torch.device:
        return self.encoder.codebook.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv1.weight.dtype

    @property
    def vocab_size(self) -> int:
        return self.config.quantize_vocab_size

    def codes_for_samples(self, num_samples: int) -> int:
        return codes_for_samples(num_samples, self.config.samples_per_code)

    @torch.no_grad()
    def tokenize_batch(self, waveforms: Sequence[torch.Tensor | np.ndarray], batch_size: int = 8) -> list[list[int]]:
        """Codes of each 16 kHz mono waveform; 30 s pieces run `batch_size` at a time, longest first."""
        pieces: list[tuple[int, torch.Tensor]] = []
        for i, wav in enumerate(waveforms):
            wav = torch.as_tensor(wav).reshape(-1).float()
            if wav.numel() == 0:
                raise ValueError(f"waveform {i} is empty")
            pieces.extend((i, wav[s : s + CHUNK_SAMPLES]) for s in range(0, wav.numel(), CHUNK_SAMPLES))
        order = sorted(range(len(pieces)), key=lambda j: -pieces[j][1].numel())
        codes: list[list[int]] = [[] for _ in pieces]
        step = max(1, batch_size)
        for start in range(0, len(order), step):
            group = order[start : start + step]
            mel, valid = self._mel_batch([pieces[j][1] for j in group])
            ids, keep = self.encoder(mel.to(self.dtype), valid)
            ids, keep = ids.cpu(), keep.cpu()
            for row, j in enumerate(group):
                codes[j] = ids[row][keep[row]].tolist()
        out: list[list[int]] = [[] for _ in waveforms]
        for (owner, _), c in zip(pieces, codes):
            out[owner].extend(c)
        return out

    def tokenize(self, waveform: torch.Tensor | np.ndarray) -> list[int]:
        return self.tokenize_batch([waveform])[0]

    def _mel_batch(self, pieces: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-mel of each piece padded on its own, then padded to the longest; plus the frame mask."""
        multiple = self.config.samples_per_code
        frames = [padded_length(p.numel(), multiple) // HOP for p in pieces]
        mel = torch.zeros(len(pieces), self.config.num_mel_bins, max(frames), device=self.device)
        valid = torch.zeros(len(pieces), max(frames), dtype=torch.bool, device=self.device)
        by_length: dict[int, list[int]] = {}
        for row, p in enumerate(pieces):
            by_length.setdefault(padded_length(p.numel(), multiple), []).append(row)
        for length, rows in by_length.items():
            batch = torch.stack([F.pad(pieces[r], (0, length - pieces[r].numel())) for r in rows]).to(self.device)
            spec = log_mel(batch, self.config.num_mel_bins)
            for k, r in enumerate(rows):
                mel[r, :, : spec.shape[-1]] = spec[k]
                valid[r, : spec.shape[-1]] = frame_mask(pieces[r].numel(), spec.shape[-1]).to(self.device)
        return mel, valid


def expected_state_shapes(config: SpeechTokenizerConfig) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape the encoder needs (built on the meta device)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in WhisperVQEncoder(config).state_dict().items()}


def build_encoder(config: SpeechTokenizerConfig, state: dict[str, torch.Tensor], dtype: torch.dtype,
                  device: str | torch.device) -> WhisperVQEncoder:
    """Encoder with `state` (exactly the names of `expected_state_shapes`) assigned in place."""
    with torch.device("meta"):
        enc = WhisperVQEncoder(config)
    enc.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, strict=True, assign=True)
    return enc


__all__ = [
    "CHUNK_SAMPLES",
    "SpeechTokenizer",
    "WhisperVQEncoder",
    "build_encoder",
    "chunk_lengths",
    "codes_for_samples",
    "expected_state_shapes",
    "frame_mask",
]
