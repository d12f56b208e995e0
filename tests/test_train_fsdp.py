"""`kimi-lora train --fsdp`: two FSDP2 processes (gloo) train exactly like one process with the same
global batch, save the gathered weights in the normal formats, and resume exactly; the meta-device
load reads the same weights as the plain load; accelerate's FSDP launch settings map onto --fsdp."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from adapter_helpers import assert_complete_and_loadable
from launch_helpers import launcher_env
from safetensors.torch import load_file

from kimi_lora_cli.errors import ConfigError, ModelLoadError
from kimi_lora_cli.training.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
ENV = launcher_env()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(mixed_data):
    return mixed_data


def common(tiny_dir, data):
    return ["--model-name-or-path", str(tiny_dir), "--data-path", str(data), "--lora-dropout", "0",
            "--learning-rate", "1e-2", "--logging-steps", "1", "--device", "cpu", "--lr-scheduler-type", "constant",
            "--save-steps", "2", "--seed", "5"]


def losses(folder: Path) -> list[float]:
    records = [json.loads(x) for x in (folder / "logs" / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def evals(folder: Path) -> list[dict]:
    records = [json.loads(x) for x in (folder / "logs" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "eval_loss" in r]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          *args],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_fsdp_processes_train_like_one_and_resume_exactly(cli, tiny_dir, data, tmp_path):
    lora = ["--use-lora", "--lora-target", "all,heads", "--eval-data-path", str(data), "--eval-generate", "all"]
    code, _, err = cli("train", *common(tiny_dir, data), *lora, "--output-dir", tmp_path / "one", "--max-steps", "4",
                       "--per-device-train-batch-size", "2", "--gradient-accumulation-steps", "2")
    assert code == 0, err
    # Two FSDP processes accumulating two micro-batches of one sample (the same global batch); stopped
    # after step 2, then resumed to step 4.
    args = [*common(tiny_dir, data), *lora, "--output-dir", str(tmp_path / "two"), "--per-device-train-batch-size",
            "1", "--gradient-accumulation-steps", "2", "--fsdp", "--gradient-checkpointing"]
    first = subprocess.run([sys.executable, "-m", "kimi_lora_cli", "train", *args, "--max-steps", "2",
                            "--num-processes", "2"], env=ENV, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    banner = " ".join(first.stderr.split())
    assert "World size 2 (FSDP, cpu" in banner and "gradient checkpointing" in banner
    resumed = subprocess.run([sys.executable, "-m", "kimi_lora_cli", "train", *args, "--max-steps", "4",
                              "--resume-from-checkpoint", "latest", "--num-processes", "2"],
                             env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    said = " ".join(resumed.stderr.split())
    assert "Resuming from" in said and "at step 2" in said

    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), abs=1e-4)
    assert len(losses(tmp_path / "one")) == 4
    ea, eb = evals(tmp_path / "one"), evals(tmp_path / "two")
    assert [e["step"] for e in ea] == [e["step"] for e in eb] == [2, 4]
    for a, b in zip(ea, eb):  # every rank decodes everything (sharded weights); the scores are one process's
        assert b["eval_generated"] == a["eval_generated"] == 4
        for key in ("eval_loss", "eval_wer", "eval_cer"):
            assert b[key] == pytest.approx(a[key], abs=1e-4), key
    a = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-4), (k, (a[k] - b[k]).abs().max())

    # The adapter is complete: inspect-adapter finds no empty tensor, plain peft loads it.
    assert_complete_and_loadable(cli, tiny_dir, tmp_path / "two")


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_fsdp_shards_the_model_and_saves_the_gathered_weights(cli, tiny_dir, data, tmp_path, mode):
    """Inside the two processes: every parameter is a DTensor holding half the rows; the saved adapter
    (or full model) equals the weights gathered with full_tensor(). The full fine-tuning run also
    matches one process's loss curve."""
    settings = dict(model_name_or_path=str(tiny_dir), data_path=str(data), output_dir=str(tmp_path / "fsdp"),
                    learning_rate=1e-3 if mode == "full" else 1e-2, max_steps=2, logging_steps=1, device="cpu",
                    lr_scheduler_type="constant", save_steps=1000, seed=5, per_device_train_batch_size=2, fsdp=True)
    if mode == "lora":
        settings.update(use_lora=True, lora_dropout=0.0, lora_target="all", modules_to_save="lm_head")
    result = tmp_path / "result.json"
    torchrun(str(REPO / "tests" / "_fsdp_worker.py"), str(result), json.dumps(settings))
    found = json.loads(result.read_text())
    for rank in found["ranks"]:
        assert rank["sharded"] and rank["local"] < 0.6 * rank["total"], rank
    assert sum(r["local"] for r in found["ranks"]) == found["ranks"][0]["total"]
    assert not found["missing"] and not found["extra"] and not found["empty"] and found["compared"] > 0
    assert found["max_diff"] == 0.0
    if mode == "lora":
        assert found["nonzero_lora_b"] > 0  # trained, not the zero start
        return
    flags = ["--learning-rate", "1e-3", "--max-steps", "2", "--logging-steps", "1", "--device", "cpu",
             "--lr-scheduler-type", "constant", "--seed", "5", "--per-device-train-batch-size", "4"]
    code, _, err = cli("train", "--model-name-or-path", tiny_dir, "--data-path", data, *flags,
                       "--output-dir", tmp_path / "one")
    assert code == 0, err
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "one"), abs=1e-4)
    from kimi_lora_cli.loading import load_model

    one = load_model(tmp_path / "one", load_whisper=False).model.state_dict()
    two = load_model(tmp_path / "fsdp", load_whisper=False).model.state_dict()
    assert one.keys() == two.keys()
    for k in one:
        assert torch.allclose(one[k], two[k], atol=1e-5), k


