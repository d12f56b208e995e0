"""Kimi-Audio in plain PyTorch: Qwen2-style decoder, mimo audio branch, adaptor, two heads.

Python API (what scripts and notebooks use)::

    out = model(
        input_ids,                 # [B, L] audio stream (role/media tokens, audio codes, blanks)
        text_input_ids=...,        # [B, L] text stream (text ids, blanks)
        is_continuous_mask=...,    # [B, L] bool, True where Whisper features are fused in
        continuous_features=...,   # [B, L, kimia_adaptor_input_dim], zero outside audio spans
        attention_mask=...,        # [B, L(+past)] 1 = real token, 0 = padding (left or right)
    )
    out.text_logits   # [B, L, V] from lm_head (main stack, after model.norm)
    out.audio_logits  # [B, L, V] from mimo_output (mimo stack, after model.mimo_norm)

The mimo branch copies the hidden state right after main layer
`kimia_mimo_transformer_from_layer_index` (0-based) through `model.mimo_layers`.
Embedding: embed(audio ids); at continuous positions (embed + adaptor(features)) * sqrt(2);
then + embed(text ids). Parameter names equal the release checkpoint's, so its safetensors
load strictly. Padding is handled by the attention mask and by positions counted from
each sample's first real token, so a padded batch gives each sample the logits it would
get alone. Packed rows (`sequence_ids=` [B, L], several samples per row) get a block-diagonal
causal attention and positions restarting at 0 per sample (packing.py).
`past_key_values` / `use_cache=True` keep a KV cache for both stacks (`KimiKVCache`). `gradient_checkpointing_enable()` recomputes every layer of both stacks
in the backward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kimi_lora_cli.models.kimi_audio.configuration import KimiAudioConfig
from kimi_lora_cli.models.kimi_audio.packing import (
    PackedRows,
    attend_packed,
    choose_backend,
    packed_positions,
)

SQRT2 = math.sqrt(2.0)


class KimiRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        h = hidden_states.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(input_dtype)


def rope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [B, L, head_dim] for rotate-half RoPE (inv_freq recomputed, never loaded)."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float() / head_dim
    inv_freq = 1.0 / (theta**exponent)
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


class KimiKVCache:
    """Preallocated key/value cache for the main layers followed by the mimo layers.

    Slots grow by doubling when a sequence outruns `max_length`, so a decode step costs
    one slice write per layer, not a copy of everything cached so far.
    """

    def __init__(self, num_layers: int, max_length: int = 0) -> None:
        self.num_layers = num_layers
        self.max_length = max_length
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.lengths = [0] * num_layers

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx]

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.lengths[layer_idx]
        end = start + k.shape[2]
        buf_k = self.keys[layer_idx]
        if buf_k is None or buf_k.shape[2] < end:
            capacity = max(end, self.max_length, 2 * (buf_k.shape[2] if buf_k is not None else 0))
            new_k = k.new_zeros((*k.shape[:2], capacity, k.shape[3]))
            new_v = v.new_zeros((*v.shape[:2], capacity, v.shape[3]))
            if buf_k is not None:
                new_k[:, :, :start] = buf_k[:, :, :start]
                new_v[:, :, :start] = self.values[layer_idx][:, :, :start]
            self.keys[layer_idx], self.values[layer_idx] = new_k, new_v
        self.keys[layer_idx][:, :, start:end] = k
        self.values[layer_idx][:, :, start:end] = v
        self.lengths[layer_idx] = end
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def join(self, other: KimiKVCache) -> int:
        """Append `other`'s rows (samples joining a running batch). Both hold the same number of positions
        afterwards: the shorter side is padded on the left with zero keys and values, which the caller's
        attention mask must cover with zeros (positions come from the mask, so nothing else moves).
        Returns the common length."""
        length = max(max(self.lengths), max(other.lengths))
        for i in range(self.num_layers):
            mine, theirs = self.keys[i], other.keys[i]
            if mine is None or theirs is None:
                raise ValueError("join: both caches must have run a forward over every layer")
            have, got = self.lengths[i], other.lengths[i]
            capacity = max(length, mine.shape[2], theirs.shape[2])
            for store, a, b in ((self.keys, mine, theirs), (self.values, self.values[i], other.values[i])):
                merged = a.new_zeros((a.shape[0] + b.shape[0], *a.shape[1:2], capacity, a.shape[3]))
                merged[: a.shape[0], :, length - have : length] = a[:, :, :have]
                merged[a.shape[0] :, :, length - got : length] = b[:, :, :got]
                store[i] = merged
            self.lengths[i] = length
        return length

    def trim_left(self, count: int) -> None:
        """Drop the first `count` positions of every row (the caller's mask holds only zeros there)."""
        for i in range(self.num_layers):
            if self.keys[i] is not None:
                self.keys[i] = self.keys[i][:, :, count:]
                self.values[i] = self.values[i][:, :, count:]
                self.lengths[i] -= count

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in `index` (used when finished samples leave a batch)."""
        for i in range(self.num_layers):
            if self.keys[i] is not None:
                self.keys[i] = self.keys[i].index_select(0, index)
                self.values[i] = self.values[i].index_select(0, index)


class KimiAttention(nn.Module):
    def __init__(self, config: KimiAudioConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.attn_implementation = config.attn_implementation
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        is_causal: bool,
        cache: KimiKVCache | None,
        layer_idx: int,
    ) -> torch.Tensor:
        bsz, q_len, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(bsz, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(bsz, q_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(bsz, q_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = _apply_rope(q, cos, sin)
        k = _apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)
        out = self._attend(q, k, v, mask, is_causal)
        return self.o_proj(out.transpose(1, 2).reshape(bsz, q_len, -1))

    def _attend(self, q, k, v, mask, is_causal):
        groups = self.num_heads // self.num_kv_heads
        if isinstance(mask, PackedRows):
            return attend_packed(q, k, v, mask, groups, self._eager)
        if self.attn_implementation == "flash_attention_2" and mask is None and q.is_cuda:
            from flash_attn import flash_attn_func  # optional; only when installed and asked for

            out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=is_causal)
            return out.transpose(1, 2)
        if self.attn_implementation == "eager":
            return self._eager(q, k, v, mask, is_causal)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal and mask is None, enable_gqa=groups > 1
        )

    def _eager(self, q, k, v, mask, is_causal=False):
        groups = self.num_heads // self.num_kv_heads
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        if mask is not None:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        elif is_causal:
            q_len, k_len = q.shape[2], k.shape[2]
            causal = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril(k_len - q_len)
            scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
        return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


class KimiMLP(nn.Module):
    def __init__(self, config: KimiAudioConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        if config.hidden_act != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (Kimi-Audio uses silu)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class KimiDecoderLayer(nn.Module):
    def __init__(self, config: KimiAudioConfig) -> None:
        super().__init__()
        self.self_attn = KimiAttention(config)
        self.mlp = KimiMLP(config)
        self.input_layernorm = KimiRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = KimiRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, cos, sin, mask, is_causal, cache, layer_idx):
        residual = hidden_states
        h = self.self_attn(self.input_layernorm(hidden_states), cos, sin, mask, is_causal, cache, layer_idx)
        h = residual + h
        return h + self.mlp(self.post_attention_layernorm(h))


class VQAdaptor(nn.Module):
    """Whisper rows (kimia_adaptor_input_dim) -> hidden size; indices match the release names."""

    def __init__(self, config: KimiAudioConfig) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(config.kimia_adaptor_input_dim, config.hidden_size, bias=True),
            nn.SiLU(),
            nn.Dropout(0.0),
            nn.Linear(config.hidden_size, config.hidden_size, bias=True),
            nn.LayerNorm(config.hidden_size, eps=config.rms_norm_eps, bias=True),  # official: rms_norm_eps
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class KimiAudioModel(nn.Module):
    def __init__(self, config: KimiAudioConfig) -> None:
        super().__init__()
        self.config = config
        pad = config.pad_token_id if 0 <= config.pad_token_id < config.vocab_size else None
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=pad)
        self.vq_adaptor = VQAdaptor(config)
        self.layers = nn.ModuleList(KimiDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.mimo_layers = nn.ModuleList(KimiDecoderLayer(config) for _ in range(config.kimia_mimo_layers))
        self.norm = KimiRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mimo_norm = KimiRMSNorm(config.hidden_size, eps=config.rms_norm_eps)


@dataclass
class KimiAudioOutput:
    """Forward result. With `*_logits_mask` given, logits hold only the selected rows, [N, V]."""

    text_logits: torch.Tensor | None
    audio_logits: torch.Tensor | None
    past_key_values: KimiKVCache | None = None


def build_attention_mask(
    attention_mask: torch.Tensor | None, q_len: int, past_len: int, device: torch.device
) -> tuple[torch.Tensor | None, bool]:
    """Boolean [B, 1, q, k] mask (True = attend), or None plus an is_causal flag when no padding."""
    k_len = past_len + q_len
    if attention_mask is not None and attention_mask.shape[-1] != k_len:
        raise ValueError(
            f"attention_mask covers {attention_mask.shape[-1]} positions, expected {k_len} (cached + new)"
        )
    if attention_mask is None or bool(attention_mask.all()):
        if q_len == 1:
            return None, False
        if past_len == 0:
            return None, True
        q_pos = torch.arange(q_len, device=device)[:, None] + past_len
        return (torch.arange(k_len, device=device)[None, :] <= q_pos)[None, None], False
    q_pos = torch.arange(q_len, device=device)[:, None] + past_len
    k_pos = torch.arange(k_len, device=device)[None, :]
    mask = (k_pos <= q_pos)[None, None] & attention_mask.bool()[:, None, None, :]
    # A padding query would see no key at all (NaN in softmax): let it see itself.
    return mask | (k_pos == q_pos)[None, None], False


class KimiAudioForCausalLM(nn.Module):
    """Kimi-Audio decoder with the text head (`lm_head`) and the audio head (`mimo_output`)."""

    def __init__(self, config: KimiAudioConfig) -> None:
        super().__init__()
        self.config = config
        self.model = KimiAudioModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.mimo_output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.gradient_checkpointing = False
        # How packed rows (`sequence_ids`) attend: auto, sdpa, eager, flex or flash (see packing.py).
        self.packed_attention = "auto"
        # Engines that gather a module's weights when it runs (DeepSpeed ZeRO-3) and reduce every
        # gradient in one fixed order need every rank to run every module: the adaptor then also runs
        # (on no rows) for a batch without audio, and its weights get zero gradients.
        self.run_every_module = False

    # -- conveniences used by peft / trainers -------------------------------------------------
    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        # The text head, as in the official model (peft saves it with an adapter that targets lm_head).
        return self.lm_head

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, past_key_values: KimiKVCache | None = None,
                                      **kwargs: object) -> dict[str, object]:
        """Inputs of the next forward: with a cache only the positions it does not hold yet (peft's
        causal-LM wrapper requires this hook; kimi-lora's own generation loop does not use it)."""
        if past_key_values is not None:
            seen = past_key_values.get_seq_length()
            input_ids = input_ids[:, seen:]
            kwargs = {k: (v[:, seen:] if k in ("text_input_ids", "is_continuous_mask") and v is not None else v)
                      for k, v in kwargs.items()}
        return {"input_ids": input_ids, "past_key_values": past_key_values, **kwargs}

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    @property
    def device(self) -> torch.device:
        weight = self.lm_head.weight
        mesh = getattr(weight, "device_mesh", None)  # FSDP: shards may sit in CPU memory (offload)
        return torch.device(mesh.device_type) if mesh is not None and mesh.device_type != "cpu" else weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def new_cache(self, max_length: int = 0) -> KimiKVCache:
        return KimiKVCache(self.config.num_hidden_layers + self.config.kimia_mimo_layers, max_length)

    # -- forward -------------------------------------------------------------------------------
    def embed(
        self,
        input_ids: torch.Tensor,
        text_input_ids: torch.Tensor | None,
        is_continuous_mask: torch.Tensor | None,
        continuous_features: torch.Tensor | None,
    ) -> torch.Tensor:
        emb = self.model.embed_tokens(input_ids)
        if is_continuous_mask is not None and bool(is_continuous_mask.any()):
            if continuous_features is None:
                raise ValueError("is_continuous_mask marks audio positions but continuous_features is None")
            mask = is_continuous_mask.bool()
            rows = self.model.vq_adaptor(continuous_features[mask].to(emb.dtype))
            emb = emb.clone()
            # Under autocast the adaptor's LayerNorm returns float32: round back to the embedding dtype.
            emb[mask] = ((emb[mask] + rows) * SQRT2).to(emb.dtype)
        elif self.run_every_module:
            none = emb.new_zeros((0, self.config.kimia_adaptor_input_dim))
            emb = emb + self.model.vq_adaptor(none).sum().to(emb.dtype)
        if text_input_ids is not None:
            emb = emb + self.model.embed_tokens(text_input_ids)
        return emb

    def _layer(self, layer, h, cos, sin, mask, is_causal, cache, idx):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled() and cache is None:
            return checkpoint(layer, h, cos, sin, mask, is_causal, None, idx, use_reentrant=False)
        return layer(h, cos, sin, mask, is_causal, cache, idx)

    def forward(
        self,
        input_ids: torch.Tensor,
        text_input_ids: torch.Tensor | None = None,
        is_continuous_mask: torch.Tensor | None = None,
        continuous_features: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        sequence_ids: torch.Tensor | None = None,
        past_key_values: KimiKVCache | None = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
        text_logits_mask: torch.Tensor | None = None,
        audio_logits_mask: torch.Tensor | None = None,
        **_: object,
    ) -> KimiAudioOutput:
        """See the module docstring. `logits_to_keep=k` keeps only the last k positions;
        `text_logits_mask` / `audio_logits_mask` ([B, L] bool) compute a head only on the
        selected rows (what a loss needs), returning [N, V]. `sequence_ids` ([B, L]) marks packed
        rows: runs of equal ids are separate samples (attention_mask is then not needed)."""
        cfg = self.config
        bsz, q_len = input_ids.shape
        cache = past_key_values
        if sequence_ids is not None and (use_cache or cache is not None):
            raise ValueError("packed rows (sequence_ids) are for training and scoring; they take no KV cache")
        if use_cache and cache is None:
            cache = self.new_cache()
        past_len = cache.get_seq_length() if cache is not None else 0
        hidden = self.embed(input_ids, text_input_ids, is_continuous_mask, continuous_features)
        if sequence_ids is not None:
            if sequence_ids.shape != input_ids.shape:
                raise ValueError(f"sequence_ids has shape {tuple(sequence_ids.shape)}, input_ids "
                                 f"{tuple(input_ids.shape)}")
            if position_ids is None:
                position_ids = packed_positions(sequence_ids)
        elif position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -q_len:]
            else:
                position_ids = torch.arange(past_len, past_len + q_len, device=hidden.device)[None].expand(bsz, -1)
        cos, sin = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, hidden.dtype)
        if sequence_ids is not None:
            backend = choose_backend(self.packed_attention, cfg.attn_implementation, hidden.device)
            mask, is_causal = PackedRows(sequence_ids, backend), False
            mask.auto = self.packed_attention == "auto"
        else:
            mask, is_causal = build_attention_mask(attention_mask, q_len, past_len, hidden.device)

        mimo_hidden = None
        n_main = len(self.model.layers)
        for i, layer in enumerate(self.model.layers):
            hidden = self._layer(layer, hidden, cos, sin, mask, is_causal, cache, i)
            if i == cfg.kimia_mimo_transformer_from_layer_index:
                mimo_hidden = hidden
        for j, layer in enumerate(self.model.mimo_layers):
            mimo_hidden = self._layer(layer, mimo_hidden, cos, sin, mask, is_causal, cache, n_main + j)

        text_hidden = self.model.norm(hidden)
        audio_hidden = self.model.mimo_norm(mimo_hidden)
        text_logits = _head(self.lm_head, text_hidden, text_logits_mask, logits_to_keep)
        audio_logits = _head(self.mimo_output, audio_hidden, audio_logits_mask, logits_to_keep)
        return KimiAudioOutput(text_logits, audio_logits, cache if use_cache else None)


def _head(head: nn.Module, hidden: torch.Tensor, rows: torch.Tensor | None, keep: int) -> torch.Tensor:
    if rows is not None:
        return head(hidden[rows.bool()])
    if keep:
        hidden = hidden[:, -keep:]
    return head(hidden)
