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
`after_step(steps, rows, text, audio)` sees the ids every active row feeds back at its own step and
may return rows to stop at once (finish "cancelled": a client left, or its own step budget ran out).
Step-level batching (`JoiningHooks`): after every decode step `join(first, rows)` may hand over new
samples (prompt, generator, step budget) to join the running batch of `rows` rows, and
`finished(index, result)` hears of every sample as soon as it stops (a batch others keep joining
may run for a long time). They are prefilled in a cache of their own and appended to the batch's
(`KimiKVCache.join`: the side with fewer positions is padded on the left, under a zero mask), and
from then on they decode with the others, each row at its own step (its own delay, budget and
sampler history), exactly as if it had started alone. They are numbered `first`, `first + 1`, ...
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

    def after_step(self, steps: list[int], rows: list[int], text: list[int], audio: list[int]) -> set[int] | None: ...


class JoiningHooks(GenerationHooks, Protocol):
    def join(self, first: int, rows: int) -> list[tuple[Prompt, torch.Generator | None, int]]: ...

    def finished(self, index: int, result: GenerationResult) -> None: ...


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


class _Rows:
    """The per-row state of a running batch (row k of every tensor is the same sample)."""

    def __init__(self, indices: list[int], budgets: list[int], steps: int, blank: int, device: Any,
                 gens: list | None) -> None:
        n = len(indices)
        self.index = torch.tensor(indices, device=device)  # the sample (prompt number) of each row
        self.budget = torch.tensor(budgets, device=device)
        self.step = torch.zeros(n, dtype=torch.long, device=device)  # steps this row has generated
        self.text_hist = torch.full((n, steps), blank, dtype=torch.long, device=device)
        self.audio_hist = torch.full((n, steps), blank, dtype=torch.long, device=device)
        self.text_done = torch.zeros(n, dtype=torch.bool, device=device)
        self.text_valid = torch.zeros(n, dtype=torch.long, device=device)
        self.audio_valid = torch.zeros(n, dtype=torch.long, device=device)
        self.gens = gens

    TENSORS = ("index", "budget", "step", "text_hist", "audio_hist", "text_done", "text_valid", "audio_valid")

    def keep(self, keep: torch.Tensor) -> None:
        for name in self.TENSORS:
            setattr(self, name, getattr(self, name)[keep])
        if self.gens is not None:
            self.gens = [self.gens[k] for k in keep.tolist()]

    def extend(self, other: _Rows) -> None:
        width = max(self.text_hist.shape[1], other.text_hist.shape[1])
        for name in self.TENSORS:
            a, b = getattr(self, name), getattr(other, name)
            if a.dim() == 2:  # histories: pad the narrower one's unused columns
                a = torch.cat([a, a.new_zeros((a.shape[0], width - a.shape[1]))], 1)
                b = torch.cat([b, b.new_zeros((b.shape[0], width - b.shape[1]))], 1)
            setattr(self, name, torch.cat([a, b]))
        if self.gens is not None:
            self.gens = self.gens + (other.gens or [None] * len(other.index))


