"""Accelerate set-up: process rank before start-up, DeepSpeed config filling, gathering under ZeRO-3 / FSDP."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from kimi_lora_cli.errors import ConfigError
from kimi_lora_cli.training.config import TrainConfig


def env_rank() -> int:
    """Global rank from the launcher's environment (before any process group exists)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def env_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


SHIPPED_DEEPSPEED = {"zero2": "ds_zero2.json", "zero3": "ds_zero3.json"}


def shipped_deepspeed_config(name: str) -> Path | None:
    """`--deepspeed zero2|zero3` names the configs shipped in kimi_lora_cli/configs/."""
    file = SHIPPED_DEEPSPEED.get(name.lower().removesuffix(".json").replace("ds_", ""))
    return Path(__file__).resolve().parents[1] / "configs" / file if file else None


def deepspeed_config(cfg: TrainConfig, world: int) -> dict[str, Any]:
    """The user's DeepSpeed JSON with every "auto" filled from the flags (so no dataloader is needed)."""
    path = shipped_deepspeed_config(cfg.deepspeed) or Path(cfg.deepspeed).expanduser()
    try:
        ds = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: DeepSpeed config not found") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ConfigError(f"{path}: remove the \"{section}\" section; kimi-lora builds AdamW and the "
                              "learning-rate schedule from its flags")
    micro, accum = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps

    def fill(key: str, value: Any) -> None:
        if ds.get(key, "auto") == "auto":
            ds[key] = value

    fill("train_micro_batch_size_per_gpu", micro)
    fill("gradient_accumulation_steps", accum)
    fill("train_batch_size", micro * accum * world)
    fill("gradient_clipping", cfg.max_grad_norm)
    if ds["train_micro_batch_size_per_gpu"] != micro or ds["gradient_accumulation_steps"] != accum:
        raise ConfigError(f"{path}: batch settings disagree with --per-device-train-batch-size {micro} / "
                          f"--gradient-accumulation-steps {accum}; set them to \"auto\"")
    for key, on in (("bf16", cfg.bf16), ("fp16", cfg.fp16)):
        section = ds.setdefault(key, {})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = on
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage") == 3:
        # The final save must gather the real weights, never the empty local shards.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    for key, value in list(zero.items()):
        if value == "auto":
            zero.pop(key)
    return ds


def zero_stage(accelerator: Any) -> int:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return int(plugin.zero_stage) if plugin is not None else 0


def gathered_named_parameters(model: Any, accelerator: Any, only_trainable: bool = True) -> dict[str, Any]:
    """{name: full CPU tensor} for the (trainable) parameters of the unwrapped model; under ZeRO-3
    the partitioned parameters are gathered first, so nothing saved is an empty shard. FSDP shards
    are gathered one tensor at a time (every process takes part) and kept by the main process only
    (the others get {})."""
    from kimi_lora_cli.sharded import full_tensor, is_sharded

    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad or not only_trainable]
    if any(is_sharded(p) for _, p in params):
        keep = accelerator.is_main_process
        out = {}
        for n, p in params:
            t = full_tensor(p.detach())
            if keep:
                out[n] = t.to("cpu") if is_sharded(p) else t.to("cpu").clone()
        return out
    if zero_stage(accelerator) == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
            return {n: p.detach().to("cpu").clone() for n, p in params}
    return {n: p.detach().to("cpu").clone() for n, p in params}
