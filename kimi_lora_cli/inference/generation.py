"""Dual-stream generation: the official Kimi-Audio inference loop, batched, with a KV cache.

Python API::

    tokens = StreamTokens.from_model(loaded.tokenizer, loaded.config)
    prompts = build_prompts([messages], loaded, output_type="text")
    [result] = generate(loaded.model, prompts, GenerationConfig(max_new_tokens=64), tokens)
    loaded.tokenizer.decode(result.text_tokens)

Rules (reference document, section 5), per sample:
  * prefill with both streams, `is_continuous` and the Whisper rows of every audio span; then
    one (audio, text) pair per step at the next position, fed back without features;
  * text: once text_eos is sampled the text stream is finished (the eos is kept in the stream,
    not counted) and every later text token is forced to blank;
  * audio: forced to blank for the first `kimia_mimo_audiodelaytokens` steps, and always for
    output "text"; the audio stream finishes on msg_end or media_end;
  * stop: output "text" when the text finishes, output "both" when the audio finishes, else
    after the step budget (`max_new_tokens`; -1 = official budget: 7500 - prompt length for
    "text", 1500 - prompt length for "both". The official API ignores an explicit value for
    "both"; here an explicit value caps both modes);
  * result: text = the tokens before eos with ids < kimia_token_offset; audio = the stream's
    tokens [delay, delay + valid) with ids >= offset, minus the offset (GLM-4-Voice codes).

Batching: prompts are LEFT padded and the attention mask is passed on every call; positions
come from the mask inside the model, so each sample is computed as if alone. A sample that
stops leaves the batch (`KimiKVCache.reorder`), so the rest decode at the smaller width.
`use_cache=False` recomputes the whole sequence every step (slow; a reference for tests).

Hooks (a server's view of the loop, `GenerationHooks`): `before_forward(rows)` names the original
prompt index of each row the next model call computes (so per-row LoRA adapters can be chosen),
`after_step(step, rows, text, audio)` sees the ids every active row feeds back this step and may
return rows to stop at once (finish "cancelled": a client left, or its own step budget ran out).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from kimi_lora_cli.inference.sampler import AUDIO_DEFAULTS, TEXT_DEFAULTS, SamplingParams, sample

OUTPUT_TYPES = ("text", "both")
OFFICIAL_TEXT_BUDGET = 7500  # positions (prompt + generated) for output "text" (12.5 Hz x 600 s)
OFFICIAL_BOTH_BUDGET = 1500  # positions for output "both" (12.5 Hz x 120 s)


@dataclass(frozen=True)
class GenerationConfig:
    output_type: str = "text"
    max_new_tokens: int = -1
    text: SamplingParams = TEXT_DEFAULTS
    audio: SamplingParams = AUDIO_DEFAULTS
    use_cache: bool = True

    def __post_init__(self) -> None:
        if self.output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be 'text' or 'both', not {self.output_type!r}")
        if self.max_new_tokens == 0 or self.max_new_tokens < -1:
            raise ValueError(f"max_new_tokens must be > 0 (or -1 for the official budget), not {self.max_new_tokens}")

    def budget(self, prompt_len: int) -> int:
        """Steps a prompt of `prompt_len` positions may generate."""
        if self.max_new_tokens > 0:
            return self.max_new_tokens
        total = OFFICIAL_TEXT_BUDGET if self.output_type == "text" else OFFICIAL_BOTH_BUDGET
        return max(total - prompt_len, 0)


@dataclass(frozen=True)
class StreamTokens:
    """The special ids and constants the loop needs (from the tokenizer and config.json)."""

    blank: int
    text_eos: int
    audio_end: tuple[int, ...]  # msg_end, media_end
    delay: int
    token_offset: int

    @classmethod
    def from_model(cls, tokenizer: Any, config: Any) -> StreamTokens:
        return cls(
            blank=tokenizer.blank,
            text_eos=tokenizer.text_eos,
            audio_end=(tokenizer.msg_end, config.kimia_media_end),
            delay=config.kimia_mimo_audiodelaytokens,
            token_offset=config.kimia_token_offset,
        )


@dataclass
class Prompt:
    """One prefill: the two id streams, the continuous mask and the placed Whisper rows."""

    audio_ids: list[int]
    text_ids: list[int]
    is_continuous: list[bool]
    features: torch.Tensor | None = None  # [len, adaptor_dim], zero outside audio spans

    def __len__(self) -> int:
        return len(self.audio_ids)


@dataclass
class GenerationResult:
    text_tokens: list[int]  # valid text ids (before eos), ids < kimia_token_offset
    audio_tokens: list[int]  # GLM-4-Voice codes (offset removed); empty for output "text"
    text_stream: list[int] = field(default_factory=list)  # every text id fed back (eos, blanks)
    audio_stream: list[int] = field(default_factory=list)  # every audio id fed back (delay blanks)
    steps: int = 0
    finish: str = "length"  # "text_eos" | "audio_end" | "length"
    seconds: float = 0.0  # from the batch's start until this sample stopped


class GenerationHooks(Protocol):
    def before_forward(self, rows: list[int]) -> None: ...

    def after_step(self, step: int, rows: list[int], text: list[int], audio: list[int]) -> set[int] | None: ...


def unwrap_model(model: Any) -> Any:
    """The Kimi model under a peft wrapper (its LoRA layers stay active as the wrapper set them)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _pad_left(prompts: Sequence[Prompt], blank: int, device: torch.device, dtype: torch.dtype):
    n, width = len(prompts), max(len(p) for p in prompts)
    audio = torch.full((n, width), blank, dtype=torch.long)
    text = torch.full((n, width), blank, dtype=torch.long)
    cont = torch.zeros((n, width), dtype=torch.bool)
    mask = torch.zeros((n, width), dtype=torch.long)
    feats = None
    dims = {p.features.shape[-1] for p in prompts if p.features is not None}
    if dims:
        feats = torch.zeros((n, width, dims.pop()), dtype=dtype)
    for b, p in enumerate(prompts):
        start = width - len(p)
        audio[b, start:] = torch.tensor(p.audio_ids, dtype=torch.long)
        text[b, start:] = torch.tensor(p.text_ids, dtype=torch.long)
        cont[b, start:] = torch.tensor(p.is_continuous, dtype=torch.bool)
        mask[b, start:] = 1
        if p.features is not None:
            feats[b, start:] = p.features.to(dtype)
    moved = [t.to(device) for t in (audio, text, cont, mask)]
    return (*moved, feats.to(device) if feats is not None else None)


