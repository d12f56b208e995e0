"""Adapters saved the way the official LoRA recipe saves them load in every command.

The official `finetune_codes/lora_config.py` builds `LoraConfig(task_type=CAUSAL_LM, ...)` over explicit
module names (main and mimo attention, the two vq_adaptor linears, lm_head, mimo_output; its default of 8
mimo layers names two that do not exist), wraps the model with `get_peft_model` and calls
`save_pretrained`, which also stores the whole `lm_head` base weight (peft saves a targeted embedding
layer), plus a `lora_config.json` of its own arguments next to the adapter.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from _infer_data import write_asr_data
from adapter_helpers import build_tiny_qwen, make_adapter


def official_target_modules(config) -> list[str]:
    names = []
    for i in range(config.num_hidden_layers):
        names += [f"model.layers.{i}.self_attn.{s}" for s in ("q_proj", "k_proj", "v_proj", "o_proj")]
    for i in range(8):  # the official default num_mimo_layers (the release has 6)
        names += [f"model.mimo_layers.{i}.self_attn.{s}" for s in ("q_proj", "k_proj", "v_proj", "o_proj")]
    return names + ["model.vq_adaptor.layers.0", "model.vq_adaptor.layers.3", "lm_head", "mimo_output"]


@pytest.fixture(scope="module")
def official(tiny_dir, tmp_path_factory):
    """(peft model in memory, safetensors adapter folder, .bin adapter folder)."""
    from peft import LoraConfig, get_peft_model

    from kimi_lora_cli.loading import load_model

    root = tmp_path_factory.mktemp("official")
    model = load_model(tiny_dir, dtype="float32", load_whisper=False).model
    config = LoraConfig(r=8, lora_alpha=16, target_modules=official_target_modules(model.config),
                        lora_dropout=0.05, bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    folders = []
    for name, safe in (("lora_weights", True), ("lora_weights_bin", False)):
        folder = root / name
        with pytest.warns(UserWarning, match="save_embedding_layers"):
            peft_model.save_pretrained(str(folder), safe_serialization=safe)
        (folder / "lora_config.json").write_text(json.dumps({"lora_r": 8, "lora_alpha": 16}))
        folders.append(folder)
    peft_model.eval()
    return peft_model, folders[0], folders[1]


def _with_task_type(src, dst, task_type):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    if task_type == "absent":
        cfg.pop("task_type")
    else:
        cfg["task_type"] = task_type
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def test_saved_like_the_official_recipe(official):
    from safetensors import safe_open

    _, folder, bin_folder = official
    assert json.loads((folder / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        assert [k for k in f.keys() if "lora_" not in k] == ["base_model.model.lm_head.base_layer.weight"]
    assert (bin_folder / "adapter_model.bin").is_file()


@pytest.mark.parametrize("task_type", ["CAUSAL_LM", None, "absent", "SEQ_2_SEQ_LM"])
def test_load_model_gives_the_peft_models_logits(official, tiny_dir, tmp_path, task_type):
    from kimi_lora_cli.loading import load_model

    peft_model, folder, _ = official
    adapter = _with_task_type(folder, tmp_path / "a", task_type)
    loaded = load_model(tiny_dir, dtype="float32", adapters=[("a", adapter)])
    ids = torch.tensor([[3, 17, 99, 5, 250, 7]])
    with torch.no_grad():
        want = peft_model(input_ids=ids)
        got = loaded.model(input_ids=ids)
    assert torch.equal(got.text_logits, want.text_logits) and torch.equal(got.audio_logits, want.audio_logits)


def test_pickle_adapter_loads_with_allow_pickle(official, tiny_dir):
    from kimi_lora_cli.errors import AdapterError
    from kimi_lora_cli.loading import load_model

    peft_model, folder, bin_folder = official
    with pytest.raises(AdapterError, match="--allow-pickle"):
        load_model(tiny_dir, dtype="float32", adapters=[("b", bin_folder)])
    both = load_model(tiny_dir, dtype="float32", adapters=[("s", folder), ("b", bin_folder)], allow_pickle=True)
    ids = torch.tensor([[3, 17, 99]])
    with torch.no_grad():
        want = peft_model(input_ids=ids).text_logits
        both.model.set_adapter("b")
        assert torch.equal(both.model(input_ids=ids).text_logits, want)


def test_inspect_merge_verify_and_infer(official, tiny, tiny_dir, tmp_path, cli):
    _, folder, bin_folder = official
    code, out, err = cli("inspect-adapter", folder, "--base", tiny_dir)
    assert code == 0, err
    assert "Base check: fits" in out and "lm_head.weight" in out  # the saved whole head is named
    code, out, err = cli("merge", "-m", tiny_dir, "-a", folder, "-o", tmp_path / "merged", "--verify")
    assert code == 0, err
    assert out.count(" ok") == 2
    code, _, err = cli("merge", "-m", tiny_dir, "-a", bin_folder, "-o", tmp_path / "merged_bin", "--verify",
                       "--allow-pickle")
    assert code == 0, err

    data = write_asr_data(tmp_path / "data", tiny.config, n=3)
    with_adapter, merged = tmp_path / "adapter.jsonl", tmp_path / "merged.jsonl"
    code, _, err = cli("infer", "-m", tiny_dir, "-d", data, "-o", with_adapter, "--adapter", folder,
                       "--max-new-tokens", "6")
    assert code == 0, err
    code, _, err = cli("infer", "-m", tmp_path / "merged", "-d", data, "-o", merged, "--max-new-tokens", "6")
    assert code == 0, err
    tokens = [[json.loads(line)["text_tokens"] for line in p.read_text().splitlines()] for p in (with_adapter, merged)]
    assert tokens[0] == tokens[1] and len(tokens[0]) == 3


def test_plain_llm_adapter_with_any_task_type(tmp_path):
    from kimi_lora_cli.loading import load_model

    base = build_tiny_qwen(tmp_path / "qwen")
    saved = make_adapter(base, tmp_path / "causal", ["q_proj", "v_proj"], task_type="CAUSAL_LM")
    ids = torch.arange(8)[None]
    logits = []
    for task_type in ("CAUSAL_LM", None, "absent"):
        adapter = _with_task_type(saved, tmp_path / f"a_{task_type}", task_type)
        with torch.no_grad():
            logits.append(load_model(base, dtype="float32", adapters=[("a", adapter)]).model(ids).logits)
    assert torch.equal(logits[0], logits[1]) and torch.equal(logits[0], logits[2])
    with torch.no_grad():
        plain = load_model(base, dtype="float32").model(ids).logits
    assert not torch.allclose(plain, logits[0])
