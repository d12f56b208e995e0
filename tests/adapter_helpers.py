"""Adapters made directly with peft on tiny real checkpoints, and peft's own merge as the reference."""

from __future__ import annotations

import json
from pathlib import Path


def make_adapter(base_dir: Path, out: Path, target: str | list[str] = "all", *, seed: int = 1,
                 randomize: bool = True, task_type: str | None = None, **lora_kwargs) -> Path:
    """get_peft_model on the real tiny model, lora_B (and DoRA / token / saved-module weights) randomised."""
    import torch
    from peft import LoraConfig, get_peft_model

    from kimi_lora_cli.loading import load_model
    from kimi_lora_cli.targets import linear_entries, resolve_targets

    loaded = load_model(base_dir, dtype="float32", load_whisper=False, load_tokenizer_=False)
    names = target if isinstance(target, list) else resolve_targets(linear_entries(loaded.model), target).names
    config = LoraConfig(r=lora_kwargs.pop("r", 4), lora_alpha=lora_kwargs.pop("lora_alpha", 8),
                        target_modules=names, task_type=task_type, **lora_kwargs)
    model = get_peft_model(loaded.model, config)
    if randomize:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if any(k in name for k in ("lora_B", "lora_embedding_B", "magnitude", "trainable_tokens",
                                           "modules_to_save", "base_layer.bias")) and p.requires_grad:
                    p.add_(0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(str(out))
    return out


def peft_merged(base_dir: Path, adapters: list[Path], weights: list[float] | None = None,
                dtype: str = "auto") -> dict:
    """State dict of base + adapters (base dtype) after peft's merge_and_unload (weights scale each)."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    from kimi_lora_cli.loading import load_model

    loaded = load_model(base_dir, dtype=dtype, load_whisper=False, load_tokenizer_=False)
    names = [f"a{i}" for i in range(len(adapters))]
    model = PeftModel.from_pretrained(loaded.model, str(adapters[0]), adapter_name=names[0])
    for name, path in zip(names[1:], adapters[1:]):
        model.load_adapter(str(path), adapter_name=name)
    if weights:
        for module in model.modules():
            if isinstance(module, LoraLayer):
                for name, w in zip(names, weights):
                    if name in module.scaling:
                        module.scaling[name] *= w
    return {k: v.clone() for k, v in model.merge_and_unload(adapter_names=names).state_dict().items()}


def build_tiny_qwen(folder: Path, tie: bool = False) -> Path:
    """A plain Hugging Face text LLM (random Qwen2ForCausalLM) saved with save_pretrained."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    Qwen2ForCausalLM(cfg).save_pretrained(str(folder))
    return folder


def write_adapter(folder: Path, tensors: dict, config: dict | None = None) -> Path:
    """An adapter folder written by hand (for broken ones peft would never save)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "peft_version": "0.21.2"}
    cfg.update(config or {})
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    save_file({f"base_model.model.{k}": v.contiguous() for k, v in tensors.items()},
              str(folder / "adapter_model.safetensors"))
    return folder


def assert_complete_and_loadable(cli, base_dir: Path, folder: Path) -> None:
    """A trained adapter is complete: `inspect-adapter` finds no empty tensor, and plain peft loads it
    over the base with exactly the tensors of its safetensors file."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    from kimi_lora_cli.loading import load_model

    code, out, _ = cli("inspect-adapter", folder, "--stats", "--json")
    report = json.loads(out)
    assert code == 0 and report["ok"] and not any("empty" in s["flags"] for s in report["stats"])
    saved = load_file(str(folder / "adapter_model.safetensors"))
    peft_model = PeftModel.from_pretrained(load_model(base_dir, dtype="float32", load_whisper=False).model, str(folder))
    loaded = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    assert len(loaded) == len(saved)
    for n, p in loaded.items():
        assert torch.equal(p.detach(), saved[n.replace(".default.", ".")]), n
