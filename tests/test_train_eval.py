"""Evaluation during training: eval_wer by decoding, best checkpoint, early stopping, trackers, model card."""

from __future__ import annotations

import json

import pytest
import torch
from _infer_data import write_asr_data
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def asr(tiny, tmp_path_factory):
    return write_asr_data(tmp_path_factory.mktemp("eval") / "asr", tiny.config, n=8)


def _train(tiny_dir, asr, out, **over):
    from kimi_lora_cli.training.config import TrainConfig
    from kimi_lora_cli.training.reporting import Reporter
    from kimi_lora_cli.training.trainer import train

    values = {"model_name_or_path": str(tiny_dir), "data_path": str(asr), "eval_data_path": str(asr),
              "output_dir": str(out), "use_lora": True, "lora_rank": 32, "lora_alpha": 64, "lora_dropout": 0.0,
              "lora_target": "all,lm_head", "lr_scheduler_type": "constant", "per_device_train_batch_size": 8,
              "eval_steps": 4, "save_steps": 1000, "eval_generate": "all", "eval_max_new_tokens": 12,
              "logging_steps": 4, "device": "cpu", "seed": 0, **over}
    return train(TrainConfig.build(values), Reporter(enabled=False))


def _evals(out, key):
    state = json.loads((out / "trainer_state.json").read_text())
    return state, [(h["step"], h[key]) for h in state["log_history"] if key in h]


@pytest.fixture()
def scripted_wer(monkeypatch):
    """Evaluations whose WERs are fixed by construction (training, eval loss, saves and restores stay real).

    Where a real run's WER lands depends on the CPU's rounding, so the best checkpoint and early stopping
    are tested against a script: the decode step of the real Evaluator returns the next scripted value."""
    from kimi_lora_cli.training.evaluation import Evaluator

    script: list[float] = []

    def decode(self, unwrapped):
        wer = script.pop(0)
        return {"eval_wer": wer, "eval_cer": wer / 2, "eval_generated": 8}

    monkeypatch.setattr(Evaluator, "_decode", decode)
    return script


def test_best_checkpoint_by_wer_is_restored_and_kept(tiny_dir, asr, tmp_path, scripted_wer):
    out = tmp_path / "best"
    # steps 4..40; the lowest WER first at step 12, tied (not beaten) at step 28, the last one worse
    scripted_wer.extend([0.9, 0.8, 0.5, 0.6, 0.7, 0.55, 0.5, 0.6, 0.65, 0.7])
    result = _train(tiny_dir, asr, out, learning_rate=1e-2, max_steps=40, metric_for_best_model="eval_wer",
                    load_best_model_at_end=True, save_total_limit=1)
    assert scripted_wer == []  # one evaluation every 4 steps, and none at the end (step 40 was evaluated)
    state, wers = _evals(out, "eval_wer")
    assert wers == [(4, 0.9), (8, 0.8), (12, 0.5), (16, 0.6), (20, 0.7), (24, 0.55), (28, 0.5), (32, 0.6),
                    (36, 0.65), (40, 0.7)]
    assert (state["best_global_step"], state["best_metric"]) == (12, 0.5)
    assert state["best_model_checkpoint"] == str(out / "checkpoint-12")
    assert result.best_checkpoint == state["best_model_checkpoint"]
    # save_total_limit 1 keeps the newest and, besides it, the best
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-40"]
    final = load_file(str(out / "adapter_model.safetensors"))
    best = load_file(str(out / "checkpoint-12" / "adapter_model.safetensors"))
    last = load_file(str(out / "checkpoint-40" / "adapter_model.safetensors"))
    assert final.keys() == best.keys()
    assert all(torch.equal(final[k], best[k]) for k in final)
    assert not all(torch.equal(final[k], last[k]) for k in final)  # 28 steps of lr 1e-2 later
    # the card reports both and says which one the folder holds
    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model: ") and "library_name: peft" in card
    assert "Best `eval_wer` at step 12; this folder holds that checkpoint." in card
    assert "![loss curve](loss_curve.png)" in card or not (out / "loss_curve.png").exists()