@torch.no_grad()
def generate(
    model: Any,
    prompts: Sequence[Prompt],
    config: GenerationConfig,
    tokens: StreamTokens,
    generators: Sequence[torch.Generator | None] | None = None,
    on_step: Any = None,
    hooks: GenerationHooks | None = None,
) -> list[GenerationResult]:
    """Generate for every prompt (one batch). `generators[i]` drives prompt i's random draws.

    `on_step(active_rows)` is called after every decode step (progress reporting); `hooks`: see
    the module docstring."""
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt")
    net = unwrap_model(model)
    device, dtype = net.device, net.dtype
    started = time.perf_counter()
    budgets = [config.budget(len(p)) for p in prompts]
    results: list[GenerationResult | None] = [None] * len(prompts)
    for i, b in enumerate(budgets):
        if b == 0:
            results[i] = GenerationResult([], [], finish="length")
    live = [i for i, b in enumerate(budgets) if b > 0]
    if not live:
        return results  # type: ignore[return-value]
    max_steps = max(budgets[i] for i in live)
    audio, text, cont, mask, feats = _pad_left([prompts[i] for i in live], tokens.blank, device, dtype)
    n = len(live)
    width = audio.shape[1]

    rows = torch.tensor(live, device=device)  # original index of each active row
    budget_t = torch.tensor([budgets[i] for i in live], device=device)
    text_hist = torch.full((n, max_steps), tokens.blank, dtype=torch.long, device=device)
    audio_hist = torch.full((n, max_steps), tokens.blank, dtype=torch.long, device=device)
    hist_row = torch.arange(n, device=device)  # active row -> its history row
    text_done = torch.zeros(n, dtype=torch.bool, device=device)
    text_valid = torch.zeros(n, dtype=torch.long, device=device)
    audio_valid = torch.zeros(n, dtype=torch.long, device=device)
    audio_end = torch.tensor(tokens.audio_end, device=device)
    text_mode = config.output_type == "text"
    gens = list(generators) if generators is not None else None
    live_gens = [gens[i] for i in live] if gens is not None else None

    cache = net.new_cache(width + min(max_steps, 1024)) if config.use_cache else None
    if hooks is not None:
        hooks.before_forward(list(live))
    out = net(input_ids=audio, text_input_ids=text, is_continuous_mask=cont, continuous_features=feats,
              attention_mask=mask, past_key_values=cache, use_cache=config.use_cache, logits_to_keep=1)
    full_mask = torch.ones((n, width + max_steps), dtype=torch.long, device=device)
    full_mask[:, :width] = mask

    for step in range(max_steps):
        hist_text = text_hist[hist_row, :step] if step else None
        hist_audio = audio_hist[hist_row, :step] if step else None
        next_text = sample(out.text_logits[:, -1], config.text, hist_text, live_gens)
        next_audio = sample(out.audio_logits[:, -1], config.audio, hist_audio, live_gens)

        next_text = torch.where(text_done, torch.full_like(next_text, tokens.blank), next_text)
        new_eos = ~text_done & (next_text == tokens.text_eos)
        text_valid += (~text_done & ~new_eos).long()
        text_done = text_done | new_eos
        if step < tokens.delay or text_mode:
            next_audio = torch.full_like(next_audio, tokens.blank)
        else:
            audio_valid += 1
        text_hist[hist_row, step] = next_text
        audio_hist[hist_row, step] = next_audio

        stop = text_done.clone() if text_mode else torch.isin(next_audio, audio_end)
        stop |= budget_t <= step + 1
        cancel = None
        if hooks is not None:
            gone = hooks.after_step(step, rows.tolist(), next_text.tolist(), next_audio.tolist())
            if gone:
                cancel = torch.tensor([r in gone for r in rows.tolist()], device=device)
                stop |= cancel
        if on_step is not None:
            on_step(int(rows.numel()))
        if bool(stop.any()):
            now = time.perf_counter() - started
            finish_text = "text_eos" if text_mode else "audio_end"
            for r in stop.nonzero().flatten().tolist():
                h = int(hist_row[r])
                natural = bool(text_done[r]) if text_mode else bool(torch.isin(next_audio[r], audio_end))
                finish = finish_text if natural else "length"
                if cancel is not None and bool(cancel[r]) and not natural and budgets[int(rows[r])] > step + 1:
                    finish = "cancelled"
                results[int(rows[r])] = _result(
                    text_hist[h, : step + 1].tolist(), audio_hist[h, : step + 1].tolist(),
                    int(text_valid[r]), int(audio_valid[r]), tokens, step + 1, finish, now,
                )
            keep = (~stop).nonzero().flatten()
            if keep.numel() == 0:
                break
            rows, budget_t, hist_row = rows[keep], budget_t[keep], hist_row[keep]
            text_done, text_valid, audio_valid = text_done[keep], text_valid[keep], audio_valid[keep]
            next_text, next_audio = next_text[keep], next_audio[keep]
            full_mask = full_mask[keep]
            if live_gens is not None:
                live_gens = [live_gens[k] for k in keep.tolist()]
            if cache is not None:
                cache.reorder(keep)
            else:
                audio, text, cont = audio[keep], text[keep], cont[keep]
                feats = feats[keep] if feats is not None else None
        cur = width + step + 1
        if hooks is not None:
            hooks.before_forward(rows.tolist())
        if cache is not None:
            out = net(input_ids=next_audio[:, None], text_input_ids=next_text[:, None],
                      attention_mask=full_mask[:, :cur], past_key_values=cache, use_cache=True, logits_to_keep=1)
        else:
            audio = torch.cat([audio, next_audio[:, None]], dim=1)
            text = torch.cat([text, next_text[:, None]], dim=1)
            cont = torch.cat([cont, torch.zeros_like(cont[:, :1])], dim=1)
            if feats is not None:
                feats = torch.cat([feats, feats.new_zeros((feats.shape[0], 1, feats.shape[2]))], dim=1)
            out = net(input_ids=audio, text_input_ids=text, is_continuous_mask=cont, continuous_features=feats,
                      attention_mask=full_mask[:, :cur], logits_to_keep=1)
    return results  # type: ignore[return-value]


def _result(text_stream: list[int], audio_stream: list[int], text_valid: int, audio_valid: int,
            tokens: StreamTokens, steps: int, finish: str, seconds: float) -> GenerationResult:
    off = tokens.token_offset
    text_ids = [t for t in text_stream[:text_valid] if t < off]
    audio_ids = [t - off for t in audio_stream[tokens.delay : tokens.delay + audio_valid] if t >= off]
    return GenerationResult(text_ids, audio_ids, text_stream, audio_stream, steps, finish, seconds)
