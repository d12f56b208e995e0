"""`kimi-lora train --deepspeed`: DeepSpeed ZeRO-2/3 really wraps the model (its cpu accelerator over
gloo here), in one process and in two: the loss curve, eval loss and adapter equal a plain one-process
run with the same global batch, a stopped run resumes exactly, the adapter / full model is gathered
(never empty shards), DeepSpeed's checkpoint files are read without unpickling objects, and accelerate's
DeepSpeed launch settings map onto --deepspeed."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from adapter_helpers import assert_complete_and_loadable
from launch_helpers import launcher_env
from safetensors.torch import load_file

from kimi_lora_cli.errors import ConfigError
from kimi_lora_cli.training.config import TrainConfig

pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra: pip install 'kimi-lora[deepspeed]'")

REPO = Path(__file__).resolve().parents[1]
ENV = launcher_env(DS_ACCELERATOR="cpu")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(mixed_data):
    return mixed_data


def common(tiny_dir, data) -> list[str]:
    return ["--model-name-or-path", str(tiny_dir), "--data-path", str(data), "--lora-dropout", "0",
            "--learning-rate", "1e-2", "--logging-steps", "1", "--device", "cpu", "--lr-scheduler-type", "constant",
            "--save-steps", "2", "--seed", "5"]


LORA = ["--use-lora", "--lora-target", "all,heads"]


def records(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "logs" / "metrics.jsonl").read_text().splitlines()]


def losses(folder: Path) -> list[float]:
    return [r["loss"] for r in records(folder) if "loss" in r]


def evals(folder: Path) -> list[dict]:
    return [r for r in records(folder) if "eval_loss" in r]


def kimi_lora(*args: str, expect: int = 0) -> subprocess.CompletedProcess:
    """`python -m kimi_lora_cli ...` in a fresh process (DeepSpeed keeps process-wide state)."""
    run = subprocess.run([sys.executable, "-m", "kimi_lora_cli", *map(str, args)], env=ENV, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == expect, run.stderr[-3000:]
    return run


def said(run: subprocess.CompletedProcess) -> str:
    return " ".join(run.stderr.split())


def same_adapter(a_dir: Path, b_dir: Path, atol: float = 1e-4) -> None:
    a = load_file(str(a_dir / "adapter_model.safetensors"))
    b = load_file(str(b_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert b[k].numel() > 0 and torch.allclose(a[k], b[k], atol=atol), (k, (a[k] - b[k]).abs().max())


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_dir, data):
    """The plain one-process run every DeepSpeed run must reproduce: 4 steps of 4 samples."""
    from typer.testing import CliRunner

    from kimi_lora_cli.cli.app import app

    out = tmp_path_factory.mktemp("ds-reference") / "plain"
    args = [*common(tiny_dir, data), *LORA, "--eval-data-path", str(data), "--eval-generate", "all",
            "--output-dir", str(out), "--max-steps", "4", "--per-device-train-batch-size", "2",
            "--gradient-accumulation-steps", "2"]
    result = CliRunner().invoke(app, ["train", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    return out


def test_one_process_zero2_resumes_exactly_and_refuses_a_crafted_checkpoint(tiny_dir, data, reference, tmp_path):
    args = [*common(tiny_dir, data), *LORA, "--eval-data-path", str(data), "--eval-generate", "all",
            "--output-dir", tmp_path / "z2", "--per-device-train-batch-size", "2", "--gradient-accumulation-steps",
            "2", "--deepspeed", "zero2"]
    first = kimi_lora("train", *args, "--max-steps", "2")
    assert "World size 1 (DeepSpeed ZeRO-2, cpu" in said(first)
    checkpoint = tmp_path / "z2" / "checkpoint-2"
    partitions = sorted(p.name for p in (checkpoint / "deepspeed" / "global_step2").iterdir())
    assert partitions == ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    assert (checkpoint / "adapter_model.safetensors").is_file()

    # A crafted pickle in the DeepSpeed folder of a copy: refused in one line, its payload never runs.
    crafted = tmp_path / "crafted"
    shutil.copytree(tmp_path / "z2", crafted)
    payload = tmp_path / "payload-ran"
    for f in (crafted / "checkpoint-2" / "deepspeed" / "global_step2").iterdir():
        f.write_bytes(pickle.dumps(Payload(str(payload))))
    args_crafted = [a if a != tmp_path / "z2" else crafted for a in args]
    refused = kimi_lora("train", *args_crafted, "--max-steps", "4", "--resume-from-checkpoint", "latest", expect=1)
    error = [x for x in refused.stderr.splitlines() if x.startswith("Error")]
    assert len(error) == 1 and "mp_rank_00_model_states.pt: refused" in error[0], refused.stderr
    assert "Traceback" not in refused.stderr and "Warning" not in refused.stderr
    assert not payload.exists()

    resumed = kimi_lora("train", *args, "--max-steps", "4", "--resume-from-checkpoint", "latest")
    assert "Resuming from" in said(resumed) and "at step 2" in said(resumed)
    assert losses(tmp_path / "z2") == pytest.approx(losses(reference), abs=1e-4)
    for a, b in zip(evals(reference), evals(tmp_path / "z2"), strict=True):
        for key in ("eval_loss", "eval_wer", "eval_cer"):
            assert b[key] == pytest.approx(a[key], abs=1e-4), key
    same_adapter(reference, tmp_path / "z2")


class Payload:
    """Unpickling this would create a folder: the test asserts it never appears."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_one_process_zero3_full_fine_tuning_saves_the_gathered_model(cli, tiny_dir, data, tmp_path):
    flags = [a for a in common(tiny_dir, data) if a not in ("--lora-dropout", "0")]
    flags += ["--learning-rate", "1e-3", "--max-steps", "2", "--per-device-train-batch-size", "4", "--save-steps",
              "1000"]
    code, _, err = cli("train", *flags, "--output-dir", tmp_path / "plain")
    assert code == 0, err
    run = kimi_lora("train", *flags, "--output-dir", tmp_path / "z3", "--deepspeed", "zero3")
    assert "World size 1 (DeepSpeed ZeRO-3, cpu" in said(run)
    assert losses(tmp_path / "z3") == pytest.approx(losses(tmp_path / "plain"), abs=1e-4)
    from kimi_lora_cli.loading import load_model

    one = load_model(tmp_path / "plain", load_whisper=False).model.state_dict()
    two = load_model(tmp_path / "z3", load_whisper=False).model.state_dict()
    assert one.keys() == two.keys()
    for k in one:
        assert two[k].numel() > 0 and torch.allclose(one[k], two[k], atol=1e-5), k


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_zero3_processes_partition_train_like_one_and_resume_exactly(cli, tiny_dir, data, reference, tmp_path):
    """Stopped after step 2 inside torchrun (the worker inspects the engine), resumed to step 4 with
    --num-processes 2 and gradient checkpointing: the same curve, evaluations and adapter as one plain process."""
    ds = tmp_path / "zero3.json"  # the shipped zero3 with every weight partitioned (none kept whole)
    shipped = json.loads((REPO / "kimi_lora_cli" / "configs" / "ds_zero3.json").read_text())
    shipped["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    ds.write_text(json.dumps(shipped))
    out = tmp_path / "two"
    settings = dict(model_name_or_path=str(tiny_dir), data_path=str(data), eval_data_path=str(data), eval_generate="all",
                    output_dir=str(out), learning_rate=1e-2, max_steps=2, logging_steps=1, device="cpu",
                    lr_scheduler_type="constant", save_steps=2, seed=5, per_device_train_batch_size=1,
                    gradient_accumulation_steps=2, deepspeed=str(ds), use_lora=True, lora_dropout=0.0,
                    lora_target="all,heads", gradient_checkpointing=True)
    result = tmp_path / "result.json"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(REPO / "tests" / "_deepspeed_worker.py"), str(result), json.dumps(settings)],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(result.read_text())
    for rank in found["ranks"]:
        assert rank["engine"] == "deepspeed.runtime.engine.DeepSpeedEngine" and rank["is_engine"], rank
        assert rank["banner"] == "DeepSpeed ZeRO-3" and rank["stage"] == 3
        assert rank["empty_local"] and rank["local"] < 0.6 * rank["total"], rank
    assert not found["missing"] and not found["extra"] and not found["empty"] and found["compared"] > 0
    assert found["max_diff"] == 0.0
    assert sorted(p.name for p in (out / "checkpoint-2" / "deepspeed" / "global_step2").iterdir()) == [
        f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1) for kind in ("model", "optim")]

    args = [*common(tiny_dir, data), *LORA, "--eval-data-path", str(data), "--eval-generate", "all",
            "--output-dir", out, "--per-device-train-batch-size", "1", "--gradient-accumulation-steps", "2",
            "--deepspeed", ds, "--gradient-checkpointing", "--max-steps", "4", "--resume-from-checkpoint", "latest"]
    resumed = kimi_lora("train", *args, "--num-processes", "2")
    assert "World size 2 (DeepSpeed ZeRO-3, cpu" in said(resumed) and "at step 2" in said(resumed)

    assert losses(out) == pytest.approx(losses(reference), abs=1e-4)
    ea, eb = evals(reference), evals(out)
    assert [e["step"] for e in ea] == [e["step"] for e in eb] == [2, 4]
    for a, b in zip(ea, eb):  # every rank decodes everything (ZeRO-3 gathers per forward)
        assert b["eval_generated"] == a["eval_generated"] == 4
        for key in ("eval_loss", "eval_wer", "eval_cer"):
            assert b[key] == pytest.approx(a[key], abs=1e-4), key
    same_adapter(reference, out)

    # The adapter is complete: inspect-adapter finds no empty tensor, plain peft loads it.
    assert_complete_and_loadable(cli, tiny_dir, out)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_accelerate_launch_use_deepspeed_trains_zero2_like_one_process(tiny_dir, data, reference, tmp_path):
    """`accelerate launch --use_deepspeed --zero_stage 2 --gradient_accumulation_steps 2` (no --deepspeed
    flag): two ZeRO-2 processes accumulating two micro-batches of one sample train like one process."""
    args = [*common(tiny_dir, data), *LORA, "--eval-data-path", str(data), "--eval-generate", "all",
            "--output-dir", str(tmp_path / "z2"), "--per-device-train-batch-size", "1", "--max-steps", "4"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--zero_stage", "2",
              "--gradient_accumulation_steps", "2", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    run = subprocess.run([*launch, "-m", "kimi_lora_cli", "train", *args], env=ENV, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "World size 2 (DeepSpeed ZeRO-2, cpu" in said(run)
    assert "1 per device x 2 accumulation x 2 processes" in said(run)
    assert TrainConfig.from_yaml(tmp_path / "z2" / "train_config.yaml")["deepspeed"] == "zero2"
    assert losses(tmp_path / "z2") == pytest.approx(losses(reference), abs=1e-4)
    for a, b in zip(evals(reference), evals(tmp_path / "z2"), strict=True):
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], abs=1e-4)
    same_adapter(reference, tmp_path / "z2")
    assert sorted(p.name for p in (tmp_path / "z2" / "checkpoint-4" / "deepspeed" / "global_step4").iterdir()) == [
        "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt"]


