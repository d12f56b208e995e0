"""Semantic tokens -> waveform, chunk by chunk, by the official Kimi-Audio streaming rules.

Python API::

    detok = load_detokenizer("Kimi-Audio-7B-Instruct")            # kimi_lora_cli.loading
    wav = detok.detokenize(codes, generator=torch.Generator().manual_seed(0))   # float32 [samples]
    wav = detok.detokenize(codes, noise=[...])   # explicit initial noise, one [frames, mels] per chunk
    detok.noise_shapes(len(codes))               # the shapes those tensors must have

Rules (official `KimiAudio.detokenize_audio` + `get_audio_detokenizer`):
  * chunks: the first 30 codes, then 30 at a time; the last chunk is final;
  * each code becomes `upsample` (4) mel frames (12.5 Hz -> 50 Hz);
  * look-ahead: a non-final chunk holds back its last 12 codes' frames (48): they are generated
    but not emitted, and lead the next chunk (whose noise therefore covers 48 + 4 n frames);
  * per chunk, Euler integration of the DiT velocity from the noise, over `ode_steps` time points
    0 .. 1 (`ode_steps - 1` steps; time fed to the DiT as int(t * 1000)); the chunk attends to the
    cached keys/values of all earlier chunks (the newest 900 frames);
  * after a non-final chunk the cache is refreshed with the emitted (clean) frames at t = 0.999, and
    positions advance by the emitted frames; when the next chunk could pass 4096 positions, the
    cache and positions restart (from the voice prompt, if one was set);
  * mel = frames * mel_std + mel_mean when the config normalises mel;
  * waveform: each chunk's mel is vocoded together with the mel kept from the previous chunk, and
    the seam is cross-faded with a Hamming window over the audio kept from the previous chunk; the
    first chunk emits half its audio and keeps half; the final chunk emits everything left. In all,
    n codes give exactly n * upsample * hop samples.

Noise: drawn as float32 `torch.randn(frames, mels)` on the CPU from `generator`, chunk after
chunk, then cast to the model dtype: seeding a generator with s draws the same numbers as
`torch.manual_seed(s)` before the official `detokenize_audio` (which draws from the global
generator). A voice prompt (`set_prompt`, official `prefill`) is optional and not used by `infer`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from kimi_lora_cli.models.detokenizer.dit import DiT, DiTCache
from kimi_lora_cli.models.detokenizer.vocoder import BigVGAN

REFRESH_TIME = 0.999  # flow time at which emitted frames are written into the cache


@dataclass(frozen=True)
class StreamingRules:
    first_chunk_tokens: int = 30
    chunk_tokens: int = 30
    upsample: int = 4
    look_ahead_tokens: int = 12
    max_prompt_chunks: int = 10
    prompt_chunk_frames: int = 150
    max_kv_cache_frames: int = 900
    max_positions: int = 4096
    ode_steps: int = 30

    def __post_init__(self) -> None:
        if self.ode_steps < 2:
            raise ValueError(f"ode_steps must be >= 2 (time points 0 .. 1), not {self.ode_steps}")
        if min(self.first_chunk_tokens, self.chunk_tokens, self.upsample, self.prompt_chunk_frames) < 1:
            raise ValueError("chunk sizes and upsample must be >= 1")


@dataclass(frozen=True)
class Chunk:
    start: int  # code index
    end: int
    is_final: bool


def plan_chunks(n_tokens: int, rules: StreamingRules = StreamingRules()) -> list[Chunk]:
    """Code ranges of the official loop: [0, first), then `chunk_tokens` at a time; the last is final."""
    if n_tokens <= 0:
        return []
    first = rules.first_chunk_tokens
    chunks = [Chunk(0, min(first, n_tokens), n_tokens <= first)]
    for start in range(first, n_tokens, rules.chunk_tokens):
        end = min(start + rules.chunk_tokens, n_tokens)
        chunks.append(Chunk(start, end, end >= n_tokens))
    return chunks


def plan_prompt(frames: int, rules: StreamingRules = StreamingRules()) -> list[tuple[int, int]]:
    """Frame ranges a voice prompt is fed in: the oldest rest as one piece, then up to
    `max_prompt_chunks` pieces of `prompt_chunk_frames` (official `prefill`; empty pieces skipped)."""
    size = rules.prompt_chunk_frames
    count = min(frames // size, rules.max_prompt_chunks)
    rest = frames - count * size
    pieces = [(0, rest)] if rest > 0 else []
    return pieces + [(rest + i * size, rest + (i + 1) * size) for i in range(count)]


def euler(velocity: Callable[[Tensor, Tensor], Tensor], x: Tensor, points: int) -> Tensor:
    """Fixed-step Euler over `points` equally spaced times in [0, 1] (float32 time arithmetic as in
    torchdyn's fixed-step solver: t advances by dt, each dt = next grid point - current t)."""
    grid = torch.linspace(0, 1, points)
    t, dt = grid[0], grid[1] - grid[0]
    for step in range(1, points):
        x = x + dt * velocity(t, x)
        t = t + dt
        if step < points - 1:
            dt = grid[step + 1] - t
    return x


def flow_time_ids(t: Tensor, batch: int, device: torch.device) -> Tensor:
    return torch.zeros(batch, dtype=torch.long, device=device) + (t * 1000).long().to(device)


class Detokenizer:
    """DiT + vocoder with the streaming state of one utterance (not thread-safe: one stream at a time)."""

    def __init__(self, dit: DiT, vocoder: BigVGAN, rules: StreamingRules = StreamingRules()) -> None:
        self.dit, self.vocoder, self.rules = dit, vocoder, rules
        self.dtype = next(dit.parameters()).dtype
        self.device = next(dit.parameters()).device
        self._prompt: tuple[DiTCache, int] | None = None
        self.reset()

    @property
    def sampling_rate(self) -> int:
        return self.vocoder.cfg.sampling_rate

    @property
    def hop(self) -> int:
        return self.vocoder.cfg.hop_size

    @property
    def n_mels(self) -> int:
        return self.dit.cfg.input_size

    def samples_for(self, n_tokens: int) -> int:
        """Waveform length of `n_tokens` codes."""
        return n_tokens * self.rules.upsample * self.hop

    # -- state -------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the utterance in progress (a voice prompt, if set, stays)."""
        self._restart_positions()
        self._carry: Tensor | None = None  # frame tokens held back by the look-ahead
        self._pre_mel: Tensor | None = None
        self._pre_wav: Tensor | None = None

    def _restart_positions(self) -> None:
        if self._prompt is not None:
            self.cache, self.position = self._prompt[0].copy(), self._prompt[1]
        else:
            self.cache, self.position = self.dit.new_cache(), 0

    @torch.inference_mode()
    def set_prompt(self, mel: Tensor, frame_tokens: Tensor) -> None:
        """Condition later utterances on a voice prompt: mel [frames, mels] (unnormalised log-mel of
        the vocoder) and its codes at frame rate [frames]; the mel is cut or zero-padded to the codes."""
        self._prompt = None
        self.reset()
        n = frame_tokens.shape[0]
        mel = mel[:n] if mel.shape[0] >= n else torch.nn.functional.pad(mel, (0, 0, 0, n - mel.shape[0]))
        cfg = self.dit.cfg
        for a, b in plan_prompt(n, self.rules):
            x = mel[a:b].to(self.device, self.dtype)[None]
            if cfg.normalize_mel:
                x = (x - cfg.mel_mean) / cfg.mel_std
            tokens = frame_tokens[a:b].to(self.device)[None]
            self._forward(x, tokens, torch.tensor([REFRESH_TIME]), self.position)
            self.position += b - a
            self.cache.commit(self.rules.max_kv_cache_frames)
        self._prompt = (self.cache.copy(), self.position)

    def clear_prompt(self) -> None:
        self._prompt = None
        self.reset()

    # -- one chunk ---------------------------------------------------------------------------

    def _forward(self, x: Tensor, tokens: Tensor, t: Tensor, start: int) -> Tensor:
        positions = torch.arange(start, start + x.shape[1], device=self.device)[None]
        return self.dit(x, tokens, flow_time_ids(t, x.shape[0], self.device), positions, self.cache)

    def _mel_chunk(self, tokens: Tensor, noise: Tensor, look_ahead: int) -> Tensor:
        """Frames [n - look_ahead, mels] (denormalised) for frame tokens [n] from noise [n, mels]."""
        start = self.position
        tokens = tokens.to(self.device)[None]
        x0 = noise.to(self.device).to(self.dtype)[None]
        x = euler(lambda t, x: self._forward(x, tokens, t, start), x0, self.rules.ode_steps)
        if look_ahead > 0:
            self._carry = tokens[0, -look_ahead:]
            x = x[:, :-look_ahead]
            self._forward(x, tokens[:, :-look_ahead], torch.tensor([REFRESH_TIME]), start)
        cfg = self.dit.cfg
        if cfg.normalize_mel:
            x = x * cfg.mel_std + cfg.mel_mean
        self.position += x.shape[1]
        self.cache.commit(self.rules.max_kv_cache_frames)
        return x[0]

    def _vocode(self, mel: Tensor) -> Tensor:
        return self.vocoder(mel.transpose(0, 1)[None])[0, 0]

    def _emit(self, mel: Tensor, is_final: bool) -> Tensor:
        """Waveform for this chunk's mel, smoothed against the previous chunk (see module docstring)."""
        frames = mel.shape[0]
        if self._pre_mel is None:
            wav = self._vocode(mel)
            if is_final:
                return wav
            half = self.hop * frames // 2
            self._pre_wav, self._pre_mel = wav[-half:], mel[(-frames) // 2 :]
            return wav[:half]
        wav = self._vocode(torch.cat([self._pre_mel, mel]))
        if is_final:
            return wav
        kept = self._pre_wav.shape[0]
        size = 2 * kept if wav.shape[0] > 2 * kept else wav.shape[0] // 2
        half = size // 2
        window = torch.hamming_window(size).to(wav.dtype).to(wav.device)
        out = wav[:size].clone()
        out[:half] = self._pre_wav[:half] * window[-half:] + out[:half] * window[:half]
        rest = wav.shape[0] - size
        self._pre_wav = wav[-rest:]
        self._pre_mel = mel[-(rest // self.hop) :]
        return out

    @torch.inference_mode()
    def push(self, codes: Tensor, is_final: bool, noise: Tensor | None = None,
             generator: torch.Generator | None = None) -> Tensor:
        """Feed the next chunk of codes [n]; returns its float32 waveform piece. `noise`: the initial
        noise [frames, mels] (frames = look-ahead carry + n * upsample); else drawn from `generator`."""
        r = self.rules
        tokens = codes.reshape(-1).long().to(self.device).repeat_interleave(r.upsample)
        if self._carry is not None:
            tokens = torch.cat([self._carry, tokens])
        if noise is None:
            noise = torch.randn(tokens.shape[0], self.n_mels, generator=generator)
        elif tuple(noise.shape) != (tokens.shape[0], self.n_mels):
            raise ValueError(f"noise for this chunk must have shape {(tokens.shape[0], self.n_mels)}, "
                             f"not {tuple(noise.shape)}")
        look_ahead = 0 if is_final else r.look_ahead_tokens * r.upsample
        mel = self._mel_chunk(tokens, noise, look_ahead)
        wav = self._emit(mel, is_final).float()
        if is_final:
            self.reset()
        elif self.position + 2 * mel.shape[0] > r.max_positions:
            self._restart_positions()
        return wav

    # -- whole utterances ----------------------------------------------------------------------

    def noise_shapes(self, n_tokens: int) -> list[tuple[int, int]]:
        """Shape of each chunk's initial noise for `n_tokens` codes (what `detokenize(noise=...)` takes)."""
        r, shapes, carry = self.rules, [], 0
        for chunk in plan_chunks(n_tokens, r):
            shapes.append((carry + (chunk.end - chunk.start) * r.upsample, self.n_mels))
            carry = 0 if chunk.is_final else r.look_ahead_tokens * r.upsample
        return shapes

    @torch.inference_mode()
    def detokenize(self, codes: Sequence[int] | Tensor, *, generator: torch.Generator | None = None,
                   noise: Sequence[Tensor] | None = None) -> Tensor:
        """Codes (GLM-4-Voice semantic ids, no offset) -> float32 waveform [n * upsample * hop]."""
        codes = torch.as_tensor(codes, dtype=torch.long).reshape(-1)
        chunks = plan_chunks(codes.shape[0], self.rules)
        if noise is not None and len(noise) != len(chunks):
            raise ValueError(f"noise: expected {len(chunks)} tensors (one per chunk), got {len(noise)}")
        vocab = self.dit.cfg.semantic_vocab_size
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= vocab):
            raise ValueError(f"codes must lie in [0, {vocab}), found {int(codes.min())}..{int(codes.max())}")
        self.reset()
        pieces = [torch.zeros(0)]
        try:
            for k, chunk in enumerate(chunks):
                pieces.append(self.push(codes[chunk.start : chunk.end], chunk.is_final,
                                        noise=None if noise is None else noise[k], generator=generator).cpu())
        finally:
            self.reset()
        return torch.cat(pieces)
