"""Continuous features: 16 kHz waveform -> Whisper-large-v3 encoder -> 12.5 Hz rows.

Python API::

    enc = WhisperFeatureEncoder.from_folder("Kimi-Audio-7B-Instruct/whisper-large-v3")
    rows = enc.encode(waveform_16k)      # [num_rows(len), 4 * d_model] (5120 for large-v3)

The recipe (reference document, section 3): split into 30 s pieces of 480,000 samples;
per piece token_len = (L - 1) // 1280 + 1; zero-pad to 30 s; 128-bin log-mel (n_fft 400,
hop 160, Hann, last frame dropped, log10 floor 1e-10, clamp to max - 8, (x + 4) / 4);
the encoder's 1500 output frames; keep token_len * 4 frames; concatenate the pieces and
fold 4 consecutive frames into one row. One row lines up with one semantic code.

The official encoder input is the log-mel rounded to bfloat16 whatever the run's dtype (the model was
trained on those rounded values), so `encode` rounds it too by default; `mel_dtype=None` (constructor
argument or attribute) keeps the float32 log-mel instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from transformers import WhisperConfig

SAMPLE_RATE = 16000
CHUNK_SAMPLES = 30 * SAMPLE_RATE
SAMPLES_PER_ROW = 1280  # 16 kHz / 12.5 Hz
N_FFT = 400
HOP = 160
FRAMES_PER_ROW = 4

WHISPER_PREFIXES = ("model.encoder.", "encoder.", "whisper_model.speech_encoder.")


def rows_for_samples(num_samples: int) -> int:
    """How many feature rows (= semantic codes) a waveform of `num_samples` yields."""
    rows = 0
    for start in range(0, max(num_samples, 1), CHUNK_SAMPLES):
        piece = min(CHUNK_SAMPLES, num_samples - start)
        rows += (piece - 1) // SAMPLES_PER_ROW + 1 if piece > 0 else 0
    return rows


_FILTER_CACHE: dict[int, torch.Tensor] = {}


def mel_filters(n_mels: int) -> torch.Tensor:
    """Slaney-normalised mel filterbank [n_mels, 201], as Whisper's `mel_filters.npz`."""
    if n_mels not in _FILTER_CACHE:
        from transformers.audio_utils import mel_filter_bank

        fb = mel_filter_bank(
            num_frequency_bins=1 + N_FFT // 2,
            num_mel_filters=n_mels,
            min_frequency=0.0,
            max_frequency=SAMPLE_RATE / 2,
            sampling_rate=SAMPLE_RATE,
            norm="slaney",
            mel_scale="slaney",
        )
        _FILTER_CACHE[n_mels] = torch.from_numpy(np.asarray(fb, dtype=np.float32).T.copy())
    return _FILTER_CACHE[n_mels]


