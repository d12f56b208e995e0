"""`kimi-lora train` as a user runs it: the guide's command line, YAML + flags, readable errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from kimi_lora_cli.cli.train import normalise_args

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_guide_spellings_are_normalised():
    args = ["--model_name_or_path", "m", "--bf16", "True", "--use_lora", "--gradient_checkpointing", "false",
            "--lora_target_modules", "q_proj", "k_proj", "v_proj", "o_proj", "--lora_r", "8",
            "--lazy_preprocess=True", "--data_path=x.jsonl"]
    assert normalise_args(args) == [
        "--model-name-or-path", "m", "--bf16", "--use-lora", "--no-gradient-checkpointing",
        "--lora-target-modules", "q_proj,k_proj,v_proj,o_proj", "--lora-r", "8", "--lazy-preprocess",
        "--data-path=x.jsonl"]


def test_the_guides_command_trains_an_adapter(cli, tiny_dir, data, tmp_path):
    out = tmp_path / "out"
    code, stdout, stderr = cli(
        "train", "--model_name_or_path", tiny_dir, "--data_path", data, "--output_dir", out, "--eval_ratio", "0.25",
        "--bf16", "False", "--num_train_epochs", "2", "--per_device_train_batch_size", "1",
        "--gradient_accumulation_steps", "2", "--save_steps", "2", "--save_total_limit", "10",
        "--learning_rate", "1e-3", "--weight_decay", "0.1", "--adam_beta2", "0.95", "--warmup_ratio", "0.01",
        "--lr_scheduler_type", "cosine", "--logging_steps", "1", "--report_to", "none", "--model_max_length", "512",
        "--gradient_checkpointing", "True", "--lazy_preprocess", "True", "--use_lora", "--lora_r", "4",
        "--lora_alpha", "8", "--lora_dropout", "0.05", "--lora_target_modules", "q_proj", "k_proj", "v_proj",
        "o_proj", "--device", "cpu")
    assert code == 0, stderr
    assert "Saved the adapter to" in stdout and "Trained 4 steps on 3 samples" in stdout
    assert "Component" in stderr and "Trainable" in stderr and "step 4/4" in stderr
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert {k.split(".")[-3] for k in saved} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    resolved = yaml.safe_load((out / "train_config.yaml").read_text())
    assert resolved["gradient_checkpointing"] is True and resolved["lora_target"] == "q_proj,k_proj,v_proj,o_proj"
    assert resolved["adam_beta2"] == 0.95 and resolved["model_max_length"] == 512
    records = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert [r["step"] for r in evals] == [2, 4] and "eval_text_loss" in evals[0]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


def test_yaml_config_with_flags_overriding(cli, tiny_dir, data, tmp_path):
    out = tmp_path / "out"
    conf = tmp_path / "train.yaml"
    conf.write_text(yaml.safe_dump({"model-name-or-path": str(tiny_dir), "data_path": str(data), "output_dir": str(out),
                                    "use_lora": True, "lora_rank": 16, "lora-target": "mimo", "max_steps": 1,
                                    "device": "cpu", "use_rslora": True}))
    code, _, stderr = cli("train", "--config", conf, "--lora-rank", "2")
    assert code == 0, stderr
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and cfg["use_rslora"] is True
    assert yaml.safe_load((out / "train_config.yaml").read_text())["lora_rank"] == 2
    assert all("mimo_layers" in k for k in load_file(str(out / "adapter_model.safetensors")))
    # the written config repeats the run
    code, _, stderr = cli("train", "--config", out / "train_config.yaml", "--output-dir", tmp_path / "again")
    assert code == 0, stderr
    a = load_file(str(out / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("args, message", [
    (["--lora-rank", "4"], "--lora-rank is a LoRA option but --use-lora is not set"),
    (["--use-lora", "--lora-target", "nothing_here"], "target 'nothing_here' matches no linear layer"),
    (["--use-lora", "--too-long", "maybe"], "--too-long must be error, skip or truncate"),
    (["--use-lora", "--resume-from-checkpoint", "latest"], "does not exist; pass the --output-dir of the run to resume"),
])
def test_bad_options_give_one_line_errors(train_args, cli, tiny_dir, data, tmp_path, args, message):
    code, _, stderr = cli(*train_args(data, tmp_path / "o", *args, lora=False))
    assert code == 1
    assert message in stderr and "Traceback" not in stderr
    assert not (tmp_path / "o" / "adapter_model.safetensors").exists()


def test_unknown_yaml_key_is_named_with_a_suggestion(cli, tmp_path):
    conf = tmp_path / "c.yaml"
    conf.write_text("lora_rnak: 4\n")
    code, _, stderr = cli("train", "--config", conf)
    assert code == 1 and "unknown setting 'lora_rnak'; did you mean lora_rank" in stderr


def test_bad_data_is_reported_line_by_line_before_training(train_args, cli, tiny_dir, data, tmp_path):
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    for r in rows:  # make the relative paths valid from the new folder
        for m in r["conversation"]:
            if m["message_type"] == "audio":
                m["content"] = str(data.parent / m["content"])
    rows[1]["conversation"][1]["audio_tokens"] = rows[1]["conversation"][1]["audio_tokens"][:-2]
    rows[2]["conversation"][1]["content"] = "gone.wav"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[1]) + "\n{oops\n" + json.dumps(rows[2]) + "\n")
    out = tmp_path / "o"
    code, _, stderr = cli(*train_args(bad, out))
    assert code == 1
    text = " ".join(stderr.split())  # rich wraps long lines
    assert "3 problems in the training data" in text
    assert "bad.jsonl:2: message 1:" in text and "audio_tokens but" in text
    assert "bad.jsonl:3: invalid JSON" in text
    assert "bad.jsonl:4: message 1: audio file 'gone.wav' not found" in text
    assert "Traceback" not in stderr and not out.exists()


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_give_the_same_adapter_as_one(tiny_dir, data, tmp_path):
    common = ["--model-name-or-path", str(tiny_dir), "--data-path", str(data), "--use-lora", "--lora-dropout", "0",
              "--learning-rate", "1e-2", "--num-train-epochs", "2", "--logging-steps", "1", "--device", "cpu",
              "--lora-target", "all,heads", "--eval-data-path", str(data), "--eval-generate", "all"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    one = subprocess.run([sys.executable, "-m", "kimi_lora_cli", "train", *common, "--output-dir", str(tmp_path / "one"),
                          "--per-device-train-batch-size", "2", "--gradient-accumulation-steps", "2"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "kimi_lora_cli", "train", *common, "--output-dir", str(tmp_path / "two"),
                          "--per-device-train-batch-size", "2", "--num-processes", "2"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    assert two.stderr.count("Component") == 1  # only rank 0 prints
    banner = " ".join(two.stderr.split())
    assert "World size 2 (DDP, cpu" in banner
    assert "Batch 2 per device x 1 accumulation x 2 processes = 4 samples per step" in banner
    assert "Steps 1 per epoch, 2 in total" in banner and "Evaluation 4 samples, 4 decoded for WER/CER" in banner
    a = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-4), (k, (a[k] - b[k]).abs().max())
    ra = [json.loads(x) for x in (tmp_path / "one" / "logs" / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (tmp_path / "two" / "logs" / "metrics.jsonl").read_text().splitlines()]
    la, lb = [r["loss"] for r in ra if "loss" in r], [r["loss"] for r in rb if "loss" in r]
    assert la == pytest.approx(lb, abs=1e-4) and len(la) == 2
    # each rank decodes its share of the eval set; the reduced scores equal one process's
    ea, eb = [r for r in ra if "eval_wer" in r], [r for r in rb if "eval_wer" in r]
    assert len(ea) == len(eb) == 1 and ea[0]["eval_generated"] == eb[0]["eval_generated"] == 4
    for key in ("eval_wer", "eval_cer", "eval_loss"):
        assert ea[0][key] == pytest.approx(eb[0][key], abs=1e-4), key


@pytest.mark.parametrize("extra, expect", [
    (["--use-dora"], "lora_magnitude_vector"),
    (["--use-lora", "--train-embeddings", "--modules-to-save", "lm_head", "--lora-target", "mimo:0"],
     "embed_tokens"),
])
def test_adapter_variants_load_with_plain_peft(train_args, cli, tiny_dir, data, tmp_path, extra, expect):
    from peft import PeftModel

    from kimi_lora_cli.loading import load_model

    out = tmp_path / "v"
    code, _, stderr = cli(*train_args(data, out, "--max-steps", "1", *extra, lora=False))
    assert code == 0, stderr
    saved = load_file(str(out / "adapter_model.safetensors"))
    assert any(expect in k for k in saved)
    base = load_model(tiny_dir, load_whisper=False, load_tokenizer_=False).model
    loaded = PeftModel.from_pretrained(base, str(out))
    state = loaded.state_dict()
    assert any(expect in k for k in state)


def test_full_fine_tuning_from_the_command_line(train_args, cli, tiny_dir, data, tmp_path):
    out = tmp_path / "full"
    code, stdout, stderr = cli(*train_args(data, out, "--max-steps", "1", lora=False))
    assert code == 0, stderr
    assert "Full fine-tuning (Whisper frozen)" in stderr and "Saved the model to" in stdout
    assert (out / "config.json").is_file() and (out / "whisper-large-v3" / "model.safetensors").is_file()
    assert not (out / "adapter_config.json").exists()
    code, stdout, _ = cli("list-modules", out)
    assert code == 0


def test_rich_progress_bar_on_a_terminal(tiny_dir, data, tmp_path):
    import importlib.util
    import io

    from rich.console import Console

    from kimi_lora_cli.training.config import TrainConfig
    from kimi_lora_cli.training.reporting import Reporter
    from kimi_lora_cli.training.trainer import train

    buf = io.StringIO()
    reporter = Reporter(console=Console(file=buf, force_terminal=True, width=160), rich_progress=True)
    cfg = TrainConfig.build(flag_values=dict(data_path=str(data), model_name_or_path=str(tiny_dir), use_lora=True,
                                             output_dir=str(tmp_path / "o"), max_steps=3, logging_steps=1,
                                             device="cpu"))
    result = train(cfg, reporter)
    text = buf.getvalue()
    assert "3/3" in text and "tok/s" in text and "loss" in text and "step 1/3" not in text
    has_mpl = importlib.util.find_spec("matplotlib") is not None
    assert (result.plot == tmp_path / "o" / "loss_curve.png") if has_mpl else result.plot is None


def test_loss_curve_png(tmp_path):
    pytest.importorskip("matplotlib")
    from kimi_lora_cli.training.reporting import plot_losses

    records = [{"step": i, "loss": 5 - i / 10, "text_loss": 3.0, "audio_loss": 2 - i / 10} for i in range(1, 11)]
    records.append({"step": 10, "eval_loss": 4.2})
    path = plot_losses(records, tmp_path / "curve.png")
    assert path == tmp_path / "curve.png" and path.read_bytes()[:4] == b"\x89PNG"


def test_model_path_for_weights_and_release_folder_for_the_rest(cli, tiny_dir, data, tmp_path):
    from kimi_lora_cli.models.kimi_audio.tiny import build_tiny_checkpoint

    weights = build_tiny_checkpoint(tmp_path / "finetuned", layout="finetune")  # no tokenizer, no whisper folder
    code, _, stderr = cli("train", "--model-path", weights, "--data-path", data, "--output-dir", tmp_path / "a",
                          "--use-lora", "--max-steps", "1", "--device", "cpu")
    assert code == 1 and "tiktoken.model" in stderr and "--model-name-or-path" in stderr
    code, _, stderr = cli("train", "--model_path", weights, "--model_name_or_path", tiny_dir, "--data_path", data,
                          "--output_dir", tmp_path / "b", "--use_lora", "--max_steps", "1", "--device", "cpu")
    assert code == 0, stderr
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(weights)


def test_speech_tokenizer_trains_on_audio_without_tokens(cli, tiny_dir, data, tmp_path, tiny_speech_tokenizer_dir):
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    files = set()
    for r in rows:
        for m in r["conversation"]:
            m.pop("audio_tokens", None)
            if m["message_type"] == "audio":
                m["content"] = str(data.parent / m["content"])
                files.add(m["content"])
    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["train", "--model-name-or-path", tiny_dir, "--data-path", raw, "--use-lora", "--max-steps", "1",
              "--per-device-train-batch-size", "4", "--device", "cpu"]
    code, _, stderr = cli(*common, "--output-dir", tmp_path / "no")
    assert code == 1 and "raw.jsonl:1: message 1: no audio_tokens; pass --speech-tokenizer DIR" in " ".join(stderr.split())
    cache = tmp_path / "cache"
    code, stdout, stderr = cli(*common, "--output-dir", tmp_path / "out", "--speech_tokenizer",
                               tiny_speech_tokenizer_dir, "--cache_features", cache)
    assert code == 0, stderr
    assert f"audio_tokens for {len(files)} files" in " ".join(stderr.split())
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert len(list(cache.glob("*.codes.safetensors"))) == len(files)  # codes and features share the folder
    assert len([p for p in cache.glob("*.safetensors") if not p.name.endswith(".codes.safetensors")]) == len(files)
    resolved = yaml.safe_load((tmp_path / "out" / "train_config.yaml").read_text())
    assert resolved["speech_tokenizer"] == str(tiny_speech_tokenizer_dir) and resolved["feature_cache_dir"] == str(cache)


def test_bad_data_is_reported_before_any_weight_is_read(cli, tmp_path, tiny_dir):
    """A data typo must not wait for (or be hidden by) the weights: shards here are unreadable."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    for shard in model.glob("model-*.safetensors"):
        shard.write_bytes(b"\x00" * 16)
    data = tmp_path / "d.jsonl"
    data.write_text('{"task_type": "understanding", "conversation": [}\n')
    code, _, err = cli("train", "--model-name-or-path", model, "--data-path", data, "--use-lora",
                       "--output-dir", tmp_path / "out")
    assert code != 0 and "d.jsonl:1" in err and "safetensors" not in err
    code, _, err = cli("train", "--model-name-or-path", model, "--data-path", data, "--use-lora",
                       "--lora-target", "q_prj", "--output-dir", tmp_path / "out")
    assert code != 0 and "q_prj" in err and "safetensors" not in err


