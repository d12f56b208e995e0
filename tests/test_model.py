"""The native model: padding, KV cache, mimo branch, feature fusion, gradient checkpointing."""

from __future__ import annotations

import math

import pytest
import torch

from kimi_lora_cli.models.kimi_audio.modeling import KimiAudioForCausalLM


@pytest.fixture(scope="module")
def model(tiny):
    return tiny.model.eval()


def _ids(cfg, n, seed):
    g = torch.Generator().manual_seed(seed)
    audio = torch.randint(0, cfg.vocab_size, (n,), generator=g)
    text = torch.randint(0, cfg.kimia_token_offset, (n,), generator=g)
    return audio, text


def test_logits_shapes_and_names(model):
    cfg = model.config
    a, t = _ids(cfg, 7, 0)
    out = model(a[None], text_input_ids=t[None])
    assert out.text_logits.shape == (1, 7, cfg.vocab_size)
    assert out.audio_logits.shape == (1, 7, cfg.vocab_size)
    assert torch.isfinite(out.text_logits).all() and torch.isfinite(out.audio_logits).all()


def test_matches_transformers_qwen2_layers(model):
    """Main stack + lm_head and mimo stack + mimo_output equal transformers' Qwen2 blocks."""
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

    cfg = model.config
    qcfg = Qwen2Config(hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                       num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
                       num_hidden_layers=cfg.num_hidden_layers, rms_norm_eps=cfg.rms_norm_eps,
                       rope_theta=cfg.rope_theta, vocab_size=cfg.vocab_size, max_position_embeddings=64)
    qcfg._attn_implementation = "eager"
    rotary = Qwen2RotaryEmbedding(qcfg)

    def stack(layers, h, pos):
        cos, sin = rotary(h, pos)
        L = h.shape[1]
        mask = torch.full((L, L), float("-inf")).triu(1)[None, None]
        for src in layers:
            ref = Qwen2DecoderLayer(qcfg, 0)
            ref.load_state_dict(src.state_dict())
            h = ref(h, attention_mask=mask, position_embeddings=(cos, sin), position_ids=pos)
        return h

    a, t = _ids(cfg, 9, 1)
    pos = torch.arange(9)[None]
    with torch.no_grad():
        emb = model.model.embed_tokens(a)[None] + model.model.embed_tokens(t)[None]
        k = cfg.kimia_mimo_transformer_from_layer_index
        h_branch = stack(model.model.layers[: k + 1], emb, pos)
        h_main = stack(model.model.layers[k + 1 :], h_branch, pos)
        h_mimo = stack(model.model.mimo_layers, h_branch, pos)
        text_ref = model.lm_head(model.model.norm(h_main))
        audio_ref = model.mimo_output(model.model.mimo_norm(h_mimo))
        out = model(a[None], text_input_ids=t[None])
    torch.testing.assert_close(out.text_logits, text_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.audio_logits, audio_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_sample_alone(model, side):
    cfg = model.config
    lengths = [5, 11, 8]
    samples = [_ids(cfg, n, 10 + i) for i, n in enumerate(lengths)]
    L = max(lengths)
    audio = torch.full((3, L), cfg.pad_token_id)
    text = torch.full((3, L), cfg.pad_token_id)
    mask = torch.zeros(3, L, dtype=torch.long)
    for i, (a, t) in enumerate(samples):
        sl = slice(L - len(a), L) if side == "left" else slice(0, len(a))
        audio[i, sl], text[i, sl], mask[i, sl] = a, t, 1
    with torch.no_grad():
        batch = model(audio, text_input_ids=text, attention_mask=mask)
        for i, (a, t) in enumerate(samples):
            alone = model(a[None], text_input_ids=t[None])
            sl = slice(L - len(a), L) if side == "left" else slice(0, len(a))
            torch.testing.assert_close(batch.text_logits[i, sl], alone.text_logits[0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(batch.audio_logits[i, sl], alone.audio_logits[0], atol=1e-5, rtol=1e-4)


def test_kv_cache_equals_full_forward(model):
    cfg = model.config
    a, t = _ids(cfg, 12, 3)
    with torch.no_grad():
        full = model(a[None], text_input_ids=t[None])
        out = model(a[None, :8], text_input_ids=t[None, :8], use_cache=True)
        cache = out.past_key_values
        assert cache.get_seq_length() == 8 and cache.num_layers == cfg.num_hidden_layers + cfg.kimia_mimo_layers
        steps = []
        for i in range(8, 12):
            step = model(a[None, i : i + 1], text_input_ids=t[None, i : i + 1], past_key_values=cache, use_cache=True)
            steps.append((step.text_logits[0, -1], step.audio_logits[0, -1]))
    for j, (tl, al) in enumerate(steps):
        torch.testing.assert_close(tl, full.text_logits[0, 8 + j], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(al, full.audio_logits[0, 8 + j], atol=1e-5, rtol=1e-4)


def test_kv_cache_with_left_padding_matches_alone(model):
    cfg = model.config
    a1, t1 = _ids(cfg, 6, 4)
    a2, t2 = _ids(cfg, 9, 5)
    audio = torch.stack([torch.cat([torch.full((3,), cfg.pad_token_id), a1]), a2])
    text = torch.stack([torch.cat([torch.full((3,), cfg.pad_token_id), t1]), t2])
    mask = torch.tensor([[0] * 3 + [1] * 6, [1] * 9])
    nxt = torch.tensor([[7], [9]])
    with torch.no_grad():
        out = model(audio, text_input_ids=text, attention_mask=mask, use_cache=True)
        mask2 = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
        step = model(nxt, text_input_ids=nxt, attention_mask=mask2, past_key_values=out.past_key_values, use_cache=True)
        alone = model(torch.cat([a1, nxt[0]])[None], text_input_ids=torch.cat([t1, nxt[0]])[None])
    torch.testing.assert_close(step.text_logits[0, -1], alone.text_logits[0, -1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(step.audio_logits[0, -1], alone.audio_logits[0, -1], atol=1e-5, rtol=1e-4)


def test_continuous_fusion_sqrt2_rule(model):
    cfg = model.config
    a, t = _ids(cfg, 6, 6)
    cont = torch.tensor([False, True, True, False, False, False])
    feats = torch.randn(6, cfg.kimia_adaptor_input_dim) * cont[:, None]
    with torch.no_grad():
        emb = model.embed(a[None], t[None], cont[None], feats[None])[0]
        base = model.model.embed_tokens(a)
        adapted = model.model.vq_adaptor(feats)
        expected = torch.where(cont[:, None], (base + adapted) * math.sqrt(2), base) + model.model.embed_tokens(t)
    torch.testing.assert_close(emb, expected)
    with pytest.raises(ValueError, match="continuous_features"):
        model.embed(a[None], t[None], cont[None], None)


def test_head_row_selection_equals_full_logits(model):
    cfg = model.config
    a, t = _ids(cfg, 8, 7)
    rows = torch.tensor([[True, False, True, False, False, False, True, False]])
    with torch.no_grad():
        full = model(a[None], text_input_ids=t[None])
        sel = model(a[None], text_input_ids=t[None], text_logits_mask=rows, audio_logits_mask=rows)
    torch.testing.assert_close(sel.text_logits, full.text_logits[rows])
    torch.testing.assert_close(sel.audio_logits, full.audio_logits[rows])


def test_gradient_checkpointing_recomputes_both_stacks(tiny_dir):
    from kimi_lora_cli.loading import load_model

    m = load_model(tiny_dir, dtype="float32", load_whisper=False, load_tokenizer_=False).model
    cfg = m.config
    a, t = _ids(cfg, 10, 8)
    calls = {"main": 0, "mimo": 0}
    for layer in m.model.layers:
        layer.register_forward_pre_hook(lambda *_: calls.__setitem__("main", calls["main"] + 1))
    for layer in m.model.mimo_layers:
        layer.register_forward_pre_hook(lambda *_: calls.__setitem__("mimo", calls["mimo"] + 1))

    def grads():
        m.zero_grad()
        out = m(a[None], text_input_ids=t[None])
        (out.text_logits.logsumexp(-1).mean() + out.audio_logits.logsumexp(-1).mean()).backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    m.train()
    plain = grads()
    assert calls == {"main": cfg.num_hidden_layers, "mimo": cfg.kimia_mimo_layers}
    calls.update(main=0, mimo=0)
    m.gradient_checkpointing_enable()
    ckpt = grads()
    # every layer of both stacks ran again during backward
    assert calls == {"main": 2 * cfg.num_hidden_layers, "mimo": 2 * cfg.kimia_mimo_layers}
    assert plain.keys() == ckpt.keys()
    for k in plain:
        torch.testing.assert_close(plain[k], ckpt[k], atol=1e-6, rtol=1e-5)


def test_meta_build_reads_nothing():
    from kimi_lora_cli.models.kimi_audio.configuration import KimiAudioConfig

    with torch.device("meta"):
        m = KimiAudioForCausalLM(KimiAudioConfig())  # the full-size release shape
    n = sum(p.numel() for p in m.parameters())
    assert n == 9_766_334_464  # reference: total_size / 2 bytes minus the 34 inv_freq tensors
    names = set(m.state_dict())
    assert len(names) == 453 - 34


def test_attention_mask_must_cover_cache_and_new_tokens(model):
    cfg = model.config
    a, t = _ids(cfg, 6, 9)
    with torch.no_grad():
        cache = model(a[None, :5], text_input_ids=t[None, :5], use_cache=True).past_key_values
        with pytest.raises(ValueError, match="expected 6 \\(cached \\+ new\\)"):
            model(a[None, 5:], text_input_ids=t[None, 5:], attention_mask=torch.ones(1, 1), past_key_values=cache,
                  use_cache=True)


def test_adaptor_layer_norm_uses_the_config_epsilon(tiny_dir):
    """The official adaptor LayerNorm takes config.rms_norm_eps (not a fixed 1e-6)."""
    import dataclasses

    from kimi_lora_cli.loading import load_model

    cfg = dataclasses.replace(load_model(tiny_dir, weights=False, load_whisper=False).config, rms_norm_eps=0.5)
    torch.manual_seed(0)
    model = KimiAudioForCausalLM(cfg)
    ln = model.model.vq_adaptor.layers[4]
    assert ln.eps == 0.5
    x = torch.randn(3, cfg.kimia_adaptor_input_dim)
    with torch.no_grad():
        h = model.model.vq_adaptor.layers[3](torch.nn.functional.silu(model.model.vq_adaptor.layers[0](x)))
        mean, var = h.mean(-1, keepdim=True), h.var(-1, unbiased=False, keepdim=True)
        expected = (h - mean) / torch.sqrt(var + 0.5) * ln.weight + ln.bias
        torch.testing.assert_close(model.model.vq_adaptor(x), expected)


def test_audio_fusion_keeps_the_embedding_dtype_when_the_adaptor_returns_float32(tiny_dir):
    """CUDA autocast runs the adaptor's LayerNorm in float32 next to bf16 embeddings; the fused rows
    go back into the bf16 embedding (this failed with "Index put requires the source and destination
    dtypes match" on a GPU)."""
    from kimi_lora_cli.loading import load_model

    model = load_model(tiny_dir, dtype="bfloat16", load_whisper=False).model.eval()
    norm = model.model.vq_adaptor.layers[4]

    class Float32Norm(torch.nn.Module):  # what autocast does to layer_norm on CUDA
        def forward(self, x):
            return torch.nn.functional.layer_norm(x.float(), norm.normalized_shape, norm.weight.float(),
                                                  norm.bias.float(), norm.eps)

    model.model.vq_adaptor.layers[4] = Float32Norm()
    cfg = model.config
    a, t = _ids(cfg, 6, 3)
    cont = torch.tensor([False, True, True, False, False, False])
    feats = torch.randn(6, cfg.kimia_adaptor_input_dim) * cont[:, None]
    with torch.no_grad():
        emb = model.embed(a[None], t[None], cont[None], feats[None])[0]
        rows = model.model.vq_adaptor(feats[1:3].bfloat16())
        fused = ((model.model.embed_tokens(a[1:3]) + rows) * math.sqrt(2)).bfloat16() + model.model.embed_tokens(t[1:3])
    assert emb.dtype == torch.bfloat16 and torch.equal(emb[1:3], fused)
