"""Process set-up shared by the engines: rank before start-up, the process group, DeepSpeed config
filling, and gathering full tensors under ZeRO-3 / FSDP."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from kimi_lora_cli.errors import ConfigError
from kimi_lora_cli.training.config import TrainConfig


def env_rank() -> int:
    """Global rank from the launcher's environment (before any process group exists)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def env_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


SHIPPED_DEEPSPEED = {"zero2": "ds_zero2.json", "zero3": "ds_zero3.json", "zero2_offload": "ds_zero2_offload.json",
                     "zero3_offload": "ds_zero3_offload.json"}


def shipped_deepspeed_config(name: str) -> Path | None:
    """`--deepspeed zero2|zero3|zero2_offload|zero3_offload` names the configs shipped in
    kimi_lora_cli/configs/ (also spelt ds_zero3.json, zero3-offload)."""
    key = name.lower().removesuffix(".json").replace("-", "_")
    file = SHIPPED_DEEPSPEED.get(key.removeprefix("ds_"))
    return Path(__file__).resolve().parents[1] / "configs" / file if file else None


def init_process_group(device_type: str) -> bool:
    """Make sure a process group exists (FSDP and DeepSpeed need one, also for a single process). On
    GPUs, collectives on CPU tensors (the gradient norm under CPU offload) go through gloo. Returns
    True when this call created it (and the caller must destroy it)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    backend = "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"
    if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
        if device_type == "cuda":
            import torch

            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    return True


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
    if ds["train_batch_size"] != micro * accum * world:
        raise ConfigError(f"{path}: train_batch_size {ds['train_batch_size']} is not {micro} per device x {accum} "
                          f"accumulation x {world} processes; set it to \"auto\"")
    for key, on in (("bf16", cfg.bf16), ("fp16", cfg.fp16)):
        section = ds.setdefault(key, {})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = on
        elif bool(section["enabled"]) != on:
            raise ConfigError(f"{path}: {key}.enabled is {str(section['enabled']).lower()} but --{key} is "
                              f"{'on' if on else 'off'}; set it to \"auto\" (or pass --{key})")
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage") == 3:
        # The final save must gather the real weights, never the empty local shards.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    for key, value in list(zero.items()):
        if value == "auto" and key not in MODEL_SIZED:  # filled by fill_model_sizes once the model is known
            zero.pop(key)
    _check_supported(ds, zero, path)
    if any(_offload_device(zero, k) == "cpu" for k in ("offload_optimizer", "offload_param")):
        # kimi-lora's own AdamW steps the CPU partitions (DeepSpeed's CPU Adam needs a compiled op)
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    return ds


MODEL_SIZED = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
               "stage3_max_live_parameters", "stage3_max_reuse_distance")


def fill_model_sizes(ds: dict[str, Any], config: Any) -> dict[str, Any]:
    """Fill the ZeRO sizes left "auto" from the model's shape: buckets of hidden^2 elements (as the HF
    Trainer does), weights under 10 x hidden kept whole, and at most two decoder layers' weights
    gathered at a time (with gradient checkpointing, DeepSpeed's default of 1e9 would keep a whole
    smaller model gathered on every process)."""
    h = config.hidden_size
    kv = config.num_key_value_heads * (getattr(config, "head_dim", None) or h // config.num_attention_heads)
    layer = 2 * h * h + 2 * h * kv + 3 * h * config.intermediate_size
    sizes = {"reduce_bucket_size": h * h, "stage3_prefetch_bucket_size": int(0.9 * h * h),
             "stage3_param_persistence_threshold": 10 * h, "stage3_max_live_parameters": min(2 * layer, 10**9),
             "stage3_max_reuse_distance": min(2 * layer, 10**9)}
    zero = ds.get("zero_optimization", {})
    for key in MODEL_SIZED:
        if zero.get(key) == "auto":
            zero[key] = sizes[key]
    return ds


def _offload_device(zero: dict[str, Any], key: str) -> str:
    section = zero.get(key) or {}
    return str(section.get("device", "none")).lower() if isinstance(section, dict) else "none"


def _check_supported(ds: dict[str, Any], zero: dict[str, Any], path: Path) -> None:
    """Refuse what kimi-lora does not drive: ZeRO stages other than 2 and 3, NVMe offload, parameter
    offload below stage 3, and checkpoint formats whose loaders unpickle arbitrary objects."""
    stage = zero.get("stage", 0)
    if stage not in (2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage {stage} is not supported; kimi-lora trains with "
                          "ZeRO stage 2 or 3 (without --deepspeed it trains with plain DDP)")
    for key in ("offload_optimizer", "offload_param"):
        device = _offload_device(zero, key)
        if device not in ("none", "cpu"):
            raise ConfigError(f"{path}: zero_optimization.{key}.device {device!r} is not supported; offload to "
                              "\"cpu\" (or remove the section)")
    if stage == 2 and _offload_device(zero, "offload_param") != "none":
        raise ConfigError(f"{path}: offload_param needs ZeRO stage 3; use --deepspeed zero3_offload or remove "
                          "offload_param")
    checkpoint = ds.get("checkpoint") or {}
    if checkpoint.get("load_universal") or checkpoint.get("writer") or (ds.get("datastates") or {}).get("enabled"):
        raise ConfigError(f"{path}: remove the checkpoint writer / universal-checkpoint / datastates settings; "
                          "kimi-lora saves and reads DeepSpeed checkpoints with its own safe reader")


def is_zero3(p: Any) -> bool:
    """A parameter partitioned by DeepSpeed ZeRO-3 (its local tensor is empty; `ds_tensor` holds its part)."""
    return hasattr(p, "ds_id")


def full_numel(p: Any) -> int:
    """Element count of the whole parameter (a ZeRO-3 parameter's own tensor is empty)."""
    return int(p.ds_numel) if is_zero3(p) else p.numel()


def gathered_named_parameters(model: Any, accelerator: Any, only_trainable: bool = True) -> dict[str, Any]:
    """{name: full CPU tensor} for the (trainable) parameters of the unwrapped model. Sharded
    parameters (FSDP DTensors, ZeRO-3 partitions) are gathered one tensor at a time (every process
    takes part) and kept by the main process only (the others get {}), so nothing saved is an empty
    shard and no process holds more than the result plus one gathered tensor."""
    from kimi_lora_cli.sharded import full_tensor, is_sharded

    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad or not only_trainable]
    if not any(is_sharded(p) or is_zero3(p) for _, p in params):
        return {n: p.detach().to("cpu").clone() for n, p in params}
    keep = accelerator.is_main_process
    out = {}
    for n, p in params:
        if is_zero3(p):
            import deepspeed

            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if keep:
                    out[n] = p.detach().to("cpu").clone()
            continue
        t = full_tensor(p.detach())
        if keep:
            out[n] = t.to("cpu") if is_sharded(p) else t.to("cpu").clone()
    return out
