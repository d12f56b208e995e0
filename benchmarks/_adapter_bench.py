"""Shared by the adapter benchmarks: measured child processes and random peft-format adapters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

WRAPPER = (
    "import resource, subprocess, sys, time\n"
    "t = time.perf_counter()\n"
    "p = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)\n"
    "dt = time.perf_counter() - t\n"
    "rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024\n"
    "sys.stderr.write(p.stderr[-2000:] if p.returncode else '')\n"
    "print(f'{p.returncode} {dt} {rss}')\n"
)


def measure(cmd: list[str], repeat: int = 1, before=None) -> tuple[float, float]:
    """Best wall time (s) and peak RSS (MB) of `cmd` run in a fresh process (`before()` runs first)."""
    best, peak = float("inf"), 0.0
    for _ in range(repeat):
        if before:
            before()
        proc = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], capture_output=True, text=True,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        rc, dt, rss = proc.stdout.split()
        if rc != "0":
            raise SystemExit(f"command failed ({rc}): {' '.join(cmd)}\n{proc.stderr}")
        best, peak = min(best, float(dt)), max(peak, float(rss))
    return best, peak


def write_random_adapter(folder: Path, shapes: dict[str, tuple[int, int]], r: int, dtype: str = "float32",
                         seed: int = 0) -> Path:
    """A peft LoRA adapter (adapter_config.json + adapter_model.safetensors) with random A and B.

    `shapes` maps module name -> (out_features, in_features), as in the base checkpoint."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)
    tensors = {}
    for name, (out_f, in_f) in shapes.items():
        prefix = f"base_model.model.{name}"
        tensors[f"{prefix}.lora_A.weight"] = (torch.randn(r, in_f, generator=g) / in_f**0.5).to(dt)
        tensors[f"{prefix}.lora_B.weight"] = (0.01 * torch.randn(out_f, r, generator=g)).to(dt)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "peft_version": "0.21.2", "task_type": None, "r": r, "lora_alpha": 2 * r,
        "lora_dropout": 0.05, "bias": "none", "use_rslora": False, "use_dora": False, "fan_in_fan_out": False,
        "target_modules": sorted(shapes), "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
        "base_model_name_or_path": None, "inference_mode": True, "init_lora_weights": True,
        "auto_mapping": {"base_model_class": "KimiAudioForCausalLM",
                         "parent_library": "kimi_lora_cli.models.kimi_audio.modeling"},
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder


def kimi_linear_shapes(cfg) -> dict[str, tuple[int, int]]:
    """Every LoRA-targetable linear layer of a Kimi-Audio config (`all`: layers, mimo, adaptor)."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    per_layer = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
                 "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h),
                 "mlp.down_proj": (h, i)}
    shapes = {}
    for stack, n in (("layers", cfg.num_hidden_layers), ("mimo_layers", cfg.kimia_mimo_layers)):
        for layer in range(n):
            for mod, shape in per_layer.items():
                shapes[f"model.{stack}.{layer}.{mod}"] = shape
    shapes["model.vq_adaptor.layers.0"] = (h, cfg.kimia_adaptor_input_dim)
    shapes["model.vq_adaptor.layers.3"] = (h, h)
    return shapes


def warm_page_cache(paths: list[Path]) -> None:
    """Read the files once so every contender starts from a warm page cache."""
    for p in paths:
        for f in (p.rglob("*") if p.is_dir() else [p]):
            if f.is_file():
                with open(f, "rb") as fh:
                    while fh.read(64 << 20):
                        pass
