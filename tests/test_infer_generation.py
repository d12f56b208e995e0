"""Generation loop: the official rules step by step, batch == single, KV cache == full recompute."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from _infer_data import write_asr_data

from kimi_lora_cli.inference.generation import GenerationConfig, StreamTokens, generate
from kimi_lora_cli.inference.prompts import build_prompts
from kimi_lora_cli.inference.sampler import SamplingParams
from kimi_lora_cli.inference.samples import read_samples

BUDGET = 24
EXTRA_PROMPTS = [
    [{"role": "user", "message_type": "text", "content": "hello world this is a tiny test"}],
    [{"role": "user", "message_type": "text", "content": "one two"},
     {"role": "assistant", "message_type": "text", "content": "three four"},
     {"role": "user", "message_type": "text", "content": "five six seven eight nine ten. how are you today?"}],
]


@pytest.fixture(scope="module")
def conversations(tiny, tmp_path_factory):
    """ASR prompts with audio of different lengths plus text-only ones (all different lengths)."""
    data = write_asr_data(tmp_path_factory.mktemp("gen"), tiny.config, n=4)
    return [s.messages for s in read_samples(data, tiny.config)] + EXTRA_PROMPTS


@pytest.fixture(scope="module")
def boosted(tiny_dir, tiny, conversations):
    """A fresh tiny model with head rows rewritten so that the rules really fire on these prompts:
    text_eos copies (x1.05) a token some samples emit, so some stop at eos and some run out of
    steps; audio code 5 copies the audio token emitted most, so codes appear after the delay;
    msg_end copies a token emitted by some samples, so some audio streams end."""
    from kimi_lora_cli.loading import load_model

    loaded = load_model(tiny_dir, dtype="float32")
    tok, cfg = loaded.tokenizer, loaded.config
    st = StreamTokens.from_model(tok, cfg)
    delay = cfg.kimia_mimo_audiodelaytokens

    def run(otype):
        prompts = build_prompts(conversations, tok, cfg, loaded.feature_encoder, otype)
        return generate(loaded.model, prompts, GenerationConfig(otype, max_new_tokens=BUDGET), st)

    def candidates(results, stream, start):
        seen = Counter(t for r in results for t in set(getattr(r, stream)[start:]) if t != tok.blank)
        return [t for t, _ in seen.most_common()]

    def boost(head, row, otype, stream, start, accept):
        for t in candidates(run(otype), stream, start):
            old = head.weight[row].clone()
            head.weight[row] = head.weight[t] * 1.05
            if accept():
                return
            head.weight[row] = old
        pytest.fail(f"no token makes row {row} fire on the tiny model")

    def audio_ok(need_end):
        rs = run("both")
        finishes = {r.finish for r in rs}
        return (any(r.audio_tokens for r in rs) and not all(r.audio_tokens for r in rs)
                and (finishes == {"audio_end", "length"} and len({r.steps for r in rs}) > 1 if need_end else True))

    def eos_ok():
        both = run("both")
        text_eos_in_both = any(tok.text_eos in r.text_stream[:-2] for r in both)
        return ({r.finish for r in run("text")} == {"text_eos", "length"} and text_eos_in_both
                and audio_ok(True))

    with torch.no_grad():
        boost(loaded.model.mimo_output, cfg.kimia_token_offset + 5, "both", "audio_stream", delay,
              lambda: audio_ok(False))
        boost(loaded.model.mimo_output, tok.msg_end, "both", "audio_stream", delay, lambda: audio_ok(True))
        boost(loaded.model.lm_head, tok.text_eos, "text", "text_stream", 0, eos_ok)
    return loaded


def reference_generate(loaded, prompt, output_type: str, max_new_tokens: int):
    """The official loop written out for one sample: greedy, plain full-recompute forward calls."""
    tok, cfg = loaded.tokenizer, loaded.config
    net = loaded.model
    delay, offset = cfg.kimia_mimo_audiodelaytokens, cfg.kimia_token_offset
    audio, text, cont = list(prompt.audio_ids), list(prompt.text_ids), list(prompt.is_continuous)
    text_out, audio_out = [], []
    text_finished, valid_text, valid_audio = False, 0, 0
    for i in range(max_new_tokens):
        feats = None
        if prompt.features is not None:
            pad = torch.zeros(len(audio) - prompt.features.shape[0], prompt.features.shape[1])
            feats = torch.cat([prompt.features, pad])[None]
        with torch.no_grad():
            out = net(input_ids=torch.tensor([audio]), text_input_ids=torch.tensor([text]),
                      is_continuous_mask=torch.tensor([cont]), continuous_features=feats)
        next_text = int(torch.log_softmax(out.text_logits[0, -1].float(), -1).argmax())
        next_audio = int(torch.log_softmax(out.audio_logits[0, -1].float(), -1).argmax())
        if text_finished:
            next_text = tok.blank
        elif next_text == tok.text_eos:
            text_finished = True
        else:
            valid_text += 1
        if i < delay or output_type == "text":
            next_audio = tok.blank
        else:
            valid_audio += 1
        text_out.append(next_text)
        audio_out.append(next_audio)
        if output_type == "text" and text_finished:
            break
        if output_type == "both" and next_audio in (tok.msg_end, cfg.kimia_media_end):
            break
        audio.append(next_audio)
        text.append(next_text)
        cont.append(False)
    text_ids = [t for t in text_out[:valid_text] if t < offset]
    audio_ids = [a - offset for a in audio_out[delay : delay + valid_audio] if a >= offset]
    return text_ids, audio_ids, text_out, audio_out


def _fields(r):
    return (r.text_tokens, r.audio_tokens, r.text_stream, r.audio_stream, r.steps, r.finish)


@pytest.mark.parametrize("output_type", ["text", "both"])
def test_greedy_matches_hand_written_official_loop(boosted, conversations, output_type):
    tok, cfg = boosted.tokenizer, boosted.config
    st = StreamTokens.from_model(tok, cfg)
    prompts = build_prompts(conversations, tok, cfg, boosted.feature_encoder, output_type)
    assert all(p.audio_ids[-1] == tok.assistant_start for p in prompts)  # generation prompt
    assert prompts[0].features is not None and bool(torch.tensor(prompts[0].is_continuous).any())
    budget = BUDGET
    finishes = []
    for prompt in prompts:
        [got] = generate(boosted.model, [prompt], GenerationConfig(output_type, max_new_tokens=budget), st)
        text_ids, audio_ids, text_out, audio_out = reference_generate(boosted, prompt, output_type, budget)
        assert got.text_stream == text_out
        assert got.audio_stream == audio_out
        assert got.text_tokens == text_ids
        assert got.audio_tokens == audio_ids
        assert got.steps == len(text_out)
        assert all(a == tok.blank for a in audio_out[: cfg.kimia_mimo_audiodelaytokens])
        if output_type == "text":
            assert all(a == tok.blank for a in audio_out) and got.audio_tokens == []
        if tok.text_eos in text_out:  # eos kept in the stream, blanks after it, not in the result
            k = text_out.index(tok.text_eos)
            assert all(t == tok.blank for t in text_out[k + 1 :])
            assert len(got.text_tokens) <= k
        finishes.append(got.finish)
    # The boosted heads make the stop rules fire (and not all at the same step).
    expected = "text_eos" if output_type == "text" else "audio_end"
    assert expected in finishes and "length" in finishes
    if output_type == "both":
        assert any(reference_generate(boosted, p, "both", budget)[1] for p in prompts)  # codes produced


@pytest.mark.parametrize("output_type", ["text", "both"])
def test_batch_equals_single_and_cache_equals_recompute(boosted, conversations, output_type):
    tok, cfg = boosted.tokenizer, boosted.config
    st = StreamTokens.from_model(tok, cfg)
    prompts = build_prompts(conversations, tok, cfg, boosted.feature_encoder, output_type)
    assert len({len(p) for p in prompts}) == len(prompts)  # different lengths: real left padding
    gcfg = GenerationConfig(output_type, max_new_tokens=BUDGET)
    batched = generate(boosted.model, prompts, gcfg, st)
    singles = [generate(boosted.model, [p], gcfg, st)[0] for p in prompts]
    recomputed = generate(boosted.model, prompts, GenerationConfig(output_type, max_new_tokens=BUDGET, use_cache=False), st)
    assert [_fields(r) for r in batched] == [_fields(r) for r in singles]
    assert [_fields(r) for r in recomputed] == [_fields(r) for r in singles]
    assert len({r.steps for r in batched}) > 1  # samples left the batch at different steps


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny, conversations):
    tok, cfg = tiny.tokenizer, tiny.config
    st = StreamTokens.from_model(tok, cfg)
    prompts = build_prompts(conversations[-2:], tok, cfg, tiny.feature_encoder, "both")
    hot = SamplingParams(temperature=1.0, top_k=0)
    gcfg = GenerationConfig("both", max_new_tokens=16, text=hot, audio=SamplingParams(temperature=0.8, top_k=10))

    def gens(*seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    a = generate(tiny.model, prompts, gcfg, st, gens(1, 2))
    b = generate(tiny.model, prompts, gcfg, st, gens(1, 2))
    alone = generate(tiny.model, prompts[1:], gcfg, st, gens(2))
    other = generate(tiny.model, prompts, gcfg, st, gens(3, 4))
    assert [_fields(r) for r in a] == [_fields(r) for r in b]
    assert _fields(a[1]) == _fields(alone[0])
    assert [r.text_stream for r in a] != [r.text_stream for r in other]


def test_official_step_budget():
    assert GenerationConfig("text").budget(100) == 7400
    assert GenerationConfig("both").budget(100) == 1400
    assert GenerationConfig("both", max_new_tokens=32).budget(100) == 32
    with pytest.raises(ValueError):
        GenerationConfig("text", max_new_tokens=0)
    with pytest.raises(ValueError):
        GenerationConfig("speech")




@pytest.mark.parametrize("length", [1, 1279, 40961, 479999])
def test_short_clip_log_mel_is_bit_exact(length):
    """Prefill features: skipping the STFT of all-zero padding frames changes no bit."""
    from kimi_lora_cli.models.kimi_audio.whisper import CHUNK_SAMPLES, SAMPLES_PER_ROW, log_mel

    wave = torch.randn(3, length, generator=torch.Generator().manual_seed(length)) * 0.1
    pieces = torch.nn.functional.pad(wave, (0, CHUNK_SAMPLES - length))
    bound = ((length - 1) // SAMPLES_PER_ROW + 1) * SAMPLES_PER_ROW
    assert torch.equal(log_mel(pieces), log_mel(pieces, signal_samples=bound))


class _JoinAt:
    """Hooks that hand `generate` the given samples after the given decode steps (step-level batching)."""

    def __init__(self, plan: dict[int, list[tuple]]):
        self.plan, self.calls, self.ended, self.rows_seen = plan, 0, [], []

    def before_forward(self, rows):
        self.rows_seen.append(list(rows))

    def after_step(self, steps, rows, text, audio):
        return None

    def join(self, first, rows):
        self.calls += 1
        return self.plan.pop(self.calls, [])

    def finished(self, index, result):
        self.ended.append(index)


def _seeded(k):
    return torch.Generator().manual_seed(1000 + k)


@pytest.mark.parametrize("output_type, sampled", [("text", False), ("both", False), ("both", True)])
def test_samples_that_join_a_running_batch_decode_as_if_alone(boosted, conversations, output_type, sampled):
    """Prompts 0-1 start; the longest joins after step 1 (longer than the batch's cache: the running rows
    are padded on the left), two more after step 2, the last after step 3 (shorter: the joiner is padded).
    Every sample - each at its own step (delay, budget, repetition history) - equals its decode alone,
    and each result is reported as soon as its row stops."""
    tok, cfg = boosted.tokenizer, boosted.config
    st = StreamTokens.from_model(tok, cfg)
    prompts = build_prompts(conversations, tok, cfg, boosted.feature_encoder, output_type)
    order = sorted(range(len(prompts)), key=lambda k: len(prompts[k]))
    start, late = order[:2], order[2:]
    longest, rest = late[-1], late[:-1]
    assert len(prompts[longest]) > max(len(prompts[k]) for k in start) + 1
    assert len(prompts[rest[0]]) < max(len(prompts[k]) for k in start) + 3
    text = SamplingParams(temperature=1.0, top_k=0, repetition_penalty=1.3, repetition_window=2) if sampled else \
        SamplingParams()
    audio = SamplingParams(temperature=0.8, top_k=10, repetition_penalty=1.2, repetition_window=3) if sampled else \
        SamplingParams()
    gcfg = GenerationConfig(output_type, max_new_tokens=BUDGET, text=text, audio=audio)
    alone = {k: generate(boosted.model, [prompts[k]], gcfg, st, [_seeded(k)] if sampled else None)[0]
             for k in range(len(prompts))}

    def joiner(k, budget=BUDGET):
        return (prompts[k], _seeded(k) if sampled else None, budget)

    hooks = _JoinAt({1: [joiner(longest)], 2: [joiner(rest[1]), joiner(rest[2], budget=5)], 3: [joiner(rest[0])]})
    results = generate(boosted.model, [prompts[k] for k in start], gcfg, st,
                       [_seeded(k) for k in start] if sampled else None, hooks=hooks)
    numbered = [*start, longest, rest[1], rest[2], rest[0]]
    assert len(results) == len(numbered) and not hooks.plan  # every joiner was taken
    for got, k in zip(results, numbered):
        want = alone[k]
        if k == rest[2]:  # its own budget of 5 steps
            assert got.steps <= 5 and got.text_stream == want.text_stream[: got.steps], k
            continue
        assert _fields(got) == _fields(want), k
    assert sorted(hooks.ended) == list(range(len(numbered)))
    # results come as rows stop: a sample that stopped earlier is reported earlier
    steps_at_end = [results[i].steps + (0, 0, 1, 2, 2, 3)[i] for i in hooks.ended]
    assert steps_at_end == sorted(steps_at_end)
    # the joiners really ran in the same forwards as the first rows
    assert any(set(r) & {0, 1} and set(r) & {2, 3, 4, 5} for r in hooks.rows_seen)
    assert max(len(r) for r in hooks.rows_seen) >= 4


def test_a_batch_that_samples_keep_joining_does_not_hold_every_position_since_it_began(boosted, conversations,
                                                                                       monkeypatch):
    """A rolling batch (a new sample joins after every step, each lives 3 steps): once the first sample
    has left, the cache holds only what the live rows need (their prompts and steps), not every
    position since the batch began - and every sample still equals its decode alone."""
    from kimi_lora_cli.models.kimi_audio.modeling import KimiKVCache

    tok, cfg = boosted.tokenizer, boosted.config
    st = StreamTokens.from_model(tok, cfg)
    prompts = build_prompts(conversations, tok, cfg, boosted.feature_encoder, "text")
    gcfg = GenerationConfig("text", max_new_tokens=3)
    alone = [generate(boosted.model, [p], gcfg, st)[0] for p in prompts]
    lengths = []
    update = KimiKVCache.update

    def recording(self, layer_idx, k, v):
        out = update(self, layer_idx, k, v)
        if layer_idx == 0:
            lengths.append(self.lengths[0])
        return out

    monkeypatch.setattr(KimiKVCache, "update", recording)
    rounds = 40
    plan = {step: [(prompts[step % len(prompts)], None, 3)] for step in range(1, rounds + 1)}
    hooks = _JoinAt(plan)
    results = generate(boosted.model, [prompts[0]], gcfg, st, hooks=hooks)
    assert not hooks.plan and len(results) == rounds + 1
    for k, got in enumerate(results):
        want = alone[0 if k == 0 else k % len(prompts)]
        assert got.text_stream == want.text_stream, k
    longest = max(len(p) for p in prompts)
    assert max(lengths) > longest  # it did grow while the first sample was there...
    assert max(lengths[-40:]) <= longest + 4  # ...and holds only the live rows' positions later
