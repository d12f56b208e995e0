"""The official streaming rules on the tiny detokenizer: chunk plan, look-ahead, seams, positions,
cache cap, voice prompt, seeded and explicit noise."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kimi_lora_cli.models.detokenizer.streaming import (
    Chunk,
    Detokenizer,
    StreamingRules,
    euler,
    plan_chunks,
    plan_prompt,
)

HOP = 480


def official_loop(n: int) -> list[tuple[int, int, bool]]:
    """`detokenize_audio` of kimia_infer/api/kimia.py, restated: first 30 codes, then 30 at a time."""
    out = [(0, min(30, n), n <= 30)]
    if n > 30:
        rest = n - 30
        for i in range(0, rest, 30):
            out.append((30 + i, 30 + min(i + 30, rest), i + 30 >= rest))
    return out


@pytest.mark.parametrize("n", [1, 29, 30, 31, 59, 60, 61, 90, 91, 137, 1500])
def test_chunk_plan_is_the_official_loop(n):
    plan = plan_chunks(n)
    assert [(c.start, c.end, c.is_final) for c in plan] == official_loop(n)
    assert sum(c.is_final for c in plan) == 1 and plan[-1].is_final


def test_chunk_plan_spelled_out():
    assert plan_chunks(0) == []
    assert plan_chunks(61) == [Chunk(0, 30, False), Chunk(30, 60, False), Chunk(60, 61, True)]
    rules = StreamingRules()
    assert (rules.first_chunk_tokens, rules.chunk_tokens, rules.upsample, rules.look_ahead_tokens,
            rules.max_prompt_chunks, rules.ode_steps) == (30, 30, 4, 12, 10, 30)


def test_prompt_plan_keeps_at_most_ten_full_chunks_after_the_rest():
    assert plan_prompt(300) == [(0, 150), (150, 300)]
    assert plan_prompt(1000) == [(0, 100)] + [(100 + 150 * i, 250 + 150 * i) for i in range(6)]
    assert plan_prompt(2000) == [(0, 500)] + [(500 + 150 * i, 650 + 150 * i) for i in range(10)]
    assert plan_prompt(90) == [(0, 90)]


def codes(n, seed=1):
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed))


def test_look_ahead_frames_seams_and_total_length(tiny_detok):
    det = tiny_detok
    assert det.noise_shapes(61) == [(120, 80), (168, 80), (52, 80)]  # 48 held-back frames lead chunks 2, 3
    assert det.noise_shapes(30) == [(120, 80)] and det.noise_shapes(1) == [(4, 80)]
    c = codes(61)
    g = torch.Generator().manual_seed(0)
    det.reset()
    first = det.push(c[:30], False, generator=g)
    assert first.shape == (HOP * 72 // 2,)  # 120 - 48 frames emitted; half their audio out
    assert det.position == 72 and det.cache.frames == 72
    second = det.push(c[30:60], False, generator=g)
    assert second.shape == (2 * HOP * 36,)  # (36 kept + 120) frames vocoded; twice the kept audio out
    assert det.position == 192 and det.cache.frames == 192
    last = det.push(c[60:], True, generator=g)
    assert last.shape == ((84 + 52) * HOP,)  # everything left
    assert det.position == 0 and det.cache.frames == 0  # final chunk resets the stream
    total = first.shape[0] + second.shape[0] + last.shape[0]
    assert total == 61 * 4 * HOP == det.samples_for(61)
    whole = det.detokenize(c, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(whole, torch.cat([first, second, last]))


def test_first_chunk_is_euler_on_the_dit_then_half_the_vocoded_frames(tiny_detok):
    det = tiny_detok
    c = codes(40, seed=3)
    noise = torch.randn(120, 80, generator=torch.Generator().manual_seed(9))
    det.reset()
    got = det.push(c[:30], False, noise=noise)
    det.reset()
    tokens = c[:30].repeat_interleave(4)[None]
    positions = torch.arange(120)[None]
    with torch.no_grad():
        x = euler(lambda t, x: det.dit(x, tokens, (t * 1000).long().view(1), positions), noise[None], 30)
        mel = x[0, :72] * det.dit.cfg.mel_std + det.dit.cfg.mel_mean
        wav = det.vocoder(mel.T[None])[0, 0]
    torch.testing.assert_close(got, wav[: 72 * HOP // 2])


def test_seams_are_hamming_cross_fades_over_the_kept_audio(tiny_detok):
    det = tiny_detok
    g = torch.Generator().manual_seed(4)
    mels = [torch.randn(n, 80, generator=g) - 4 for n in (12, 20, 20, 6)]
    det.reset()
    outs = [det._emit(m, final) for m, final in zip(mels, (False, False, False, True))]
    det.reset()
    with torch.no_grad():
        def voc(m):
            return det.vocoder(m.T[None])[0, 0]

        def hamming(n):  # periodic
            k = torch.arange(n, dtype=torch.float64)
            return (0.54 - 0.46 * torch.cos(2 * torch.pi * k / n)).float()

        w0 = voc(mels[0])
        torch.testing.assert_close(outs[0], w0[: 6 * HOP])
        kept_wav, kept_mel = w0[6 * HOP:], mels[0][6:]
        for i in (1, 2):
            w = voc(torch.cat([kept_mel, mels[i]]))
            size = 2 * kept_wav.shape[0]
            win = hamming(size)
            want = w[:size].clone()
            want[: size // 2] = kept_wav * win[size // 2:] + w[: size // 2] * win[: size // 2]
            torch.testing.assert_close(outs[i], want)
            kept_wav = w[size:]
            kept_mel = mels[i][-(kept_wav.shape[0] // HOP):]
        torch.testing.assert_close(outs[3], voc(torch.cat([kept_mel, mels[3]])))
    assert [o.shape[0] for o in outs] == [6 * HOP, 12 * HOP, 28 * HOP, (6 + 6) * HOP]
    assert sum(o.shape[0] for o in outs) == (12 + 20 + 20 + 6) * HOP


def test_positions_restart_before_passing_the_limit_and_the_cache_is_capped(tiny_detok):
    rules = dataclasses.replace(StreamingRules(), max_positions=400, max_kv_cache_frames=100, ode_steps=3)
    det = Detokenizer(tiny_detok.dit, tiny_detok.vocoder, rules)
    c = codes(120)
    g = torch.Generator().manual_seed(0)
    det.push(c[:30], False, generator=g)
    assert det.position == 72 and det.cache.frames == 72  # 72 + 2 * 72 <= 400: no restart
    det.push(c[30:60], False, generator=g)
    assert det.position == 0 and det.cache.frames == 0  # 192 + 2 * 120 > 400: restart
    det.push(c[60:90], False, generator=g)
    assert det.position == 120 and det.cache.frames == 100  # 120 + 240 <= 400; cache capped at 100
    assert det.push(c[90:], True, generator=g).shape[0] > 0


def test_fixed_seed_is_deterministic_and_noise_can_be_given(tiny_detok):
    det = Detokenizer(tiny_detok.dit, tiny_detok.vocoder, dataclasses.replace(tiny_detok.rules, ode_steps=5))
    c = codes(40)
    a = det.detokenize(c, generator=torch.Generator().manual_seed(0))
    b = det.detokenize(c, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert not torch.equal(a, det.detokenize(c, generator=torch.Generator().manual_seed(1)))
    torch.manual_seed(0)  # what the official code draws from the global generator after manual_seed(0)
    noise = [torch.randn(*shape) for shape in det.noise_shapes(40)]
    assert torch.equal(det.detokenize(c, noise=noise), a)
    with pytest.raises(ValueError, match="one per chunk"):
        det.detokenize(c, noise=noise[:1])
    with pytest.raises(ValueError, match="shape"):
        det.detokenize(c, noise=[n[:-1] for n in noise])
    with pytest.raises(ValueError, match=r"\[0, 128\)"):
        det.detokenize([0, 128])
    assert det.detokenize([]).shape == (0,)


def test_voice_prompt_conditions_every_utterance_until_cleared(tiny_detok_dir):
    from kimi_lora_cli.loading import load_detokenizer

    det = load_detokenizer(tiny_detok_dir, dtype="float32", ode_steps=4)
    c = codes(35)
    plain = det.detokenize(c, generator=torch.Generator().manual_seed(0))
    mel = torch.randn(400, 80, generator=torch.Generator().manual_seed(2)) - 4
    det.set_prompt(mel, codes(400, seed=5))
    assert det.position == 400 and det.cache.frames == 400
    prompted = det.detokenize(c, generator=torch.Generator().manual_seed(0))
    assert det.position == 400 and not torch.equal(prompted, plain)
    assert torch.equal(det.detokenize(c, generator=torch.Generator().manual_seed(0)), prompted)
    det.clear_prompt()
    assert torch.equal(det.detokenize(c, generator=torch.Generator().manual_seed(0)), plain)


def test_bfloat16_gives_the_same_length_and_close_audio(tiny_detok_dir, tiny_detok):
    from kimi_lora_cli.loading import load_detokenizer

    det = load_detokenizer(tiny_detok_dir, dtype="bfloat16", ode_steps=4)
    fp32 = Detokenizer(tiny_detok.dit, tiny_detok.vocoder, dataclasses.replace(tiny_detok.rules, ode_steps=4))
    c = codes(40)
    a = det.detokenize(c, generator=torch.Generator().manual_seed(0))
    b = fp32.detokenize(c, generator=torch.Generator().manual_seed(0))
    assert a.dtype == torch.float32 and a.shape == b.shape == (40 * 4 * HOP,)
    assert torch.isfinite(a).all() and (a - b).abs().mean() < 0.1 * b.abs().mean()