# -- before any weight is read -------------------------------------------------------------------
def test_without_deepspeed_the_flag_names_the_extra(cli, tiny_dir, data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as if not installed
    code, _, err = cli("train", "--model-name-or-path", tiny_dir, "--data-path", data, "--output-dir", tmp_path / "o",
                       "--deepspeed", "zero3")
    assert code != 0 and "kimi-lora[deepspeed]" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


@pytest.mark.parametrize("config, message", [
    ({"zero_optimization": {"stage": 1}}, "zero_optimization.stage 1 is not supported"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}, "offload to \"cpu\""),
    ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}, "offload_param needs ZeRO stage 3"),
    ({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}, "bf16.enabled is true but --bf16 is off"),
    ({"zero_optimization": {"stage": 2}, "train_batch_size": 64}, "train_batch_size 64 is not"),
    ({"zero_optimization": {"stage": 2}, "checkpoint": {"load_universal": True}}, "safe reader"),
])
def test_bad_deepspeed_configs_give_one_line_errors(cli, tiny_dir, data, tmp_path, config, message):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps(config))
    code, _, err = cli("train", "--model-name-or-path", tiny_dir, "--data-path", data, "--output-dir", tmp_path / "o",
                       "--deepspeed", ds)
    assert code != 0 and message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


@pytest.mark.parametrize(("name", "stage", "offload"), [("zero2_offload", 2, {"offload_optimizer"}),
                                                        ("zero3_offload", 3, {"offload_optimizer", "offload_param"})])
