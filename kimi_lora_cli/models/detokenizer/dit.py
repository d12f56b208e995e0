"""The detokenizer's DiT: (noisy mel frames, semantic tokens, flow time) -> velocity.

Per frame the condition is c = timestep_mlp(sinusoid(t)) + embedding(token); every block is an
adaLN-Zero transformer block (LayerNorm without weights, shift/scale/gate from c) with full
(bidirectional) attention and a GELU(tanh) MLP; the final layer modulates once more and projects
to mel bins. Positions enter through rotary embeddings on q/k (pairs of adjacent channels) and/or
an absolute embedding ("learnable", "sincos", "skip").

Streaming: with a `DiTCache`, a call attends to the committed keys/values of earlier chunks plus
its own; its keys/values are kept as pending and `commit()` makes them the committed ones (the
last `max_frames` frames). So a chunk sees every earlier chunk, never a later one.

Tensor names are those of the release `audio_detokenizer/model.pt` after its `speech_model.`
prefix: t_embedder.mlp.{0,2}, semantic_token_embedding, input_linear, position_embedding (when
learnable; `_float_tensor` when sincos), blocks.N.{adaLN_modulation.1, attn.qkv, attn.proj,
mlp.fc1, mlp.fc2}, final_layer.{adaLN_modulation.1, linear}.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kimi_lora_cli.models.detokenizer.config import DiTConfig

TIME_FEATURES = 256


def timestep_features(t: Tensor, dim: int = TIME_FEATURES, max_period: float = 10000.0) -> Tensor:
    """[N] (integer) flow times -> [N, dim] float32: cos(t * w_i) then sin(t * w_i), w_i = P^(-i/half)."""
    half = dim // 2
    w = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angle = t[:, None].float() * w[None]
    feats = torch.cat([torch.cos(angle), torch.sin(angle)], dim=-1)
    return F.pad(feats, (0, 1)) if dim % 2 else feats


def sinusoid_table(rows: int, dim: int) -> Tensor:
    """Fairseq-style table: row p = [sin(p * w_i), cos(p * w_i)], w_i = 10000^(-i/(half-1)); row 0 zero."""
    half = dim // 2
    w = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000) / (half - 1)))
    angle = torch.arange(rows, dtype=torch.float32)[:, None] * w[None]
    table = torch.cat([torch.sin(angle), torch.cos(angle)], dim=1)
    if dim % 2:
        table = F.pad(table, (0, 1))
    table[0] = 0
    return table


def rope_table(head_dim: int, positions: int, base: float, interpolation: float, max_seq_len: int) -> Tensor:
    """complex64 [min(positions, max_seq_len), head_dim / 2]: exp(i * (p / interpolation) * base^(-2j/d))."""
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    p = torch.arange(positions).float() * (1.0 / float(interpolation))
    angles = torch.outer(p, inv).float()
    table = torch.polar(torch.ones_like(angles), angles)
    return table[:max_seq_len].clone() if max_seq_len < positions else table


def apply_rope(x: Tensor, rot: Tensor) -> Tensor:
    """x [B, T, H, D] (adjacent channel pairs as complex numbers) times rot [B, T, D/2]; in float32."""
    z = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(z * rot[:, :, None, :]).flatten(3).type_as(x)


class LayerCache:
    """Keys/values [B, H, frames, D] of one attention layer: committed (earlier chunks) and pending."""

    def __init__(self) -> None:
        self.past: tuple[Tensor, Tensor] | None = None
        self.pending: tuple[Tensor, Tensor] | None = None

    def extend(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.past is not None:
            k, v = torch.cat([self.past[0], k], dim=2), torch.cat([self.past[1], v], dim=2)
        self.pending = (k, v)
        return k, v


class DiTCache:
    """One `LayerCache` per block; `commit(max_frames)` keeps the newest `max_frames` frames."""

    def __init__(self, depth: int) -> None:
        self.layers = [LayerCache() for _ in range(depth)]

    @property
    def frames(self) -> int:
        past = self.layers[0].past
        return 0 if past is None else past[0].shape[2]

    def commit(self, max_frames: int | None = None) -> None:
        for layer in self.layers:
            if layer.pending is None:
                continue
            k, v = layer.pending
            if max_frames is not None and k.shape[2] > max_frames:
                k, v = k[:, :, -max_frames:], v[:, :, -max_frames:]
            layer.past, layer.pending = (k, v), None

    def copy(self) -> DiTCache:
        """A snapshot (tensors shared: they are never changed in place)."""
        other = DiTCache(len(self.layers))
        for mine, theirs in zip(self.layers, other.layers):
            theirs.past = mine.past
        return other


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(TIME_FEATURES, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_features(t).to(self.mlp[0].weight.dtype))


class SinusoidPositions(nn.Module):
    """Absolute sinusoid by *running count*: the k-th non-zero position id of a row gets row k of the
    table, a zero id gets the zero row (so a chunk not starting at 0 counts from 1 again)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("_float_tensor", torch.zeros(1))  # only carries dtype/device (and its key)
        self._table: Tensor | None = None

    def forward(self, positions: Tensor) -> Tensor:
        nonzero = positions.ne(0).long()
        index = torch.cumsum(nonzero, dim=1) * nonzero
        rows = positions.shape[1] + 1
        if self._table is None or self._table.shape[0] < rows:
            self._table = sinusoid_table(rows, self.dim)
        table = self._table.to(self._float_tensor)
        return table[index]


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, rot: Tensor | None, cache: LayerCache | None) -> Tensor:
        b, n, dim = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, dim // self.heads).unbind(2)
        if rot is not None:
            q, k = apply_rope(q, rot), apply_rope(k, rot)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.extend(k, v)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class DiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, mlp_hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: Tensor, c: Tensor, rot: Tensor | None, cache: LayerCache | None) -> Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=2)
        x = x + gate_a * self.attn(modulate(self.norm1(x), shift_a, scale_a), rot, cache)
        return x + gate_m * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, out: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=2)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.t_embedder = TimestepEmbedder(h)
        self.semantic_token_embedding = nn.Embedding(cfg.semantic_vocab_size + 1, h)
        self.input_linear = nn.Linear(cfg.input_size, h)
        if cfg.position_embedding_type == "learnable":
            self.position_embedding: nn.Module | None = nn.Embedding(cfg.max_seq_len + 1, h)
        elif cfg.position_embedding_type == "sincos":
            self.position_embedding = SinusoidPositions(h)
        else:
            self.position_embedding = None
        self.blocks = nn.ModuleList(DiTBlock(h, cfg.num_heads, cfg.mlp_hidden) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(h, cfg.input_size)
        self._rope: Tensor | None = None  # complex table, a plain attribute: dtype casts must not touch it

    def rope(self, positions: Tensor) -> Tensor | None:
        if not self.cfg.use_rope:
            return None
        if self._rope is None:
            c = self.cfg
            self._rope = rope_table(c.head_dim, c.rope_max_positions, c.rope_base, c.rope_interpolation_factor,
                                    c.max_seq_len)
        if self._rope.device != positions.device:
            self._rope = self._rope.to(positions.device)
        return self._rope[positions]

    def new_cache(self) -> DiTCache:
        return DiTCache(self.cfg.depth)

    def forward(self, x: Tensor, tokens: Tensor, t: Tensor, positions: Tensor, cache: DiTCache | None = None) -> Tensor:
        """x [B, T, mels], tokens [B, T] long, t [B] (integer flow time 0..999), positions [B, T] long."""
        c = self.t_embedder(t)[:, None] + self.semantic_token_embedding(tokens)
        x = self.input_linear(x)
        if self.position_embedding is not None:
            x = x + self.position_embedding(positions)
        rot = self.rope(positions)
        for i, block in enumerate(self.blocks):
            x = block(x, c, rot, cache.layers[i] if cache is not None else None)
        return self.final_layer(x, c)
