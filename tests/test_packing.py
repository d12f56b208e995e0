"""Sample packing: packed rows give every sample the logits, loss and gradients it has alone."""

from __future__ import annotations

import json

import pytest
import soundfile as sf
import torch

from kimi_lora_cli.data.audio import load_audio
from kimi_lora_cli.data.dataset import KimiDataset
from kimi_lora_cli.data.features import FeatureStore
from kimi_lora_cli.data.samples import load_samples
from kimi_lora_cli.data.synthetic import ASR_INSTRUCTION, WORDS, codes_for_wave, synthetic_clip
from kimi_lora_cli.models.kimi_audio.packing import packed_positions
from kimi_lora_cli.training.loss import compute_loss

# Rows with very different samples side by side, audio in several samples of one row.
ROWS = [[0, 3, 1], [2, 4, 5]]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_varied_dataset(folder, config):
    """Six conversations from 12 to ~70 tokens: long and tiny ASR clips, text-only chats, a spoken
    question answered in text and speech."""
    folder.mkdir(parents=True, exist_ok=True)

    def audio(name, seconds, index, role="user"):
        path = folder / name
        sf.write(str(path), synthetic_clip(index, 0, seconds, seconds), 16000, subtype="PCM_16")
        return {"role": role, "message_type": "audio", "content": name,
                "audio_tokens": codes_for_wave(load_audio(path), config)}

    def text(role, n_words, start=0):
        return {"role": role, "message_type": "text", "content": " ".join(WORDS[start : start + n_words])}

    asr = {"role": "user", "message_type": "text", "content": ASR_INSTRUCTION}
    rows = [
        {"task_type": "understanding", "conversation": [asr, audio("long.wav", 4.0, 1), text("assistant", 6)]},
        {"task_type": "understanding", "conversation": [text("user", 2), text("assistant", 1, 5)]},
        {"task_type": "understanding", "conversation": [asr, audio("tiny.wav", 0.3, 2), text("assistant", 24, 3)]},
        {"task_type": "speech_conversation", "conversation": [audio("q.wav", 1.5, 3), text("assistant", 3, 9),
                                                              audio("a.wav", 0.8, 4, "assistant")]},
        {"task_type": "understanding", "conversation": [asr, audio("mid.wav", 2.5, 5), text("assistant", 4, 20)]},
        {"task_type": "understanding", "conversation": [text("user", 12, 30), text("assistant", 9, 40)]},
    ]
    path = folder / "varied.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def varied(tmp_path_factory, tiny):
    path = write_varied_dataset(tmp_path_factory.mktemp("varied"), tiny.config)
    data = load_samples(path, tiny.tokenizer, tiny.config)
    ds = KimiDataset(data.samples, tiny.tokenizer.pad, tiny.config.kimia_adaptor_input_dim,
                     FeatureStore(tiny.feature_encoder))
    return path, ds


@pytest.fixture()
def fresh_model(tiny_dir):
    from kimi_lora_cli.loading import load_model

    return load_model(tiny_dir, dtype="float32", load_whisper=False, load_tokenizer_=False).model


def _logits(model, batch):
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], text_input_ids=batch["text_input_ids"],
                    is_continuous_mask=batch["is_continuous_mask"],
                    continuous_features=batch["continuous_features"], attention_mask=batch["attention_mask"],
                    sequence_ids=batch.get("sequence_ids"))
    return out.text_logits, out.audio_logits


def test_positions_restart_at_every_sample():
    ids = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1], [3, 3, 3, 3, 3, 3, 3, 4]])
    assert packed_positions(ids).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 2, 3, 4, 5, 6, 0]]


def test_packed_batch_layout(varied):
    _, ds = varied
    lengths = ds.lengths()
    assert len(set(lengths)) == 6 and max(lengths) > 4 * min(lengths)  # very different lengths
    batch = ds.batch_rows(ROWS)
    row_len = [sum(lengths[i] for i in r) for r in ROWS]
    assert batch["input_ids"].shape[1] == max(row_len)
    assert batch["attention_mask"].sum(1).tolist() == row_len
    for b, row in enumerate(ROWS):
        start = 0
        for k, i in enumerate(row):
            alone = ds.batch([i])
            end = start + lengths[i]
            n = sum(len(r) for r in ROWS[:b]) + k
            assert (batch["sequence_ids"][b, start:end] == n).all()
            for key in ("input_ids", "text_input_ids", "is_continuous_mask", "text_labels", "audio_labels",
                        "text_loss_mask", "audio_loss_mask"):
                assert torch.equal(batch[key][b, start:end], alone[key][0]), key
            if alone["continuous_features"] is not None:
                assert torch.equal(batch["continuous_features"][b, start:end], alone["continuous_features"][0])
            # the last position of a sample predicts nothing: no label links it to the next sample
            assert not batch["text_loss_mask"][b, end - 1] and not batch["audio_loss_mask"][b, end - 1]
            start = end
        assert (batch["sequence_ids"][b, start:] == -1).all()
    assert sum(bool(batch["is_continuous_mask"][0, s : s + lengths[i]].any())
               for s, i in zip([0, lengths[0]], ROWS[0][:2])) == 2  # audio in two samples of row 0