def test_progress_bar_keeps_the_last_logged_values_between_log_steps():
    import io

    from rich.console import Console

    from kimi_lora_cli.training.reporting import Reporter

    reporter = Reporter(console=Console(file=io.StringIO(), force_terminal=True, width=160), rich_progress=True)
    reporter.start(10, 0)
    rec = {"epoch": 0.5, "loss": 3.25, "text_loss": 3.0, "audio_loss": 0.25, "learning_rate": 1e-4,
           "tokens_per_second": 123.0}
    reporter.step(1, 10, None)
    assert reporter._progress.tasks[0].fields["info"] == ""  # nothing logged yet: no made-up zeros
    assert "loss" not in reporter._progress.tasks[0].fields["head"]
    reporter.step(2, 10, rec)
    reporter.step(3, 10, None)
    fields = reporter._progress.tasks[0].fields
    reporter.stop()
    assert "3/10 loss 3.2500 eta" in fields["head"]
    assert "(text 3.0000 audio 0.2500)" in fields["info"] and "123 tok/s" in fields["info"]


def test_trainer_state_records_the_epochs_max_steps_plans(train_args, cli, tiny_dir, data, tmp_path):
    """4 samples, batch 4: one step per epoch, so --max-steps 3 plans 3 epochs whatever --num-train-epochs says."""
    out = tmp_path / "out"
    code, _, stderr = cli(*train_args(data, out, "--num-train-epochs", "1", "--max-steps", "3", "--per-device-train-batch-size", "4"))
    assert code == 0, stderr
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and state["epoch"] == 3.0 and state["num_train_epochs"] == 3.0


