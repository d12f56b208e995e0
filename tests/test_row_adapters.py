"""Per-row LoRA adapters in one forward (what `serve` does with a batch whose requests pick different
adapters): every row must compute what its own adapter alone computes, a base row what the base computes."""

from __future__ import annotations

import pytest

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def varied_adapters(tiny_dir, tmp_path_factory):
    """Adapters of different ranks, scalings and targets (so the stacked blocks have uneven widths and
    some layers hold only some adapters), and a DoRA one (not stackable)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from kimi_lora_cli.loading import load_model

    kinds = {
        "wide": dict(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"]),
        "narrow": dict(r=2, lora_alpha=3, use_rslora=True, target_modules=["q_proj", "k_proj", "gate_proj"]),
        "mid": dict(r=4, lora_alpha=4, target_modules=["v_proj", "up_proj"]),
        "dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj"]),
        # the audio adaptor's rows are audio positions, not samples; embedding LoRA is not a linear layer
        "adaptor": dict(r=4, lora_alpha=8, target_modules=r".*vq_adaptor\.layers\.0"),
        "embedding": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
    }
    root = tmp_path_factory.mktemp("varied")
    for k, (name, kw) in enumerate(kinds.items()):
        torch.manual_seed(200 + k)
        model = load_model(tiny_dir, dtype="float32", load_whisper=False, load_tokenizer_=False).model
        get_peft_model(model, LoraConfig(init_lora_weights=False, **kw)).save_pretrained(str(root / name))
    return {name: root / name for name in kinds}


def _batch(config, rows: int, width: int = 12):
    import torch

    g = torch.Generator().manual_seed(7)
    text = torch.randint(0, config.kimia_token_offset, (rows, width), generator=g)
    audio = torch.randint(config.kimia_token_offset, config.vocab_size, (rows, width), generator=g)
    mask = torch.ones((rows, width), dtype=torch.long)
    mask[1, :5] = 0  # left padding, as generate batches prompts of different lengths
    mask[3, :2] = 0
    return dict(input_ids=audio, text_input_ids=text, attention_mask=mask)


def test_each_row_computes_its_own_adapter_and_base_rows_the_base(tiny_dir, varied_adapters):
    import torch

    from kimi_lora_cli.adapter_names import BASE
    from kimi_lora_cli.loading import load_model
    from kimi_lora_cli.serving.row_adapters import StackedRows, stackable

    names = ["wide", "narrow", "mid"]
    loaded = load_model(tiny_dir, dtype="float32", load_whisper=False,
                        adapters=[(n, varied_adapters[n]) for n in names])
    model = loaded.model.eval()
    net = model.get_base_model()
    row_adapters = ["mid", BASE, "wide", "narrow", "wide", BASE]
    batch = _batch(loaded.config, len(row_adapters))

    hooks_before = sum(len(m._forward_hooks) for m in model.modules())
    with torch.no_grad():
        alone = {}
        with model.disable_adapter():
            alone[BASE] = net(**batch)
        for n in names:
            model.set_adapter(n)
            alone[n] = net(**batch)
        assert stackable(model, set(names))
        router = StackedRows(model, row_adapters)
        try:
            with model.disable_adapter():
                router.route(list(range(len(row_adapters))))
                mixed = net(**batch)
                router.route([0, 2, 3])  # rows leave the batch as their answers finish
                sub = {k: v[[0, 2, 3]] for k, v in batch.items()}
                fewer = net(**sub)
        finally:
            router.close()
        model.set_adapter("wide")
        after = net(**batch)  # the hooks are gone: the model is peft's again

    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks_before
    assert torch.equal(after.text_logits, alone["wide"].text_logits)
    for i, name in enumerate(row_adapters):
        for stream in ("text_logits", "audio_logits"):
            got, want = getattr(mixed, stream)[i], getattr(alone[name], stream)[i]
            if name == BASE:
                assert torch.equal(got, want), (i, stream)  # a base row gets exactly zero from the adapters
            else:
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"row {i} ({name}) {stream}")
            # and the adapters really differ here, so a row given the wrong one would be caught
            others = [n for n in (BASE, *names) if n != name]
            assert all((getattr(alone[o], stream)[i] - want).abs().max() > 1e-3 for o in others), (i, stream)
    for k, i in enumerate([0, 2, 3]):
        torch.testing.assert_close(fewer.text_logits[k], alone[row_adapters[i]].text_logits[i], rtol=1e-5, atol=1e-5)


def test_a_batch_with_a_dora_adapter_is_decoded_one_adapter_at_a_time(tiny_dir, varied_adapters):
    """peft has no per-row DoRA (it raises on `adapter_names`): the engine then splits the batch by adapter,
    and every answer equals the one its job gets decoded alone."""
    from serve_helpers import Recorder

    from kimi_lora_cli.adapter_names import BASE
    from kimi_lora_cli.serving.engine import Engine, Job
    from kimi_lora_cli.serving.row_adapters import stackable
    from kimi_lora_cli.serving.spec import ServeSpec

    engine = Engine(ServeSpec(model=tiny_dir, adapters=tuple((n, varied_adapters[n]) for n in (
        "wide", "dora", "adaptor", "embedding")), max_new_tokens=6))
    assert stackable(engine.model, {"wide"}) and stackable(engine.model, set())
    for other in ("dora", "adaptor", "embedding"):
        assert not stackable(engine.model, {"wide", other}) and not stackable(engine.model, {other}), other
    picks = ["dora", "wide", BASE, "dora", "wide"]

    def jobs():
        return [Job(messages=[{"role": "user", "message_type": "text", "content": f"hello number {k}"}],
                    adapter=name, max_new_tokens=6) for k, name in enumerate(picks)]

    together, alone = jobs(), jobs()
    sink = Recorder()
    for job in together + alone:
        job.listener = sink
    engine.run_batch(together)
    assert engine.stats["batches"] == 3 and engine.stats["largest_batch"] == 2  # dora x2, wide x2, base
    for job in alone:
        engine.run_batch([job])
    got = [sink.results[id(j)] for j in together]
    want = [sink.results[id(j)] for j in alone]
    assert all(not isinstance(r, Exception) for r in got + want)
    assert [r.text_tokens for r in got] == [r.text_tokens for r in want]
    engine.stop()
