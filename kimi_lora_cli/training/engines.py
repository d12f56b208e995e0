"""How a training run's model is built and wrapped: accelerate for processes, devices and reductions;
the model built on the meta device, LoRA-wrapped (or unfrozen), sharded (FSDP2) or partitioned layer
by layer (ZeRO-3), then read straight onto the device; and the name of what really wraps it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kimi_lora_cli.errors import ConfigError
from kimi_lora_cli.training.config import TrainConfig
from kimi_lora_cli.training.output_folder import absolute
from kimi_lora_cli.training.preflight import load_dtype


@dataclass
class Built:
    loaded: Any  # LoadedModel (its .model is the one to train)
    selection: Any  # LoRA target selection (None: full fine-tuning)
    fsdp: Any  # FsdpRun when --fsdp sharded the model


def make_accelerator(cfg: TrainConfig, world: int, has_audio_free: bool) -> tuple[Any, bool]:
    """accelerate's Accelerator for this run (processes, device, autocast, reductions) and whether this
    run created the process group itself (FSDP / DeepSpeed wrap the model in kimi-lora, not in accelerate)."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    handlers = [DistributedDataParallelKwargs(find_unused_parameters=has_audio_free)]
    # Several processes without a GPU are CPU processes (accelerate would take each for a lone one).
    cpu = (cfg.device or "").startswith("cpu") or (world > 1 and not torch.cuda.is_available())
    owns_group = False
    if cfg.fsdp or cfg.deepspeed:  # kimi-lora wraps the model itself (see fsdp.py, zero.py)
        from kimi_lora_cli.training.distributed import init_process_group

        device_type = "cuda" if torch.cuda.is_available() and not cpu else "cpu"
        if cfg.deepspeed:
            from kimi_lora_cli.training.zero import prepare_environment

            prepare_environment(device_type)
            if device_type == "cpu" or "offload" in cfg.deepspeed:
                from kimi_lora_cli.training.fsdp import return_freed_memory

                return_freed_memory()  # ZeRO-3 gathers and frees every layer's weights in host memory too
        owns_group = init_process_group(device_type)
        if cfg.deepspeed:
            from kimi_lora_cli.training.zero import attach_process_group

            attach_process_group()
    precision = "bf16" if cfg.bf16 else "fp16" if cfg.fp16 else "no"
    accelerator = Accelerator(mixed_precision=precision, cpu=cpu, kwargs_handlers=handlers)
    kind = str(accelerator.distributed_type)
    if kind.endswith("FSDP"):
        raise ConfigError("accelerate is set up for FSDP but kimi-lora was not: run `kimi-lora train --fsdp` "
                          "or `accelerate launch --use_fsdp --fsdp_version 2`")
    if kind.endswith("DEEPSPEED"):
        raise ConfigError("accelerate is set up for DeepSpeed but kimi-lora was not: run `kimi-lora train "
                          "--deepspeed zero3` or `accelerate launch --use_deepspeed`")
    return accelerator, owns_group


def load_for_training(cfg: TrainConfig, weights: Path, base: Path | None, device: Any, ds_config: dict | None) -> Built:
    """Build on the meta device, wrap LoRA (or unfreeze everything), shard with --fsdp, then read
    each parameter's own rows straight onto the device; adapters get their seeded start."""
    from kimi_lora_cli.loading import load_model
    from kimi_lora_cli.training import fsdp

    wrapped: dict[str, Any] = {}
    settings = fsdp.settings(cfg) if cfg.fsdp else None
    zero3 = ds_config is not None and ds_config["zero_optimization"]["stage"] == 3

    def prepare(inner: Any) -> Any:
        if cfg.gradient_checkpointing:
            inner.gradient_checkpointing_enable()
        inner.run_every_module = bool(cfg.deepspeed)  # same collectives on every rank (modeling.py)
        model = inner
        if cfg.lora_enabled:
            from kimi_lora_cli.training.lora import wrap_lora

            model, wrapped["selection"] = wrap_lora(inner, cfg, base_path=absolute(str(weights)))
            if cfg.quantization:
                from kimi_lora_cli.training.lora import prepare_quantized

                prepare_quantized(inner, cfg.gradient_checkpointing)
        else:
            inner.requires_grad_(True)
        if settings is not None:
            fsdp.shard_model(inner, settings, device)
            wrapped["fsdp"] = fsdp.FsdpRun(inner, settings)
        if zero3:  # each layer read, started and partitioned in turn (the later reads skip them)
            from kimi_lora_cli.loading import inspect_folder
            from kimi_lora_cli.sharded import fill_from_file
            from kimi_lora_cli.training.zero import partition_in_units

            files = inspect_folder(weights, base_path=base).weight_files
            wrapped["started"] = partition_in_units(
                inner, model, ds_config, device, lambda wanted: [fill_from_file(f, wanted) for f in files],
                cfg.seed)
        return model

    loaded = load_model(weights, dtype=load_dtype(cfg), device=device, base_path=base, prepare=prepare,
                             quantization=cfg.quantization, double_quant=cfg.double_quant)
    selection = wrapped.get("selection")
    if selection is not None:
        from kimi_lora_cli.sharded import checkpoint_key
        from kimi_lora_cli.training.lora import init_adapter_weights

        done = wrapped.get("started") if zero3 else init_adapter_weights(loaded.model, cfg.seed)
        unset = [n for n, p in loaded.model.named_parameters() if checkpoint_key(n) is None
                 and id(p) not in done]
        if unset:  # a peft adapter kind this trainer does not know how to start
            raise ConfigError(f"no starting values for adapter weights {', '.join(unset[:3])}; "
                              "train plain LoRA / DoRA targets")
    return Built(loaded, selection, wrapped.get("fsdp"))


def engine_name(model: Any, engine: Any, fsdp_run: Any) -> str:
    """What really wraps the model (read from the wrapper, never from the flags)."""
    from torch.nn.parallel import DistributedDataParallel

    if engine is not None:
        from kimi_lora_cli.training.zero import describe

        return describe(engine)
    if fsdp_run is not None:
        return "FSDP" + (", CPU offload" if fsdp_run.settings.cpu_offload else "")
    return "DDP" if isinstance(model, DistributedDataParallel) else "single process"