def test_fsdp_in_one_process_and_with_cpu_offload_trains_like_plain(cli, tiny_dir, data, tmp_path):
    args = [*common(tiny_dir, data), "--use-lora", "--max-steps", "2", "--per-device-train-batch-size", "4"]
    runs = {"plain": [], "fsdp": ["--fsdp"], "offload": ["--fsdp", "--fsdp-cpu-offload"]}
    for name, extra in runs.items():
        code, _, err = cli("train", *args, *extra, "--output-dir", tmp_path / name)
        assert code == 0, err
    # bf16 in a process of its own (accelerate fixes a process's mixed precision at its first run)
    bf16 = subprocess.run([sys.executable, "-m", "kimi_lora_cli", "train", *args, "--fsdp", "--bf16",
                           "--gradient-checkpointing", "--output-dir", str(tmp_path / "bf16")],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert bf16.returncode == 0, bf16.stderr[-3000:]
    import torch.distributed as dist

    assert not dist.is_initialized()  # the run's own process group is gone again
    for name in ("fsdp", "offload"):
        assert losses(tmp_path / name) == pytest.approx(losses(tmp_path / "plain"), abs=1e-5)
        a = load_file(str(tmp_path / "plain" / "adapter_model.safetensors"))
        b = load_file(str(tmp_path / name / "adapter_model.safetensors"))
        assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    # bfloat16 weights gathered for compute: the same curve up to bfloat16 rounding, a complete adapter
    assert losses(tmp_path / "bf16") == pytest.approx(losses(tmp_path / "plain"), abs=0.05)
    adapter = load_file(str(tmp_path / "bf16" / "adapter_model.safetensors"))
    assert adapter.keys() == a.keys() and all(t.numel() for t in adapter.values())
    saved = yaml_config(tmp_path / "offload")
    assert saved["fsdp"] is True and saved["fsdp_cpu_offload"] is True


def yaml_config(folder: Path) -> dict:
    import yaml

    return yaml.safe_load((folder / "train_config.yaml").read_text())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_meta_load_reads_the_same_weights_as_the_plain_load(tiny_dir, dtype):
    from kimi_lora_cli.loading import load_model

    plain = load_model(tiny_dir, dtype=dtype)
    seen = []
    prepared = load_model(tiny_dir, dtype=dtype, prepare=lambda m: seen.append(m.lm_head.weight.device.type) or m)
    assert seen == ["meta"]  # prepare runs before any tensor is read
    a, b = plain.model.state_dict(), prepared.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert b[k].dtype == a[k].dtype and torch.equal(a[k], b[k]), k
    assert prepared.info.num_parameters == plain.info.num_parameters
    assert torch.equal(prepared.feature_encoder.encoder.conv1.weight, plain.feature_encoder.encoder.conv1.weight)


def test_meta_load_refuses_a_mismatched_folder_before_allocating(tmp_path, tiny_dir):
    import shutil

    from kimi_lora_cli.loading import load_model

    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    config["num_hidden_layers"] += 1
    (broken / "config.json").write_text(json.dumps(config))
    calls = []
    with pytest.raises(ModelLoadError, match="missing .* tensors"):
        load_model(broken, prepare=lambda m: calls.append(m) or m)
    assert calls == []


def test_checkpoint_keys_of_peft_parameters():
    from kimi_lora_cli.sharded import checkpoint_key

    assert checkpoint_key("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight") == \
        "model.layers.0.self_attn.q_proj.weight"
    assert checkpoint_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight") is None
    assert checkpoint_key("base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector.default.weight") is None
    assert checkpoint_key("base_model.model.lm_head.modules_to_save.default.weight") == "lm_head.weight"
    assert checkpoint_key("base_model.model.lm_head.original_module.weight") == "lm_head.weight"
    assert checkpoint_key("model.norm.weight") == "model.norm.weight"


@pytest.mark.parametrize("dora", [False, True])
def test_adapter_start_is_seeded_per_module_and_doras_magnitude_is_peft_s(tiny_dir, dora):
    from peft import LoraConfig, get_peft_model

    from kimi_lora_cli.loading import load_model
    from kimi_lora_cli.training.lora import init_adapter_weights

    def wrapped(seed):
        model = load_model(tiny_dir, dtype="float32", load_whisper=False).model
        peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "down_proj"], use_dora=dora))
        reference = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "magnitude" in n}
        init_adapter_weights(peft_model, seed)
        return {n: p.detach() for n, p in peft_model.named_parameters()}, reference

    a, peft_magnitudes = wrapped(1)
    b, _ = wrapped(1)
    c, _ = wrapped(2)
    lora_a = [n for n in a if "lora_A" in n]
    assert lora_a and all(torch.equal(a[n], b[n]) for n in lora_a)
    assert all(not torch.equal(a[n], c[n]) for n in lora_a)
    alike = [n for n in lora_a if a[n].shape == a[lora_a[0]].shape]
    assert len(alike) > 1 and not torch.equal(a[alike[0]], a[alike[1]])  # each module its own draw
    for n in lora_a:
        bound = 1 / a[n].shape[1] ** 0.5
        assert float(a[n].abs().max()) <= bound and float(a[n].abs().max()) > 0.5 * bound
    assert all(float(a[n].abs().max()) == 0 for n in a if "lora_B" in n)
    assert bool(peft_magnitudes) == dora
    for n, m in peft_magnitudes.items():
        assert torch.allclose(a[n], m, rtol=1e-6), n