def _sample_rows(logits: torch.Tensor, params: SamplingParams, hist: torch.Tensor, steps: torch.Tensor,
                 common: int | None, gens: list | None) -> torch.Tensor:
    """`sample` for rows that may be at different steps (`common`: the step all rows are at, None when
    samples joined): each row sees only its own history."""
    if common is not None:
        return sample(logits, params, hist[:, :common] if common else None, gens)
    if params.repetition_penalty <= 1.0:  # the history is not looked at
        return sample(logits, params, None, gens)
    picked = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    for s in steps.unique().tolist():
        rows = (steps == s).nonzero().flatten()
        picked[rows] = sample(logits[rows], params, hist[rows, :s] if s else None,
                              [gens[k] for k in rows.tolist()] if gens is not None else None)
    return picked


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
    the module docstring. Samples that joined through `hooks.join` get their results after the
    prompts' ones, in the order they joined."""
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt")
    net = unwrap_model(model)
    device, dtype = net.device, net.dtype
    started = time.perf_counter()
    budgets = [config.budget(len(p)) for p in prompts]
    results: list[GenerationResult | None] = [None] * len(prompts)
    row_started = [started] * len(prompts)
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
    gens = list(generators) if generators is not None else None
    st = _Rows(live, [budgets[i] for i in live], max_steps, tokens.blank, device,
               [gens[i] for i in live] if gens is not None else None)
    audio_end = torch.tensor(tokens.audio_end, device=device)
    text_mode = config.output_type == "text"
    joining = config.use_cache and callable(getattr(hooks, "join", None)) and callable(getattr(hooks, "finished",
                                                                                                None))

    cache = net.new_cache(width + min(max_steps, 1024)) if config.use_cache else None
    if hooks is not None:
        hooks.before_forward(list(live))
    out = net(input_ids=audio, text_input_ids=text, is_continuous_mask=cont, continuous_features=feats,
              attention_mask=mask, past_key_values=cache, use_cache=config.use_cache, logits_to_keep=1)
    text_logits, audio_logits = out.text_logits[:, -1], out.audio_logits[:, -1]
    full_mask = torch.ones((n, width + max_steps), dtype=torch.long, device=device)
    full_mask[:, :width] = mask
    cur = width  # positions held by the cache (and columns of full_mask in use)
    common_step: int | None = 0  # the step every row is at (None once samples joined: then per row)

    while True:
        next_text = _sample_rows(text_logits, config.text, st.text_hist, st.step, common_step, st.gens)
        next_audio = _sample_rows(audio_logits, config.audio, st.audio_hist, st.step, common_step, st.gens)

        next_text = torch.where(st.text_done, torch.full_like(next_text, tokens.blank), next_text)
        new_eos = ~st.text_done & (next_text == tokens.text_eos)
        st.text_valid += (~st.text_done & ~new_eos).long()
        st.text_done = st.text_done | new_eos
        if text_mode or (common_step is not None and common_step < tokens.delay):
            next_audio = torch.full_like(next_audio, tokens.blank)
        elif common_step is not None:
            st.audio_valid += 1
        else:
            early = st.step < tokens.delay
            next_audio = torch.where(early, torch.full_like(next_audio, tokens.blank), next_audio)
            st.audio_valid += (~early).long()
        if common_step is not None:
            st.text_hist[:, common_step] = next_text
            st.audio_hist[:, common_step] = next_audio
        else:
            hist_rows = torch.arange(st.step.numel(), device=device)
            st.text_hist[hist_rows, st.step] = next_text
            st.audio_hist[hist_rows, st.step] = next_audio

        stop = st.text_done.clone() if text_mode else torch.isin(next_audio, audio_end)
        stop |= st.budget <= st.step + 1
        cancel = None
        if hooks is not None:
            gone = hooks.after_step(st.step.tolist(), st.index.tolist(), next_text.tolist(), next_audio.tolist())
            if gone:
                cancel = torch.tensor([r in gone for r in st.index.tolist()], device=device)
                stop |= cancel
        if on_step is not None:
            on_step(int(st.index.numel()))
        st.step += 1
        common_step = common_step + 1 if common_step is not None else None
        if bool(stop.any()):
            now = time.perf_counter()
            finish_text = "text_eos" if text_mode else "audio_end"
            for r in stop.nonzero().flatten().tolist():
                i, steps = int(st.index[r]), int(st.step[r])
                natural = bool(st.text_done[r]) if text_mode else bool(torch.isin(next_audio[r], audio_end))
                finish = finish_text if natural else "length"
                if cancel is not None and bool(cancel[r]) and not natural and budgets[i] > steps:
                    finish = "cancelled"
                results[i] = _result(st.text_hist[r, :steps].tolist(), st.audio_hist[r, :steps].tolist(),
                                     int(st.text_valid[r]), int(st.audio_valid[r]), tokens, steps, finish,
                                     now - row_started[i])
                if joining:
                    hooks.finished(i, results[i])
            keep = (~stop).nonzero().flatten()
            if keep.numel() == 0:
                break
            st.keep(keep)
            next_text, next_audio = next_text[keep], next_audio[keep]
            full_mask = full_mask[keep]
            if cache is not None:
                cache.reorder(keep)
                if common_step is None:  # samples joined: drop the padding no row needs any more
                    full_mask, cur = _trim(cache, full_mask, cur)
            else:
                audio, text, cont = audio[keep], text[keep], cont[keep]
                feats = feats[keep] if feats is not None else None
        cur += 1
        if cur > full_mask.shape[1]:
            full_mask = torch.cat([full_mask, torch.ones_like(full_mask)], dim=1)
        if hooks is not None:
            hooks.before_forward(st.index.tolist())
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
        text_logits, audio_logits = out.text_logits[:, -1], out.audio_logits[:, -1]
        if joining:
            joined = hooks.join(len(results), int(st.index.numel()))
            if joined:
                common_step = None
                text_logits, audio_logits, full_mask, cur = _join(
                    net, joined, config, tokens, st, cache, full_mask, cur, (text_logits, audio_logits), hooks,
                    results, budgets, row_started)
    return results  # type: ignore[return-value]