def test_early_stopping_stops_after_patience_evaluations(tiny_dir, asr, tmp_path, scripted_wer):
    out = tmp_path / "early"
    # best 0.8 at step 8; 0.85 misses, 0.8 only ties (no improvement): two misses in a row stop at step 16
    scripted_wer.extend([0.9, 0.8, 0.85, 0.8, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
    result = _train(tiny_dir, asr, out, learning_rate=3e-2, max_steps=40, metric_for_best_model="eval_wer",
                    early_stopping_patience=2)
    _, wers = _evals(out, "eval_wer")
    assert wers == [(4, 0.9), (8, 0.8), (12, 0.85), (16, 0.8)]
    assert result.stopped_early and result.global_step == 16
    state = json.loads((out / "trainer_state.json").read_text())
    assert (state["best_global_step"], state["best_metric"]) == (8, 0.8)


def test_early_stopping_threshold_counts_small_gains_as_misses(tiny_dir, asr, tmp_path, scripted_wer):
    out = tmp_path / "threshold"
    # gains of 0.01 do not beat a threshold of 0.05 (HF EarlyStoppingCallback): steps 8 and 12 miss
    scripted_wer.extend([0.9, 0.89, 0.88, 0.5, 0.5, 0.5])
    result = _train(tiny_dir, asr, out, learning_rate=1e-3, max_steps=24, metric_for_best_model="eval_wer",
                    early_stopping_patience=2, early_stopping_threshold=0.05)
    _, wers = _evals(out, "eval_wer")
    assert wers == [(4, 0.9), (8, 0.89), (12, 0.88)]
    assert result.stopped_early and result.global_step == 12


def test_tensorboard_event_file_holds_the_eval_metrics(tiny_dir, asr, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    _train(tiny_dir, asr, out, learning_rate=1e-2, max_steps=8, report_to="tensorboard", run_name="exp1")
    _, wers = _evals(out, "eval_wer")
    acc = EventAccumulator(str(out / "logs" / "tensorboard" / "exp1"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"eval/wer", "eval/cer", "eval/loss", "train/loss", "train/learning_rate"} <= set(tags)
    logged = [(e.step, e.value) for e in acc.Scalars("eval/wer")]
    assert logged == [(s, pytest.approx(w, abs=1e-6)) for s, w in wers]


def test_report_to_list_all_and_none(cli, tiny_dir, asr, tmp_path):
    import importlib.util

    args = ["train", "--model-name-or-path", tiny_dir, "--data-path", asr, "--use-lora", "--max-steps", "1",
            "--device", "cpu"]
    if importlib.util.find_spec("wandb") is None:
        code, _, err = cli(*args, "-o", tmp_path / "w", "--report-to", "tensorboard,wandb")
        assert code == 1 and "--report-to wandb needs the wandb package: pip install wandb" in err
        assert not (tmp_path / "w").exists()  # refused before anything was loaded or written
    code, _, err = cli(*args, "-o", tmp_path / "bad", "--report-to", "tensorboard,comet")
    assert code == 1 and "--report-to" in err and "comet" in err
    code, _, err = cli(*args, "-o", tmp_path / "all", "--report-to", "all")
    assert code == 0, err
    assert any((tmp_path / "all" / "logs" / "tensorboard").rglob("events.out.tfevents.*"))
    code, _, err = cli(*args, "-o", tmp_path / "none", "--report-to", "none")
    assert code == 0, err
    assert not (tmp_path / "none" / "logs" / "tensorboard").exists()


def test_eval_options_are_checked_before_loading(cli, tiny_dir, asr, tmp_path):
    base = ["train", "--model-name-or-path", tiny_dir, "--data-path", asr, "--use-lora", "-o", tmp_path / "x"]
    cases = [
        (["--metric-for-best-model", "eval_wer", "--eval-ratio", "0.25"], "add --eval-generate"),
        (["--metric-for-best-model", "eval_bleu", "--eval-ratio", "0.25"], "--metric-for-best-model must be one of"),
        (["--load-best-model-at-end"], "needs evaluations"),
        (["--eval-generate", "many", "--eval-ratio", "0.25"], "--eval-generate takes a number"),
        (["--eval-generate", "4"], "--eval-generate decodes evaluation conversations"),
        (["--early-stopping-patience", "0", "--eval-ratio", "0.25"], "--early-stopping-patience must be at least 1"),
    ]
    for extra, words in cases:
        code, _, err = cli(*base, *extra)
        assert code == 1 and words in " ".join(err.split()), (extra, err)
        assert "Traceback" not in err and not (tmp_path / "x").exists()


def test_plain_log_lines_show_elapsed_percent_and_eta(cli, tiny_dir, asr, tmp_path):
    code, _, err = cli("train", "--model-name-or-path", tiny_dir, "--data-path", asr, "--use-lora", "-o",
                       tmp_path / "p", "--max-steps", "4", "--logging-steps", "2", "--device", "cpu")
    assert code == 0, err
    lines = [line for line in err.splitlines() if line.startswith("step ")]
    assert lines[0].startswith("step 2/4 (50.0%)") and lines[1].startswith("step 4/4 (100.0%)")
    assert all(" elapsed 0:00:" in line and " eta 0:00:" in line for line in lines)
    text = " ".join(err.split())
    assert "World size 1 (single process, cpu)" in text
    assert "Batch 1 per device x 1 accumulation x 1 processes = 1 samples per step" in text
    assert "Steps 8 per epoch, 4 in total" in text


def test_a_users_readme_is_never_replaced_by_the_card(cli, tiny_dir, asr, tmp_path):
    out = tmp_path / "card"
    args = ["train", "--model-name-or-path", tiny_dir, "--data-path", asr, "--use-lora", "-o", out, "--max-steps",
            "1", "--device", "cpu"]
    assert cli(*args)[0] == 0
    assert "<!-- model card written by kimi-lora train -->" in (out / "README.md").read_text()
    (out / "README.md").write_text("my notes")
    code, _, err = cli(*args, "--overwrite-output-dir")
    assert code == 0, err
    assert (out / "README.md").read_text() == "my notes"
    assert "is not a kimi-lora model card; left as it is" in " ".join(err.split())