def test_shipped_offload_configs(name, stage, offload):
    from kimi_lora_cli.training.distributed import deepspeed_config

    cfg = TrainConfig.build({}, {"data_path": "d", "model_path": "m", "deepspeed": name})
    out = deepspeed_config(cfg, world=2)
    zero = out["zero_optimization"]
    assert zero["stage"] == stage and {k for k in zero if k.startswith("offload")} == offload
    assert all(zero[k]["device"] == "cpu" for k in offload)
    assert out["zero_force_ds_cpu_optimizer"] is False  # kimi-lora's AdamW steps the CPU partitions


def test_accelerate_deepspeed_launch_settings_map_onto_deepspeed(monkeypatch, tmp_path):
    from kimi_lora_cli.training.zero import from_launcher

    cfg = TrainConfig.build(flag_values=dict(model_name_or_path="m", data_path="d", use_lora=True))
    assert from_launcher(cfg) == (cfg, [])
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
           "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu", "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "none",
           "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4", "ACCELERATE_GRADIENT_CLIPPING": "0.5",
           "ACCELERATE_MIXED_PRECISION": "bf16", "ACCELERATE_DEEPSPEED_ZERO3_INIT": "true",
           "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "true"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    mapped, notes = from_launcher(cfg)
    assert mapped.deepspeed == "zero3_offload" and mapped.gradient_accumulation_steps == 4
    assert mapped.max_grad_norm == 0.5 and mapped.bf16
    assert any("zero3_init_flag" in n for n in notes) and any("zero3_save_16bit_model" in n for n in notes)
    assert any("both the optimizer state and the parameters" in n for n in notes)
    assert os.environ["ACCELERATE_USE_DEEPSPEED"] == "false"  # the Accelerator must not wrap a second time

    def refused(message: str, config: TrainConfig = cfg, **changes: str) -> None:
        monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
        for key, value in changes.items():
            monkeypatch.setenv(key, value)
        with pytest.raises(ConfigError, match=message):
            from_launcher(config)

    refused("gradient_accumulation_steps 4 but --gradient-accumulation-steps is 2",
            cfg.with_(gradient_accumulation_steps=2))
    refused("set zero_stage: 2 or 3", ACCELERATE_DEEPSPEED_ZERO_STAGE="1")
    refused("offloads to the CPU only", ACCELERATE_DEEPSPEED_ZERO_STAGE="3",
            ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE="nvme")
    refused("parameter offload needs zero_stage: 3", ACCELERATE_DEEPSPEED_ZERO_STAGE="2",
            ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE="cpu")
    refused("pick one", cfg.with_(fsdp=True))

    # accelerate's own DeepSpeed config file becomes --deepspeed FILE
    ds = tmp_path / "ds.json"
    ds.write_text("{}")
    for key in env:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ds))
    mapped, _ = from_launcher(cfg)
    assert mapped.deepspeed == str(ds)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError, match="disagree"):
        from_launcher(cfg.with_(deepspeed="zero2"))


def test_a_deepspeed_checkpoint_resumes_only_with_its_own_tag_and_process_count(tmp_path):
    from kimi_lora_cli.training.zero import checkpoint_tag

    folder = tmp_path / "checkpoint-2" / "deepspeed"
    (folder / "global_step2").mkdir(parents=True)
    for rank in (0, 1):
        (folder / "global_step2" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match="no DeepSpeed state"):
        checkpoint_tag(folder, 2)
    (folder / "latest").write_text("global_step2")
    assert checkpoint_tag(folder, 2) == "global_step2"
    with pytest.raises(ConfigError, match=r"DeepSpeed state of 2 processes, this run has 1; resume with 2 processes"):
        checkpoint_tag(folder, 1)
    (folder / "latest").write_text("../../elsewhere")
    with pytest.raises(ConfigError, match="not a global_stepN folder"):
        checkpoint_tag(folder, 2)