def test_accelerate_fsdp_launch_settings_map_onto_fsdp(monkeypatch, tiny_dir, data):
    from kimi_lora_cli.training.fsdp import from_launcher

    cfg = TrainConfig.build(flag_values=dict(model_name_or_path=str(tiny_dir), data_path=str(data), use_lora=True))
    assert from_launcher(cfg) == (cfg, [])
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")
    mapped, notes = from_launcher(cfg)
    assert mapped.fsdp and mapped.fsdp_cpu_offload and mapped.gradient_checkpointing and notes
    assert os.environ["ACCELERATE_USE_FSDP"] == "false"  # the Accelerator must not shard a second time
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ConfigError, match="set fsdp_version: 2"):
        from_launcher(cfg)


@pytest.mark.parametrize("extra, message", [
    (["--fsdp", "--deepspeed", "zero3"], "pick one of --fsdp and --deepspeed"),
    (["--fsdp-cpu-offload"], "--fsdp-cpu-offload needs --fsdp"),
    (["--fsdp", "--fp16"], "use --bf16 instead of --fp16"),
])
def test_bad_fsdp_options_give_one_line_errors(train_args, cli, tiny_dir, data, tmp_path, extra, message):
    code, _, err = cli(*train_args(data, tmp_path / "o", *extra, lora=False))
    assert code != 0 and message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
