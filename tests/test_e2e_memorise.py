"""train -> infer: an adapter trained on a few tiny samples reproduces their transcripts."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def memorised(tmp_path_factory, tiny_dir):
    from kimi_lora_cli.data.synthetic import write_synthetic_dataset
    from kimi_lora_cli.training.config import TrainConfig
    from kimi_lora_cli.training.trainer import train

    work = tmp_path_factory.mktemp("memorise")
    data = write_synthetic_dataset(work / "data", json.loads((tiny_dir / "config.json").read_text()), n=6, seed=3)
    cfg = TrainConfig(data_path=str(data), model_name_or_path=str(tiny_dir), output_dir=str(work / "adapter"),
                      use_lora=True, lora_rank=32, lora_alpha=64, lora_dropout=0.0, lora_target="all,lm_head",
                      learning_rate=1e-2, max_steps=120, per_device_train_batch_size=6, logging_steps=10,
                      save_steps=10_000, seed=0, device="cpu")
    train(cfg)
    return data, work / "adapter"


def test_adapter_reproduces_training_answers(memorised, tiny_dir):
    from kimi_lora_cli.inference.runner import InferSpec, run_inference

    data, adapter = memorised
    report = run_inference(InferSpec(model=tiny_dir, adapters=(("tuned", adapter),), compare_base=True,
                                     data=data, max_new_tokens=24, batch_size=6))
    tuned, base = report.summaries["tuned"].counts, report.summaries["base"].counts
    assert tuned.wer == 0.0, f"adapter WER {tuned.wer}"
    assert base.wer > 0.8, f"base WER {base.wer} should be high on random weights"
    metrics = [json.loads(x) for x in (adapter / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["loss"] < 0.05 * metrics[0]["loss"]