def _trim(cache: Any, full_mask: torch.Tensor, cur: int) -> tuple[torch.Tensor, int]:
    """Drop the leading positions that are padding in every row (a batch that others keep joining would
    otherwise hold, and attend over, every position since it started)."""
    lead = int((full_mask[:, :cur].cumsum(1) == 0).sum(1).min())
    if lead == 0:
        return full_mask, cur
    cache.trim_left(lead)
    return full_mask[:, lead:], cur - lead


def _join(net, joined, config, tokens, st, cache, full_mask, cur, logits, hooks, results, budgets, row_started):
    """Prefill the samples that join a running batch in a cache of their own, then append their rows to
    the batch: cache, attention mask (the shorter side padded on the left), per-row state, logits."""
    device, dtype = net.device, net.dtype
    prompts = [p for p, _, _ in joined]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("empty prompt")
    first = len(results)
    indices = list(range(first, first + len(prompts)))
    new_budgets = [max(b, 1) for _, _, b in joined]
    results.extend([None] * len(prompts))
    budgets.extend(new_budgets)
    row_started.extend([time.perf_counter()] * len(prompts))
    audio, text, cont, mask, feats = _pad_left(prompts, tokens.blank, device, dtype)
    width = audio.shape[1]
    extra = net.new_cache(width + min(max(new_budgets), 1024))
    hooks.before_forward(indices)
    out = net(input_ids=audio, text_input_ids=text, is_continuous_mask=cont, continuous_features=feats,
              attention_mask=mask, past_key_values=extra, use_cache=True, logits_to_keep=1)
    length = cache.join(extra)
    room = full_mask.shape[1] - cur + max(new_budgets)
    merged = torch.ones((full_mask.shape[0] + len(prompts), length + room), dtype=torch.long, device=device)
    merged[: full_mask.shape[0], :length] = 0
    merged[: full_mask.shape[0], length - cur : length] = full_mask[:, :cur]
    merged[full_mask.shape[0] :, :length] = 0
    merged[full_mask.shape[0] :, length - width : length] = mask
    gens = [g for _, g, _ in joined] if st.gens is not None else None
    st.extend(_Rows(indices, new_budgets, max(new_budgets), tokens.blank, device, gens))
    text_logits = torch.cat([logits[0], out.text_logits[:, -1]])
    audio_logits = torch.cat([logits[1], out.audio_logits[:, -1]])
    merged, length = _trim(cache, merged, length)
    return text_logits, audio_logits, merged, length


def _result(text_stream: list[int], audio_stream: list[int], text_valid: int, audio_valid: int,
            tokens: StreamTokens, steps: int, finish: str, seconds: float) -> GenerationResult:
    off = tokens.token_offset
    text_ids = [t for t in text_stream[:text_valid] if t < off]
    audio_ids = [t - off for t in audio_stream[tokens.delay : tokens.delay + audio_valid] if t >= off]
    return GenerationResult(text_ids, audio_ids, text_stream, audio_stream, steps, finish, seconds)
