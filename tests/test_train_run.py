"""Training on the tiny checkpoint: the loss falls, the adapter changes outputs and loads with plain
peft, a resumed run equals a straight one, full fine-tuning writes a loadable model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kimi_lora_cli.training.config import TrainConfig
from kimi_lora_cli.training.reporting import Reporter
from kimi_lora_cli.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(train_data):
    """Text and spoken answers (both heads get a loss)."""
    return train_data(n=6, seed=0, task="mixed")


def make_trainer(tiny_dir, data, out, **overrides):
    values = dict(data_path=str(data), model_name_or_path=str(tiny_dir), output_dir=str(out), use_lora=True,
                  lora_dropout=0.0, learning_rate=1e-2, per_device_train_batch_size=3, max_steps=6,
                  logging_steps=1, save_steps=1000, device="cpu", seed=7)
    values.update(overrides)
    trainer = Trainer(TrainConfig.build(flag_values=values), Reporter(enabled=False))
    trainer.setup()
    return trainer


def text_predictions(model, batch):
    """Greedy text token at every position that has a text label."""
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], text_input_ids=batch["text_input_ids"],
                    is_continuous_mask=batch["is_continuous_mask"],
                    continuous_features=batch["continuous_features"], attention_mask=batch["attention_mask"],
                    text_logits_mask=batch["text_loss_mask"])
    return out.text_logits.argmax(-1)


@pytest.fixture(scope="module")
def learned(tmp_path_factory, tiny_dir, data):
    out = tmp_path_factory.mktemp("learned")
    trainer = make_trainer(tiny_dir, data, out, lora_target="all,heads", max_steps=24,
                           lr_scheduler_type="constant")
    result = trainer.run()
    batch = trainer.dataset.batch(list(range(len(trainer.dataset))))
    return out, result, batch


def test_loss_falls_well_below_its_start(learned):
    out, result, _ = learned
    assert not result.interrupted and result.global_step == 24
    records = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 25))
    assert {"step", "epoch", "loss", "text_loss", "audio_loss", "learning_rate", "tokens"} <= set(records[0])
    first, last = records[0]["loss"], records[-1]["loss"]
    assert last < 0.4 * first, (first, last)
    assert records[-1]["text_loss"] < 0.4 * records[0]["text_loss"]
    assert records[-1]["audio_loss"] < 0.6 * records[0]["audio_loss"]
    assert records[-1]["tokens"] > records[0]["tokens"] > 0


def test_adapter_loads_with_plain_peft_and_changes_greedy_outputs(learned, tiny_dir):
    from peft import PeftModel

    from kimi_lora_cli.loading import load_model
    from kimi_lora_cli.models.kimi_audio.modeling import KimiAudioForCausalLM

    out, _, batch = learned
    files = {p.name for p in out.iterdir() if p.is_file()} - {"loss_curve.png"}  # the PNG needs matplotlib
    # the marker says kimi-lora train wrote the folder; the run's lock is gone
    assert sorted(files) == [".kimi-lora.json", "README.md", "adapter_config.json", "adapter_model.safetensors",
                             "train_config.yaml", "trainer_state.json"]
    base = load_model(tiny_dir, dtype="float32", load_whisper=False, load_tokenizer_=False).model.eval()
    assert isinstance(base, KimiAudioForCausalLM)
    labels = batch["text_labels"][batch["text_loss_mask"]]
    before = text_predictions(base, batch)
    peft_model = PeftModel.from_pretrained(base, str(out)).eval()
    after = text_predictions(peft_model, batch)
    assert not torch.equal(before, after)
    assert (after == labels).float().mean() > (before == labels).float().mean() + 0.3
    # the loaded weights are the saved ones, none left at their initial zeros
    saved = load_file(str(out / "adapter_model.safetensors"))
    loaded = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
    assert len(saved) == len(loaded) > 0
    for k, v in saved.items():
        key = k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
        assert torch.equal(loaded[key], v)
        if "lora_B" in k:
            assert v.abs().sum() > 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["base_model_name_or_path"] == str(tiny_dir)
    wrapped = {k.split(".lora_")[0] for k in saved}
    assert "base_model.model.lm_head" in wrapped and "base_model.model.model.layers.0.self_attn.q_proj" in wrapped
    assert not any("embed_tokens" in k or "whisper" in k for k in wrapped)


def test_resume_gives_the_same_adapter_as_a_straight_run(tmp_path, tiny_dir, data):
    common = dict(max_steps=6, per_device_train_batch_size=2, lora_dropout=0.1, learning_rate=5e-3,
                  warmup_steps=2, lr_scheduler_type="cosine", save_total_limit=1)
    straight = make_trainer(tiny_dir, data, tmp_path / "straight", **common).run()
    assert straight.global_step == 6

    first = make_trainer(tiny_dir, data, tmp_path / "resumed", save_steps=2, **common)
    first.stop_after = 4  # as if Ctrl-C came during step 4
    part = first.run()
    assert part.interrupted and part.global_step == 4
    assert part.checkpoint == tmp_path / "resumed" / "checkpoint-4"
    assert not (tmp_path / "resumed" / "adapter_model.safetensors").exists()  # not finished: no final adapter
    assert not (tmp_path / "resumed" / "checkpoint-2").exists()  # save_total_limit 1
    assert not list((tmp_path / "resumed").glob(".tmp-*"))
    state = json.loads((part.checkpoint / "trainer_state.json").read_text())
    assert state["global_step"] == 4

    rest = make_trainer(tiny_dir, data, tmp_path / "resumed", resume_from_checkpoint="latest", save_steps=2,
                        **common).run()
    assert rest.global_step == 6 and not rest.interrupted
    a = load_file(str(tmp_path / "straight" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_full_fine_tuning_writes_a_loadable_release_layout(tmp_path, tiny_dir, data):
    from kimi_lora_cli.loading import load_model

    out = tmp_path / "full"
    result = make_trainer(tiny_dir, data, out, use_lora=False, lora_dropout=0.05, max_steps=2,
                          learning_rate=1e-3).run()
    names = {p.name for p in result.saved}
    assert {"config.json", "model.safetensors.index.json", "tiktoken.model", "model-1-of-1.safetensors"} <= names
    trained = load_model(out, dtype="float32")
    base = load_model(tiny_dir, dtype="float32", load_whisper=False)
    sd_t, sd_b = trained.model.state_dict(), base.model.state_dict()
    assert sd_t.keys() == sd_b.keys()
    changed = [k for k in sd_b if not torch.equal(sd_t[k], sd_b[k])]
    assert "lm_head.weight" in changed and "model.layers.0.self_attn.q_proj.weight" in changed
    assert trained.feature_encoder is not None and trained.tokenizer is not None


@pytest.mark.slow
def test_ctrl_c_stops_at_a_step_saves_and_exits_130(tmp_path, tiny_dir, data):
    out = tmp_path / "sigint"
    cmd = [sys.executable, "-m", "kimi_lora_cli", "train", "--model-name-or-path", str(tiny_dir), "--data-path",
           str(data), "--output-dir", str(out), "--use-lora", "--max-steps", "100000", "--logging-steps", "1",
           "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    for line in proc.stderr:
        if line.startswith("step 3/"):
            proc.send_signal(signal.SIGINT)
            break
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130
    found = sorted(out.glob("checkpoint-*"))
    assert len(found) == 1 and (found[0] / "trainer_state.json").is_file()
    assert (found[0] / "adapter_model.safetensors").is_file()
    assert not (out / "adapter_model.safetensors").exists()
