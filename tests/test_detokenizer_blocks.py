"""Detokenizer building blocks against hand-written references of the same math.

DiT: timestep features, sinusoid positions, rotary pairs, a whole forward (float64, written out
with explicit layer norm / softmax / GELU), and the chunk KV cache against block-causal attention.
Vocoder: Kaiser-sinc taps (numpy window), up/down sampling (explicit loops), Snake, an AMP block,
weight-norm folding, output length. Euler: time points and step sizes.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kimi_lora_cli.models.detokenizer.config import DiTConfig, VocoderConfig
from kimi_lora_cli.models.detokenizer.dit import (
    DiT,
    apply_rope,
    rope_table,
    sinusoid_table,
    timestep_features,
)
from kimi_lora_cli.models.detokenizer.streaming import euler
from kimi_lora_cli.models.detokenizer.tiny import dit_tensors
from kimi_lora_cli.models.detokenizer.vocoder import (
    AMPBlock1,
    BigVGAN,
    DownSample1d,
    Snake,
    UpSample1d,
    kaiser_sinc_filter,
)

# ---------------------------------------------------------------------------------------------
# DiT pieces
# ---------------------------------------------------------------------------------------------


def test_timestep_features_are_cos_then_sin_of_geometric_frequencies():
    t = torch.tensor([0, 7, 999])
    got = timestep_features(t)
    half = 128
    for row, tt in enumerate([0, 7, 999]):
        w = [math.exp(-math.log(10000) * i / half) for i in range(half)]
        want = [math.cos(tt * wi) for wi in w] + [math.sin(tt * wi) for wi in w]
        np.testing.assert_allclose(got[row].numpy(), want, atol=2e-4)  # float32 angles up to ~1000 rad


def test_sinusoid_positions_count_the_nonzero_ids_of_each_row():
    cfg = DiTConfig(semantic_vocab_size=8, hidden_size=6, depth=1, num_heads=2, mlp_ratio=1.0,
                    use_rope=False, position_embedding_type="sincos")
    emb = DiT(cfg).position_embedding
    got = emb(torch.tensor([[0, 1, 2, 3], [5, 6, 7, 8]]))

    def row(p):  # fairseq: [sin(p w_i), cos(p w_i)], w_i = 10000^(-i/(half-1)), row 0 all zero
        if p == 0:
            return [0.0] * 6
        w = [math.exp(-i * math.log(10000) / 2) for i in range(3)]
        return [math.sin(p * wi) for wi in w] + [math.cos(p * wi) for wi in w]

    np.testing.assert_allclose(got[0].numpy(), [row(p) for p in (0, 1, 2, 3)], atol=1e-6)
    np.testing.assert_allclose(got[1].numpy(), [row(p) for p in (1, 2, 3, 4)], atol=1e-6)  # counts restart
    assert torch.equal(sinusoid_table(4, 6)[0], torch.zeros(6))


def rotate_pairs(x: torch.Tensor, positions: list[int], base: float) -> torch.Tensor:
    """x [B, T, H, D]: channels (2j, 2j+1) rotated by angle p * base^(-2j/D)."""
    out = x.clone().double()
    d = x.shape[-1]
    for ti, p in enumerate(positions):
        for j in range(d // 2):
            a = p * base ** (-2 * j / d)
            x0, x1 = x[:, ti, :, 2 * j].double(), x[:, ti, :, 2 * j + 1].double()
            out[:, ti, :, 2 * j] = x0 * math.cos(a) - x1 * math.sin(a)
            out[:, ti, :, 2 * j + 1] = x0 * math.sin(a) + x1 * math.cos(a)
    return out


def test_rope_rotates_adjacent_channel_pairs():
    torch.manual_seed(0)
    x = torch.randn(1, 5, 2, 8)
    positions = [3, 4, 5, 6, 7]
    got = apply_rope(x, rope_table(8, 64, 10000.0, 1.0, 64)[torch.tensor([positions])])
    torch.testing.assert_close(got.double(), rotate_pairs(x, positions, 10000.0), atol=1e-5, rtol=1e-5)
    assert rope_table(8, 64, 10000.0, 1.0, 16).shape == (16, 4)  # cut to max_seq_len


def small_dit(position: str = "learnable") -> tuple[DiT, dict]:
    cfg = DiTConfig(semantic_vocab_size=16, hidden_size=16, depth=2, num_heads=2, mlp_ratio=2.0,
                    use_rope=True, position_embedding_type=position, max_seq_len=64, rope_max_positions=64)
    sd = dit_tensors(cfg, torch.Generator().manual_seed(3))
    model = DiT(cfg)
    model.load_state_dict(sd)
    return model.double().eval(), {k: v.double() for k, v in sd.items()}


def reference_dit(sd, cfg, x, tokens, t, positions, allowed=None):
    """The DiT written out: x [T, C] float64, tokens [T], scalar t, positions list; allowed [T, S]
    boolean attention mask over the same T frames (None = full)."""
    def lin(name, h):
        return h @ sd[name + ".weight"].T + sd[name + ".bias"]

    def norm(h):
        mu = h.mean(-1, keepdim=True)
        return (h - mu) / torch.sqrt(((h - mu) ** 2).mean(-1, keepdim=True) + 1e-6)

    def silu(h):
        return h * torch.sigmoid(h)

    def gelu_tanh(h):
        return 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))

    w = [math.exp(-math.log(10000) * i / 128) for i in range(128)]
    feats = torch.tensor([math.cos(t * wi) for wi in w] + [math.sin(t * wi) for wi in w], dtype=torch.float64)
    c = lin("t_embedder.mlp.2", silu(lin("t_embedder.mlp.0", feats)))[None] + sd["semantic_token_embedding.weight"][tokens]
    h = lin("input_linear", x) + sd["position_embedding.weight"][torch.tensor(positions)]
    heads, dim = cfg.num_heads, cfg.hidden_size
    hd = dim // heads
    for i in range(cfg.depth):
        p = f"blocks.{i}."
        sa, ca, ga, sm, cm, gm = lin(p + "adaLN_modulation.1", silu(c)).chunk(6, dim=-1)
        qkv = lin(p + "attn.qkv", norm(h) * (1 + ca) + sa)
        q, k, v = (qkv[:, j * dim:(j + 1) * dim].reshape(1, -1, heads, hd) for j in range(3))
        q, k = rotate_pairs(q, positions, cfg.rope_base)[0], rotate_pairs(k, positions, cfg.rope_base)[0]
        v = v[0]
        scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(hd)
        if allowed is not None:
            scores = scores.masked_fill(~allowed[None], float("-inf"))
        att = torch.einsum("hts,shd->thd", torch.softmax(scores, dim=-1), v).reshape(-1, dim)
        h = h + ga * lin(p + "attn.proj", att)
        m = norm(h) * (1 + cm) + sm
        h = h + gm * lin(p + "mlp.fc2", gelu_tanh(lin(p + "mlp.fc1", m)))
    shift, scale = lin("final_layer.adaLN_modulation.1", silu(c)).chunk(2, dim=-1)
    return lin("final_layer.linear", norm(h) * (1 + scale) + shift)


def test_dit_forward_matches_the_written_out_math():
    model, sd = small_dit()
    torch.manual_seed(1)
    x = torch.randn(1, 6, 80, dtype=torch.float64)
    tokens = torch.tensor([[1, 5, 5, 0, 16, 3]])
    positions = [2, 3, 4, 5, 6, 7]
    got = model(x, tokens, torch.tensor([412]), torch.tensor([positions]))
    want = reference_dit(sd, model.cfg, x[0], tokens[0], 412, positions)
    torch.testing.assert_close(got[0], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("max_frames", [None, 6])
def test_chunk_cache_equals_block_causal_attention(max_frames):
    """Chunks fed one by one through the cache = one pass where each chunk sees itself and every
    earlier chunk (only the newest `max_frames` committed frames when the cache is capped)."""
    model, sd = small_dit()
    torch.manual_seed(2)
    sizes = [5, 7, 4]
    total = sum(sizes)
    x = torch.randn(total, 80, dtype=torch.float64)
    tokens = torch.randint(0, 17, (total,))
    cache, outs, start = model.new_cache(), [], 0
    for n in sizes:
        pos = torch.arange(start, start + n)[None]
        outs.append(model(x[None, start:start + n], tokens[None, start:start + n], torch.tensor([999]), pos, cache)[0])
        cache.commit(max_frames)
        start += n
    allowed = torch.zeros(total, total, dtype=torch.bool)
    start = 0
    for n in sizes:
        lo = 0 if max_frames is None else max(0, start - max_frames)
        allowed[start:start + n, lo:start + n] = True
        start += n
    want = reference_dit(sd, model.cfg, x, tokens, 999, list(range(total)), allowed)
    torch.testing.assert_close(torch.cat(outs), want, atol=1e-4, rtol=1e-4)  # rotary angles in float32
    assert cache.frames == (total if max_frames is None else max_frames)


# ---------------------------------------------------------------------------------------------
# Vocoder pieces
# ---------------------------------------------------------------------------------------------


def test_kaiser_sinc_taps_use_numpys_kaiser_window():
    taps = kaiser_sinc_filter(0.25, 0.3, 12).view(-1).double().numpy()
    a = 2.285 * 5 * math.pi * 1.2 + 7.95  # attenuation > 50 dB
    beta = 0.1102 * (a - 8.7)
    time = np.arange(-6, 6) + 0.5
    want = 0.5 * np.kaiser(12, beta) * np.sinc(0.5 * time)
    np.testing.assert_allclose(taps, want / want.sum(), atol=1e-6)
    assert taps.sum() == pytest.approx(1.0)


def upsample_loops(x: np.ndarray, taps: np.ndarray) -> np.ndarray:
    """x2: replicate-pad 5, place the samples at even slots of a zero signal, filter, gain 2, crop 15."""
    pad = 5
    xp = np.concatenate([np.repeat(x[:, :1], pad, 1), x, np.repeat(x[:, -1:], pad, 1)], axis=1)
    k = len(taps)
    full = np.zeros((x.shape[0], 2 * (xp.shape[1] - 1) + k))
    for n in range(xp.shape[1]):
        for j in range(k):
            full[:, 2 * n + j] += xp[:, n] * taps[j]
    return 2 * full[:, 15:full.shape[1] - 15]


def downsample_loops(x: np.ndarray, taps: np.ndarray) -> np.ndarray:
    xp = np.concatenate([np.repeat(x[:, :1], 5, 1), x, np.repeat(x[:, -1:], 6, 1)], axis=1)
    k = len(taps)
    return np.stack([[xp[c, 2 * j:2 * j + k] @ taps for j in range(x.shape[1] // 2)] for c in range(x.shape[0])])


def snakebeta_np(x, alpha, beta):
    a, b = np.exp(alpha)[:, None], np.exp(beta)[:, None]
    return x + np.sin(x * a) ** 2 / (b + 1e-9)


def test_up_and_down_sampling_match_explicit_loops():
    rng = np.random.RandomState(0)
    x = rng.randn(3, 11)
    up, down = UpSample1d(2).double(), DownSample1d(2).double()
    got_up = up(torch.from_numpy(x)[None])[0].numpy()
    np.testing.assert_allclose(got_up, upsample_loops(x, up.filter.view(-1).numpy()), atol=1e-12)
    y = rng.randn(3, 22)
    got_down = down(torch.from_numpy(y)[None])[0].numpy()
    np.testing.assert_allclose(got_down, downsample_loops(y, down.lowpass.filter.view(-1).numpy()), atol=1e-12)
    assert got_up.shape == (3, 22) and got_down.shape == (3, 11)


def test_snake_and_snakebeta_formulas():
    rng = np.random.RandomState(1)
    x = rng.randn(2, 4, 9)
    act = Snake(4, logscale=True, beta=True).double()
    with torch.no_grad():
        act.alpha.copy_(torch.from_numpy(rng.randn(4) * 0.3))
        act.beta.copy_(torch.from_numpy(rng.randn(4) * 0.3))
    got = act(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(got, snakebeta_np(x, act.alpha.detach().numpy(), act.beta.detach().numpy()), atol=1e-12)
    plain = Snake(4, logscale=False, beta=False).double()
    with torch.no_grad():
        plain.alpha.copy_(torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=torch.float64))
    a = np.array([0.5, 1.0, 2.0, 3.0])[:, None]
    np.testing.assert_allclose(plain(torch.from_numpy(x)).detach().numpy(), x + np.sin(x * a) ** 2 / (a + 1e-9),
                               atol=1e-12)


def test_amp_block_is_act_conv_act_conv_residuals():
    torch.manual_seed(4)
    block = AMPBlock1(2, 3, (1, 3), lambda c: Snake(c, logscale=True, beta=True)).double()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    x = torch.randn(1, 2, 12, dtype=torch.float64)
    block.requires_grad_(False)

    def act(h, a):
        up = upsample_loops(h[0].numpy(), a.upsample.filter.view(-1).numpy())
        s = snakebeta_np(up, a.act.alpha.detach().numpy(), a.act.beta.detach().numpy())
        return torch.from_numpy(downsample_loops(s, a.downsample.lowpass.filter.view(-1).numpy()))[None]

    want = x.clone()
    for k, d in enumerate((1, 3)):
        c1, c2 = block.convs1[k], block.convs2[k]
        h = F.conv1d(act(want, block.activations[2 * k]), c1.weight, c1.bias, dilation=d, padding=d)
        h = F.conv1d(act(h, block.activations[2 * k + 1]), c2.weight, c2.bias, padding=1)
        want = want + h
    torch.testing.assert_close(block(x).detach(), want, atol=1e-10, rtol=1e-10)


def test_bigvgan_gives_hop_samples_per_frame_and_bounds_them():
    cfg = VocoderConfig(upsample_rates=(4, 3), upsample_kernel_sizes=(8, 7), upsample_initial_channel=8,
                        resblock_kernel_sizes=(3,), resblock_dilation_sizes=((1, 3),), num_mels=10,
                        use_tanh_at_final=False)
    torch.manual_seed(5)
    voc = BigVGAN(cfg).eval()
    with torch.no_grad():
        wav = voc(10 * torch.randn(1, 10, 7))
    assert wav.shape == (1, 1, 7 * 12) and cfg.hop_size == 12
    assert wav.abs().max() <= 1.0


# ---------------------------------------------------------------------------------------------
# Euler sampling
# ---------------------------------------------------------------------------------------------


def test_euler_takes_points_minus_one_steps_from_time_zero():
    seen = []

    def velocity(t, x):
        seen.append(float(t))
        return torch.full_like(x, 2.0) + x * 0

    x0 = torch.zeros(3)
    out = euler(velocity, x0, 5)
    assert seen == pytest.approx([0.0, 0.25, 0.5, 0.75])
    torch.testing.assert_close(out, torch.full((3,), 2.0))  # integral of 2 over [0, 1]
    seen.clear()
    out = euler(lambda t, x: x, torch.ones(1, dtype=torch.float64), 30)  # dx/dt = x: (1 + 1/29)^29
    assert len(seen) == 0 and float(out) == pytest.approx((1 + 1 / 29) ** 29, rel=1e-6)