def log_mel(pieces: torch.Tensor, n_mels: int = 128, signal_samples: int | None = None) -> torch.Tensor:
    """[N, 480000] float32 pieces -> [N, n_mels, 3000] Whisper log-mel features.

    `signal_samples` (optional): no piece has a non-zero sample at or after this index. Frames that
    see only the zero padding have zero power, so they are filled in directly (log10(1e-10))
    instead of being transformed; the result is bit-for-bit the same, and a short clip costs
    a short STFT."""
    window = torch.hann_window(N_FFT, device=pieces.device)
    frames = pieces.shape[-1] // HOP
    need = frames if signal_samples is None else min(frames, max(signal_samples // HOP + 3, 256))
    cut = min(pieces.shape[-1], (need + 2) * HOP + N_FFT)
    stft = torch.stft(pieces[:, :cut], N_FFT, HOP, window=window, return_complex=True)
    power = stft[..., :need].abs() ** 2
    mel = mel_filters(n_mels).to(pieces.device) @ power
    log_spec = torch.clamp(mel, min=1e-10).log10()
    if need < frames:
        floor = torch.tensor(1e-10, dtype=mel.dtype, device=pieces.device).log10()
        log_spec = torch.cat([log_spec, floor.expand(*log_spec.shape[:-1], frames - need)], dim=-1)
    log_spec = torch.maximum(log_spec, log_spec.amax(dim=(-2, -1), keepdim=True) - 8.0)
    return (log_spec + 4.0) / 4.0


def split_pieces(waveform: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
    """30 s pieces, each zero-padded to 480,000 samples, with its row count."""
    out = []
    for start in range(0, waveform.shape[0], CHUNK_SAMPLES):
        piece = waveform[start : start + CHUNK_SAMPLES]
        rows = (piece.shape[0] - 1) // SAMPLES_PER_ROW + 1
        out.append((torch.nn.functional.pad(piece, (0, CHUNK_SAMPLES - piece.shape[0])), rows))
    return out


def whisper_config_from_tensors(shapes: dict[str, tuple[int, ...]]) -> WhisperConfig:
    """Rebuild a WhisperConfig from encoder tensor shapes (for folders without a config.json)."""
    from transformers import WhisperConfig

    d_model, n_mels = shapes["conv1.weight"][0], shapes["conv1.weight"][1]
    layers = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("layers."))
    ffn = shapes["layers.0.fc1.weight"][0]
    positions = shapes["embed_positions.weight"][0]
    return WhisperConfig(
        num_mel_bins=n_mels,
        d_model=d_model,
        encoder_layers=layers,
        encoder_attention_heads=max(1, d_model // 64),
        encoder_ffn_dim=ffn,
        max_source_positions=positions,
    )


class WhisperFeatureEncoder:
    """Frozen Whisper encoder plus the mel front end; produces the adaptor's input rows."""

    def __init__(self, encoder: torch.nn.Module, source: str = "", mel_dtype: torch.dtype | None = torch.bfloat16
                 ) -> None:
        self.encoder = encoder.eval().requires_grad_(False)
        self.source = source
        self.mel_dtype = mel_dtype  # the log-mel is rounded to this before the encoder (official: bfloat16)
        self.n_mels = encoder.config.num_mel_bins
        self.row_dim = encoder.config.d_model * FRAMES_PER_ROW

    @staticmethod
    def build(config: WhisperConfig, device: str | torch.device = "meta") -> torch.nn.Module:
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        config._attn_implementation = "sdpa"
        with torch.device(device):
            return WhisperEncoder(config)

    @classmethod
    def from_state_dict(
        cls,
        config: WhisperConfig,
        state: dict[str, torch.Tensor],
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        source: str = "",
    ) -> WhisperFeatureEncoder:
        encoder = cls.build(config)
        expected = set(encoder.state_dict())
        missing = sorted(expected - set(state))
        if missing:
            raise KeyError(f"Whisper encoder weights missing: {', '.join(missing[:5])}"
                           + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
        state = {k: v.to(device=device, dtype=dtype) for k, v in state.items() if k in expected}
        encoder.load_state_dict(state, strict=True, assign=True)
        return cls(encoder, source)

    @property
    def device(self) -> torch.device:
        return self.encoder.conv1.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv1.weight.dtype

    @torch.no_grad()
    def encode_batch(self, waveforms: list[torch.Tensor | np.ndarray], max_pieces: int = 8) -> list[torch.Tensor]:
        """Feature rows for each 16 kHz mono waveform; all 30 s pieces are batched together."""
        pieces, owners = [], []
        for i, wav in enumerate(waveforms):
            wav = torch.as_tensor(np.asarray(wav, dtype=np.float32) if not torch.is_tensor(wav) else wav)
            wav = wav.float().reshape(-1)
            if wav.numel() == 0:
                raise ValueError("empty waveform")
            for piece, rows in split_pieces(wav):
                pieces.append((piece, rows))
                owners.append(i)
        frames: list[torch.Tensor] = []
        for start in range(0, len(pieces), max_pieces):
            group = pieces[start : start + max_pieces]
            batch = torch.stack([p for p, _ in group]).to(self.device)
            signal = max(r for _, r in group) * SAMPLES_PER_ROW  # no piece has audio past this sample
            mel = log_mel(batch, self.n_mels, signal_samples=signal)
            if self.mel_dtype is not None:
                mel = mel.to(self.mel_dtype)
            mel = mel.to(self.dtype)
            hidden = self.encoder(mel).last_hidden_state
            frames.extend(hidden[k, : rows * FRAMES_PER_ROW] for k, (_, rows) in enumerate(group))
        out: list[list[torch.Tensor]] = [[] for _ in waveforms]
        for owner, f in zip(owners, frames):
            out[owner].append(f)
        return [torch.cat(parts).reshape(-1, self.row_dim) for parts in out]

    def encode(self, waveform: torch.Tensor | np.ndarray) -> torch.Tensor:
        """[rows_for_samples(len(waveform)), 4 * d_model] feature rows for one 16 kHz waveform."""
        return self.encode_batch([waveform])[0]


def load_whisper_dir(folder: Path) -> tuple[WhisperConfig | None, Path]:
    """Config (if the folder has one) and weights file of a `whisper-large-v3/` folder."""
    from transformers import WhisperConfig

    cfg = WhisperConfig.from_json_file(str(folder / "config.json")) if (folder / "config.json").is_file() else None
    return cfg, folder / "model.safetensors"


def strip_whisper_prefix(key: str) -> str | None:
    """Encoder-relative name of a Whisper key, or None for decoder / non-encoder keys."""
    for prefix in WHISPER_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return None