def test_packed_loss_and_gradients_equal_each_sample_alone(varied, fresh_model):
    _, ds = varied
    order = [i for row in ROWS for i in row]
    model = fresh_model.train()
    model.requires_grad_(True)
    alone = [compute_loss(model, ds.batch([i])) for i in order]
    torch.stack([a.total[0] for a in alone]).mean().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    model.gradient_checkpointing_enable()  # the packed rows travel through the recomputed layers too
    packed = compute_loss(model, ds.batch_rows(ROWS))
    packed.total.mean().backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    assert packed.total.shape == (6,)
    torch.testing.assert_close(packed.text, torch.cat([a.text for a in alone]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed.audio, torch.cat([a.audio for a in alone]), atol=1e-5, rtol=1e-5)
    assert (packed.audio > 0).sum() == 1 and (packed.text > 0).all()
    assert packed.tokens == sum(a.tokens for a in alone)
    assert got.keys() == want.keys() and "model.vq_adaptor.layers.0.weight" in got
    assert "model.mimo_layers.0.self_attn.q_proj.weight" in got
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-5, msg=name)


def test_no_attention_across_samples_in_either_stack(varied, tiny):
    _, ds = varied
    model = tiny.model.eval()
    lengths = ds.lengths()
    batch = ds.batch_rows(ROWS)
    text, audio = _logits(model, batch)
    # each sample sees exactly what it sees alone: positions restart, nothing leaks in
    for b, row in enumerate(ROWS):
        start = 0
        for i in row:
            t_alone, a_alone = _logits(model, ds.batch([i]))
            end = start + lengths[i]
            torch.testing.assert_close(text[b, start:end], t_alone[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(audio[b, start:end], a_alone[0], atol=1e-5, rtol=1e-5)
            start = end
    # perturb the middle sample of row 0 (tokens and Whisper rows): its neighbours do not move
    a, m = lengths[0], lengths[0] + lengths[3]
    changed = {k: (v.clone() if v is not None else None) for k, v in batch.items()}
    g = torch.Generator().manual_seed(1)
    changed["input_ids"][0, a:m] = torch.randint(0, model.config.vocab_size, (m - a,), generator=g)
    changed["text_input_ids"][0, a:m] = torch.randint(0, model.config.kimia_token_offset, (m - a,), generator=g)
    changed["continuous_features"][0, a:m] += 1.0
    text2, audio2 = _logits(model, changed)
    for logits, logits2 in ((text, text2), (audio, audio2)):  # main stack + lm_head, mimo stack + mimo_output
        torch.testing.assert_close(logits2[0, :a], logits[0, :a], atol=1e-6, rtol=0)
        torch.testing.assert_close(logits2[0, m:], logits[0, m:], atol=1e-6, rtol=0)
        torch.testing.assert_close(logits2[1], logits[1], atol=1e-6, rtol=0)
        assert (logits2[0, a:m] - logits[0, a:m]).abs().max() > 1e-2


@pytest.mark.parametrize("backend", ["flex", "eager", "sdpa"])
def test_other_attention_backends_match_split(varied, tiny, backend):
    """flex_attention runs on CPU for forward passes only (torch has no CPU backward for it); on CUDA
    it is the automatic choice, checked by benchmarks/gpu/train_packing.py."""
    _, ds = varied
    model = tiny.model.eval()
    batch = ds.batch_rows(ROWS)
    assert model.packed_attention == "auto"
    want = _logits(model, batch)
    try:
        model.packed_attention = backend
        got = _logits(model, batch)
    finally:
        model.packed_attention = "auto"
    for g_, w in zip(got, want):
        torch.testing.assert_close(g_, w, atol=1e-5, rtol=1e-5)


def test_packed_rows_take_no_cache(varied, tiny):
    _, ds = varied
    batch = ds.batch_rows(ROWS)
    with pytest.raises(ValueError, match="no KV cache"):
        tiny.model(input_ids=batch["input_ids"], sequence_ids=batch["sequence_ids"], use_cache=True)


def _metrics(out):
    return [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]


def test_train_packing_gives_the_padded_runs_adapter(cli, tiny_dir, varied, tmp_path):
    """When every step holds the same samples, packing changes nothing but the layout: same losses,
    same eval loss, same adapter."""
    from safetensors.torch import load_file

    path, _ = varied
    common = ["--model-name-or-path", tiny_dir, "--data-path", path, "--use-lora", "--lora-dropout", "0",
              "--lora-target", "all,heads", "--learning-rate", "1e-2", "--max-steps", "3", "--logging-steps", "1",
              "--device", "cpu", "--per-device-train-batch-size", "6", "--eval-ratio", "0.3", "--seed", "1",
              "--adam-epsilon", "1e-3"]  # Adam turns 1e-9 noise on a near-zero gradient into a full step
    code, _, stderr = cli("train", *common, "--output-dir", tmp_path / "padded")
    assert code == 0, stderr
    code, stdout, stderr = cli("train", *common, "--packing", "--packing-length", "128", "--output-dir",
                               tmp_path / "packed")
    assert code == 0, stderr
    assert "Trained 3 steps on 4 samples" in stdout
    text = " ".join(stderr.split())
    assert "Packing 4 samples in 2 rows of 128 tokens" in text and "= 6 packed rows per step" in text
    a = load_file(str(tmp_path / "padded" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "packed" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and max(float(a[k].abs().max()) for k in a if "lora_B" in k) > 1e-3  # trained
    for k in a:
        assert torch.allclose(b[k], a[k], atol=1e-5), (k, (a[k] - b[k]).abs().max())
    pad, pack = _metrics(tmp_path / "padded"), _metrics(tmp_path / "packed")
    for key in ("loss", "text_loss", "audio_loss", "grad_norm", "eval_loss", "tokens"):  # real tokens only
        want = [r[key] for r in pad if key in r]
        assert want and [r[key] for r in pack if key in r] == pytest.approx(want, rel=1e-5), key


@pytest.mark.parametrize("args, message", [
    (["--packing-length", "64"], "--packing-length sets the row length of --packing; add --packing"),
    (["--packing", "--group-by-length"], "--packing and --group-by-length both cut padding"),
    (["--packing", "--packing-length", "4"], "--packing-length must be at least 8"),
    (["--packing", "--packing-length", "16"], "longer than --packing-length 16"),
])
def test_bad_packing_options_give_one_line_errors(cli, tiny_dir, varied, tmp_path, args, message):
    path, _ = varied
    code, _, stderr = cli("train", "--model-name-or-path", tiny_dir, "--data-path", path, "--use-lora",
                          "--output-dir", tmp_path / "o", "--device", "cpu", *args)
    assert code == 1
    assert message in " ".join(stderr.split()) and "Traceback" not in stderr
    assert not (tmp_path / "o").exists()


def test_packed_resume_gives_the_same_adapter_as_a_straight_run(tmp_path, tiny_dir, varied):
    """The packing plan is a function of the seed, so a resumed run skips exactly the rows it trained."""
    from safetensors.torch import load_file

    from kimi_lora_cli.training.config import TrainConfig
    from kimi_lora_cli.training.reporting import Reporter
    from kimi_lora_cli.training.trainer import Trainer

    path, _ = varied

    def trainer(out, **extra):
        cfg = TrainConfig.build(flag_values=dict(
            data_path=str(path), model_name_or_path=str(tiny_dir), output_dir=str(out), use_lora=True,
            lora_dropout=0.0, learning_rate=5e-3, max_steps=6, packing=True, packing_length=96,
            per_device_train_batch_size=1, logging_steps=1, device="cpu", seed=3, **extra))
        t = Trainer(cfg, Reporter(enabled=False))
        t.setup()
        return t

    straight = trainer(tmp_path / "straight")
    assert straight.steps_per_epoch < 6  # the run crosses an epoch boundary
    straight.run()
    first = trainer(tmp_path / "resumed", save_steps=2)
    first.stop_after = 4
    assert first.run().global_step == 4
    trainer(tmp_path / "resumed", save_steps=2, resume_from_checkpoint="latest").run()
    a = load_file(str(tmp_path / "straight" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "adapter_model.safetensors"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_pack_the_same_steps_as_one(cli, tiny_dir, varied, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    path, _ = varied
    common = ["--model-name-or-path", str(tiny_dir), "--data-path", str(path), "--use-lora", "--lora-dropout", "0",
              "--learning-rate", "1e-2", "--num-train-epochs", "2", "--logging-steps", "1", "--device", "cpu",
              "--lora-target", "all,heads", "--packing", "--packing-length", "96"]
    code, _, stderr = cli("train", *common, "--per-device-train-batch-size", "2", "--output-dir", tmp_path / "one")
    assert code == 0, stderr
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    two = subprocess.run([sys.executable, "-m", "kimi_lora_cli", "train", *common, "--per-device-train-batch-size",
                          "1", "--num-processes", "2", "--output-dir", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    a = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter_model.safetensors"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-4), (k, (a[k] - b[k]).abs().max())
    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert [r["loss"] for r in one] == pytest.approx([r["loss"] for r in two], abs=1e-4)
    assert [r["tokens"] for r in one] == [r["tokens"] for r in two]
    assert len(one) >= 4  # two epochs of at least two steps


def test_packed_micro_batches_have_the_packing_length(varied):
    from kimi_lora_cli.training.plan import PackedMicro

    _, ds = varied
    batch = ds.batch(PackedMicro(ROWS, length=300))
    assert batch["input_ids"].shape == (2, 300) and (batch["sequence_ids"][:, -1] == -1).all()
    tight = ds.batch_rows(ROWS)
    longest = max(sum(ds.lengths()[i] for i in row) for row in ROWS)
    assert longest < 300 and tight["input_ids"].shape == (2, longest)
    assert torch.equal(batch["input_ids"][:, :longest], tight["input_ids"])
