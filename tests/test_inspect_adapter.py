"""kimi-lora inspect-adapter: header-only report, grouping, base check, update norms, broken adapters."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from adapter_helpers import build_tiny_qwen, make_adapter, write_adapter


@pytest.fixture(scope="module")
def kimi_adapter(tiny_dir, tmp_path_factory):
    return make_adapter(tiny_dir, tmp_path_factory.mktemp("ad") / "kimi", "all", r=8, lora_alpha=16,
                        lora_dropout=0.05, use_rslora=True, rank_pattern={"mimo_layers.1.mlp.down_proj": 2},
                        modules_to_save=["mimo_output"])


def _json(cli, *args):
    code, out, err = cli("inspect-adapter", *args, "--json")
    return code, json.loads(out), err


def test_kimi_report_json(cli, tiny_dir, kimi_adapter):
    from safetensors import safe_open

    code, data, _ = _json(cli, kimi_adapter, "--base", tiny_dir)
    assert code == 0 and data["ok"]
    assert data["peft_type"] == "LORA" and data["peft_version"]
    assert data["kind"] == "kimi-audio" and data["use_rslora"] and data["lora_dropout"] == 0.05
    assert data["scaling"] == pytest.approx(16 / math.sqrt(8))  # rsLoRA: alpha / sqrt(r)
    assert sorted(data["scalings_in_use"]) == pytest.approx(sorted({16 / math.sqrt(8), 16 / math.sqrt(2)}))
    assert data["rank_pattern"] == {"mimo_layers.1.mlp.down_proj": 2}
    assert data["modules_to_save"] == ["mimo_output"] and data["replaced_tensors"] == ["mimo_output.weight"]
    with safe_open(str(kimi_adapter / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
        params = sum(math.prod(f.get_slice(k).get_shape()) for k in keys)
    assert data["tensor_count"] == len(keys) and data["parameter_count"] == params
    assert data["size_on_disk"] >= (kimi_adapter / "adapter_model.safetensors").stat().st_size
    assert data["base"] == {"path": str(tiny_dir), "compatible": True, "problems": []}
    # Same component split as list-modules: mimo_from_layer=2, so layers 0-2 are backbone, 3 is text.
    groups = {(g["pattern"], g["component"]): g for g in data["groups"]}
    assert groups[("model.layers.{0-2}.self_attn.q_proj", "backbone")]["count"] == 3
    assert groups[("model.layers.{3}.self_attn.q_proj", "text")]["count"] == 1
    down = groups[("model.mimo_layers.{0-1}.mlp.down_proj", "mimo")]
    assert down["ranks"] == [2, 8]
    assert {m["component"] for m in data["modules"]} == {"backbone", "text", "mimo", "adaptor"}


def test_kimi_report_table(cli, tiny_dir, kimi_adapter):
    code, out, _ = cli("inspect-adapter", kimi_adapter, "--base", tiny_dir)
    assert code == 0
    for text in ("peft 0.21", "r=8, lora_alpha=16", "alpha/sqrt(r) (rsLoRA)", "mimo_output",
                 "model.layers.{0-2}.self_attn.q_proj", "backbone", "mimo", "adaptor", "Base check: fits"):
        assert text in out, text


def test_header_only_without_torch(tiny_dir, kimi_adapter):
    """No tensor data and not even torch is needed for the plain report."""
    code = (f"import sys\nsys.argv=['kimi-lora','inspect-adapter',{str(kimi_adapter)!r},'--json']\n"
            "from kimi_lora_cli.cli.app import main\ntry:\n    main()\nexcept SystemExit as e:\n    rc = e.code\n"
            "print('@@', rc, 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=os.getcwd())
    assert proc.stdout.strip().endswith("@@ 0 False"), proc.stdout[-300:] + proc.stderr


def test_stats_norms_sorted_and_exact(cli, kimi_adapter):
    import torch
    from safetensors.torch import load_file

    code, data, _ = _json(cli, kimi_adapter, "--stats")
    assert code == 0
    stats = data["stats"]
    norms = [s["norm"] for s in stats]
    assert norms == sorted(norms, reverse=True) and len(stats) == len(data["modules"])
    tensors = load_file(str(kimi_adapter / "adapter_model.safetensors"))
    mod = {m["name"]: m for m in data["modules"]}
    for s in stats[:5] + stats[-3:]:
        prefix = "base_model.model." + s["name"]
        delta = mod[s["name"]]["scaling"] * tensors[prefix + ".lora_B.weight"] @ tensors[prefix + ".lora_A.weight"]
        assert s["norm"] == pytest.approx(float(torch.linalg.norm(delta)), rel=1e-5)
    code, out, _ = cli("inspect-adapter", kimi_adapter, "--stats", "--top", "3")
    assert "█" in out and "more rows" in out


def test_plain_llm_adapter(cli, tmp_path):
    base = build_tiny_qwen(tmp_path / "qwen")
    adapter = make_adapter(base, tmp_path / "adapter", "q_proj,v_proj", task_type="CAUSAL_LM")
    code, data, _ = _json(cli, adapter, "--base", base, "--stats")
    assert code == 0 and data["kind"] == "causal-lm" and data["scaling"] == 2.0
    assert {g["pattern"] for g in data["groups"]} == {"model.layers.{0-1}.self_attn.q_proj",
                                                      "model.layers.{0-1}.self_attn.v_proj"}
    assert {g["component"] for g in data["groups"]} == {"layers"}
    assert data["base_model_recorded"] == str(base)


def test_mismatched_base(cli, tmp_path, kimi_adapter):
    qwen = build_tiny_qwen(tmp_path / "qwen")
    code, data, err = _json(cli, kimi_adapter, "--base", qwen)
    assert code == 1 and data["base"]["compatible"] is False and len(data["base"]["problems"]) == 31
    assert "does not fit" in err and "more)" in err and len(err.strip().splitlines()) == 1
    code, out, _ = cli("inspect-adapter", kimi_adapter, "--base", qwen)
    assert code == 1 and "mismatches:" in out and "and " in out and "more" in out


def test_zero3_empty_tensors(cli, tmp_path):
    import torch

    folder = write_adapter(tmp_path / "empty", {
        "model.layers.0.self_attn.q_proj.lora_A.weight": torch.empty(0),
        "model.layers.0.self_attn.q_proj.lora_B.weight": torch.empty(0),
    })
    code, out, err = cli("inspect-adapter", folder)
    assert code == 1 and "ZeRO-3" in err and "Traceback" not in err


def test_zero_update_and_nan(cli, tiny_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    untrained = make_adapter(tiny_dir, tmp_path / "untrained", "q_proj", randomize=False)
    code, out, err = cli("inspect-adapter", untrained)
    assert code == 0  # headers alone look fine
    code, data, err = _json(cli, untrained, "--stats")
    assert code == 1 and "every LoRA update is zero" in err
    assert all(s["flags"] == ["zero"] for s in data["stats"])

    nan = make_adapter(tiny_dir, tmp_path / "nan", "q_proj")
    file = nan / "adapter_model.safetensors"
    tensors = load_file(str(file))
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    tensors[key][0, 0] = float("inf")
    save_file(tensors, str(file))
    code, out, err = cli("inspect-adapter", nan, "--stats")
    assert code == 1 and "NaN/Inf" in err
    assert "model.layers.1.self_attn.q_proj" in out and "nan/inf" in out

    partly = make_adapter(tiny_dir, tmp_path / "partly", "q_proj")
    file = partly / "adapter_model.safetensors"
    tensors = load_file(str(file))
    tensors["base_model.model.model.layers.2.self_attn.q_proj.lora_B.weight"].zero_()
    save_file(tensors, str(file))
    code, out, err = cli("inspect-adapter", partly, "--stats")
    assert code == 0 and "warning:" in out and "1 modules have a zero update" in out


@pytest.mark.parametrize("breakage, needle", [
    ("no_weights", "no adapter_model.safetensors"),
    ("no_config", "adapter_config.json: not found"),
    ("bad_json", "adapter_config.json:3: invalid JSON"),
    ("truncated", "truncated safetensors file"),
    ("not_lora", "peft_type is 'IA3'"),
    ("missing_b", "no lora_B"),
    ("no_folder", "no such adapter folder"),
])
def test_broken_adapters_one_line_error(cli, tiny_dir, tmp_path, breakage, needle):
    import shutil

    folder = make_adapter(tiny_dir, tmp_path / "a", "q_proj")
    st = folder / "adapter_model.safetensors"
    cfg = folder / "adapter_config.json"
    if breakage == "no_weights":
        st.unlink()
    elif breakage == "no_config":
        cfg.unlink()
    elif breakage == "bad_json":
        cfg.write_text('{\n "r": 4,\n "lora_alpha" 8\n}')
    elif breakage == "truncated":
        st.write_bytes(st.read_bytes()[:-100])
    elif breakage == "not_lora":
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "peft_type": "IA3"}))
    elif breakage == "missing_b":
        import torch

        write_adapter(folder, {"model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32)})
    elif breakage == "no_folder":
        shutil.rmtree(folder)
    code, out, err = cli("inspect-adapter", folder)
    assert code == 1 and needle in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1


def test_pickle_adapter(cli, tiny_dir, tmp_path):
    import torch
    from safetensors.torch import load_file

    folder = make_adapter(tiny_dir, tmp_path / "a", "q_proj")
    torch.save(load_file(str(folder / "adapter_model.safetensors")), folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()
    code, _, err = cli("inspect-adapter", folder)
    assert code == 1 and "--allow-pickle" in err
    code, data, _ = _json(cli, folder, "--allow-pickle", "--stats", "--base", tiny_dir)
    assert code == 0 and data["format"] == "pickle" and len(data["stats"]) == 6 and data["base"]["compatible"]


def test_recorded_base_gives_components_without_base_flag(cli, tiny_dir, kimi_adapter):
    """Adapters made on a loader-built model record its folder; inspect uses it to split components."""
    code, data, _ = _json(cli, kimi_adapter)
    assert code == 0 and data["base_model_recorded"] == str(tiny_dir) and data["base"] is None
    assert {g["component"] for g in data["groups"]} == {"backbone", "text", "mimo", "adaptor"}


def test_adapter_trained_by_kimi_lora_train(cli, tiny_dir, tiny, tmp_path):
    """The real train loop's output (targets all + heads): report, stats, base check, merge --verify."""
    import torch

    from kimi_lora_cli.data.synthetic import write_synthetic_dataset
    from kimi_lora_cli.training.config import TrainConfig
    from kimi_lora_cli.training.reporting import Reporter
    from kimi_lora_cli.training.trainer import Trainer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = write_synthetic_dataset(tmp_path / "data", tiny.config, n=3, seed=0, task="mixed")
        values = dict(data_path=str(data), model_name_or_path=str(tiny_dir), output_dir=str(tmp_path / "run"),
                      use_lora=True, lora_target="all,heads", lora_dropout=0.0, learning_rate=1e-2,
                      per_device_train_batch_size=3, max_steps=2, logging_steps=1, save_steps=1000,
                      device="cpu", seed=7)
        trainer = Trainer(TrainConfig.build(flag_values=values), Reporter(enabled=False))
        trainer.setup()
        trainer.run()
    finally:
        torch.set_num_threads(threads)
    adapter = tmp_path / "run"
    code, data, err = _json(cli, adapter, "--base", tiny_dir, "--stats")
    assert code == 0, err
    assert data["base"]["compatible"] and data["base_model_recorded"] == str(tiny_dir)
    assert {g["component"] for g in data["groups"]} == {"backbone", "text", "mimo", "adaptor", "heads"}
    assert all(s["norm"] > 0 and not s["flags"] for s in data["stats"])
    code, out, err = cli("merge", "-m", tiny_dir, "-a", adapter, "-o", tmp_path / "merged", "--verify",
                         "--device", "cpu")
    assert code == 0, err
    assert out.count(" ok") == 2 and f"{len(data['modules'])} of" in out