def test_a_line_says_why_there_is_no_loss_plot(train_args, cli, tiny_dir, data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as on an install without the [plot] extra
    out = tmp_path / "out"
    code, stdout, stderr = cli(*train_args(data, out, "--max-steps", "1"))
    assert code == 0, stderr
    assert not (out / "loss_curve.png").exists()
    said = " ".join(stderr.split())
    assert "no loss_curve.png" in said and "matplotlib" in said and "kimi-lora[plot]" in said


def test_the_output_folder_and_full_fine_tuning_by_omission_are_said_before_loading(train_args, cli, tiny_dir, data, tmp_path):
    out = tmp_path / "full"
    code, _, stderr = cli(*train_args(data, out, "--max-steps", "1", lora=False))
    assert code == 0, stderr
    said = " ".join(stderr.split())
    warning = said.index("Warning: no --use-lora, so this is full fine-tuning")
    assert warning < said.index("Loading") and "add --use-lora" in said
    assert said.index(f"Output {out}") < said.index("Loading")


def test_mimo_targets_without_spoken_answers_are_explained(train_args, cli, tiny_dir, data, tmp_path):
    """ASR data (no assistant audio): the mimo layers get no loss, so their LoRA update stays zero."""
    out = tmp_path / "asr"
    code, _, stderr = cli(*train_args(data, out, "--max-steps", "2", "--learning-rate", "1e-2"))
    assert code == 0, stderr
    said = " ".join(stderr.split())
    assert "Hint:" in said and "mimo (audio output) layers" in said and "backbone,text,adaptor" in said
    assert said.index("Hint:") < said.index("Loading")
    code, stdout, _ = cli("inspect-adapter", out, "--stats")
    shown = " ".join(stdout.split())
    assert "have a zero update (e.g. " in shown and "mimo_layers" in shown
    assert "all are mimo (audio output) layers, which get no loss" in shown
    # with the mimo layers left out, nothing is hinted and no update is zero
    code, _, stderr = cli(*train_args(data, tmp_path / "text", "--lora-target", "backbone,text,adaptor", "--max-steps", "2", "--learning-rate", "1e-2"))
    assert code == 0 and "Hint:" not in stderr
    code, stdout, _ = cli("inspect-adapter", tmp_path / "text", "--stats")
    assert "zero update" not in stdout


def test_paths_are_recorded_absolute_and_a_resume_works_from_another_folder(cli, tiny_dir, data, tmp_path,
                                                                            monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    code, _, stderr = cli("train", "--model-name-or-path", os.path.relpath(tiny_dir), "--data-path",
                          os.path.relpath(data), "--output-dir", "out", "--use-lora", "--max-steps", "2",
                          "--save-steps", "1", "--device", "cpu")
    assert code == 0, stderr
    out = work / "out"
    saved = yaml.safe_load((out / "train_config.yaml").read_text())
    assert saved["model_name_or_path"] == str(tiny_dir) and saved["data_path"] == str(data)
    assert saved["output_dir"] == str(out)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_dir)
    card = (out / "README.md").read_text()
    assert f"base_model: {tiny_dir}" in card and f"kimi-lora infer -m {tiny_dir} --adapter ." in card
    assert f"[Kimi-Audio]({tiny_dir})" in card and f"`{data}`" in card

    monkeypatch.chdir(tmp_path)  # elsewhere: the recorded config still finds everything
    code, _, stderr = cli("train", "--config", "work/out/train_config.yaml", "--resume-from-checkpoint", "latest",
                          "--max-steps", "3")
    assert code == 0, stderr
    assert "Resuming" in stderr and json.loads((out / "trainer_state.json").read_text())["global_step"] == 3


def test_80_columns_keep_step_loss_and_eta_first(tiny_dir):
    """A narrow terminal cuts the details at the end of the live line, never the step, loss or ETA."""
    import io

    from rich.console import Console

    from kimi_lora_cli.training.reporting import Reporter

    buf = io.StringIO()
    reporter = Reporter(console=Console(file=buf, force_terminal=True, width=80, color_system=None),
                        rich_progress=True)
    reporter.start(100, 0)
    reporter.step(15, 100, {"epoch": 3.75, "loss": 4.4685, "text_loss": 3.0, "audio_loss": 1.4685,
                            "learning_rate": 1e-4, "tokens_per_second": 3017.0})
    reporter.stop()
    last = buf.getvalue().split("\r")[-1].split("\n")[0].replace("\x1b[2K", "")
    assert last.startswith("train 15/100 loss 4.4685 eta ") and len(last) <= 80
    assert "\u2501" in last  # the bar is still there


def test_train_help_reads_at_80_columns():
    from typer.testing import CliRunner

    from kimi_lora_cli.cli.app import app

    result = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "80"}, catch_exceptions=False)
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    # a list, not a squeezed table: descriptions get the whole width under their flag (6 columns of
    # indent), so an option takes its flag line and about two of description
    options = [line for line in lines if line.startswith("  -")]
    described = [line for line in lines if line.startswith("      ") and line.strip()]
    assert all(not line.startswith("       ") for line in described)
    assert len(described) < 2.5 * len(options)
    text = result.stdout
    for name in ("--per-device-train-batch-size", "--resume-from-checkpoint", "--load-best-model-at-end",
                 "--gradient-checkpointing", "--feature-cache-dir"):
        assert name in text  # whole, never broken over two lines
    # the description of an option is one paragraph, wrapped at spaces only
    assert "Keep only the newest N checkpoints (and the best)." in " ".join(text.split())
    words = set(" ".join(text.split()).split())
    assert "checkpoints" in words and "checkpoi" not in words
