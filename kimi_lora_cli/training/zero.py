"""DeepSpeed ZeRO-2/3 for `kimi-lora train --deepspeed`: the engine, its safe checkpoint reader, the
ZeRO-3 build that never holds a full model per process, and the settings of `accelerate launch
--use_deepspeed` mapped onto --deepspeed.

kimi-lora calls `deepspeed.initialize` itself rather than through `Accelerator.prepare`: accelerate
(1.16) drives DeepSpeed only on accelerators (on the CPU it silently falls back to DDP), so the same
code now runs on the CPU (DeepSpeed's cpu accelerator over gloo, the tests) and on GPUs (NCCL).
accelerate still provides processes, devices, autocast and reductions.

DeepSpeed's own checkpoint reader unpickles whatever its files hold (`torch.load(weights_only=False)`);
the engine gets a reader that accepts tensors, containers and the three DeepSpeed classes its files
hold, nothing else, so a crafted file in `checkpoint-N/deepspeed/` is refused before it can run.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kimi_lora_cli.errors import ConfigError
from kimi_lora_cli.training.config import TrainConfig

INSTALL = "pip install 'kimi-lora[deepspeed]'"
TAG_RE = re.compile(r"^global_step\d+$")  # the only checkpoint tags kimi-lora writes


def require_deepspeed(value: str) -> None:
    """One line naming the extra when DeepSpeed is not installed (checked without importing it)."""
    import importlib.util
    import sys

    try:
        missing = sys.modules.get("deepspeed", False) is None or importlib.util.find_spec("deepspeed") is None
    except (ImportError, ValueError):
        missing = True
    if missing:
        raise ConfigError(f"--deepspeed {value} needs DeepSpeed, which is not installed: {INSTALL} (or train "
                          "without --deepspeed; --fsdp also shards the model and needs nothing extra)")


def prepare_environment(device_type: str) -> None:
    """Before DeepSpeed is imported: its accelerator follows --device (not whatever it detects), a
    single process gets the LOCAL_RANK DeepSpeed insists on, and its INFO logging is kept quiet."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device_type == "cuda" else "cpu")
    os.environ.setdefault("LOCAL_RANK", "0")
    import logging
    import warnings

    import deepspeed

    if os.environ.get("KIMI_LORA_DEBUG", "").lower() in ("", "0", "false", "no"):
        deepspeed.utils.logger.setLevel(logging.WARNING)
        # The model's output object holds its logits; the modules whose weights ZeRO-3 gathers (all
        # below the root, which has none of its own) see plain tensors, so this warning is moot here.
        deepspeed.utils.logger.addFilter(lambda record: "unknown inputs or outputs type" not in record.getMessage())
    # DeepSpeed calls the older names of two collectives on every step
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` "
                            "is deprecated", category=FutureWarning)


def attach_process_group() -> None:
    """Hand DeepSpeed the process group kimi-lora created (its partitioning, before the engine
    exists, must see the real world size)."""
    import contextlib
    import sys

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    _tolerate_missing_compiler()
    # (on the CPU it builds its shared-memory op and says so on stdout, which holds only results here)
    with contextlib.redirect_stdout(sys.stderr):
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                                   dist_init_required=False)


def _tolerate_missing_compiler() -> None:
    """DeepSpeed's cpu accelerator compiles a shared-memory all-reduce when its backend starts (an
    optimisation for inference); on a machine without a C++ toolchain, train without it instead of
    failing."""
    import importlib

    ds_torch = importlib.import_module("deepspeed.comm.torch")  # (the package re-exports the name torch)

    build = ds_torch.build_shm_op
    if getattr(build, "kimi_lora_tolerant", False):
        return

    def tolerant() -> Any:
        try:
            return build()
        except Exception:  # noqa: BLE001 - any build failure only loses the optimisation
            return None

    tolerant.kimi_lora_tolerant = True
    ds_torch.build_shm_op = tolerant


# -- the engine ----------------------------------------------------------------------------------
def initialize(model: Any, optimizer: Any, ds_config: dict[str, Any]) -> Any:
    """The DeepSpeedEngine around `model`, stepping kimi-lora's AdamW (its learning rate is set by
    kimi-lora's schedule, stepped once per optimizer step), with the safe checkpoint reader."""
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, dist_init_required=False)
    engine.checkpoint_engine = safe_checkpoint_engine(engine._config)
    return engine


def describe(engine: Any) -> str:
    """`DeepSpeed ZeRO-3, CPU offload (optimizer, parameters)` for the banner, read from the engine."""
    text = f"DeepSpeed ZeRO-{engine.zero_optimization_stage()}"
    offloaded = [what for what, on in (("optimizer", engine.zero_offload_optimizer()),
                                       ("parameters", engine.zero_offload_param())) if on]
    return text + (f", CPU offload ({', '.join(offloaded)})" if offloaded else "")


# -- checkpoints ---------------------------------------------------------------------------------
def safe_globals() -> list[Any]:
    """The DeepSpeed classes its checkpoint files hold (data holders: a loss scaler's numbers, the stage
    enum, a fragment's start and size); everything else in them is tensors, numbers and containers."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_checkpoint_engine(config_params: Any) -> Any:
    """DeepSpeed's torch checkpoint engine with a reader that never unpickles arbitrary objects."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from kimi_lora_cli.training.checkpoints.folder import load_torch_file

    class SafeCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location: Any = None) -> Any:
            return load_torch_file(Path(path), extra_safe=safe_globals())

    return SafeCheckpointEngine(config_params)


def checkpoint_tag(folder: Path, world: int) -> str:
    """The tag of the DeepSpeed state in `folder` (checkpoint-N/deepspeed), checked: a name kimi-lora
    writes, and one partition file per process of this run."""
    latest = folder / "latest"
    try:
        tag = latest.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        raise ConfigError(f"{folder.parent}: no DeepSpeed state ({latest} is missing or unreadable); resume "
                          "from a checkpoint of a --deepspeed run") from None
    if not TAG_RE.match(tag) or not (folder / tag).is_dir():
        raise ConfigError(f"{latest}: names {tag[:40]!r}, not a global_stepN folder next to it; resume from "
                          "another checkpoint")
    ranks = len(list((folder / tag).glob("*zero_pp_rank_*_optim_states.pt")))
    if ranks != world:
        raise ConfigError(f"{folder / tag}: DeepSpeed state of {ranks} processes, this run has {world}; resume "
                          f"with {ranks} processes (--num-processes {ranks})")
    return tag


# -- ZeRO-3: build partitioned -------------------------------------------------------------------
def partition_in_units(inner: Any, model: Any, ds_config: dict[str, Any], device: Any,
                       fill: Callable[[dict[str, list[Any]]], None], seed: int) -> set[int]:
    """ZeRO-3 without a full model per process: `inner` (built on the meta device; `model` is it or its
    peft wrapper) is materialised one unit at a time (each decoder layer, each head, then the rest),
    `fill({checkpoint key: [parameters]})` writes the unit's base weights (the trainer reads them from
    the checkpoint files), its adapters get their seeded start, and DeepSpeed
    partitions it at once, freeing the full tensors before the next unit is allocated. Peak memory:
    this process's partitions plus one unit. Returns the ids of the adapter weights it started."""
    import deepspeed
    import torch

    from kimi_lora_cli.sharded import checkpoint_key
    from kimi_lora_cli.training.fsdp import units
    from kimi_lora_cli.training.lora import init_adapter_weights

    keys = {id(p): checkpoint_key(n) for n, p in model.named_parameters(remove_duplicate=False)}
    started: set[int] = set()
    converted: list[Any] = []
    seen: set[int] = set()
    for unit in [*units(inner), inner]:
        fresh: list[Any] = []
        modules = [m for m in unit.modules() if id(m) not in seen]  # the root: what no unit before held
        seen |= {id(m) for m in modules}
        for module in modules:
            for name, p in list(module.named_parameters(recurse=False)):
                if p.is_meta:
                    real = torch.nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
                    keys[id(real)] = keys.get(id(p))
                    module.register_parameter(name, real)
                    fresh.append(real)
        if not fresh:
            continue
        wanted: dict[str, list[Any]] = {}
        for p in fresh:
            if keys.get(id(p)) is not None:
                wanted.setdefault(keys[id(p)], []).append(p)
        fill(wanted)
        started |= init_adapter_weights(model, seed, within=modules)
        if converted:
            converted[0].convert_to_zero_parameters(param_list=fresh)
        else:
            deepspeed.zero.Init(module=unit, config_dict_or_path=ds_config)
        converted.extend(fresh)
    return started


# -- accelerate launch --use_deepspeed -----------------------------------------------------------
def from_launcher(cfg: TrainConfig) -> tuple[TrainConfig, list[str]]:
    """Under `accelerate launch --use_deepspeed` (ACCELERATE_USE_DEEPSPEED=true) the run becomes
    --deepspeed: accelerate's config file, or its stage and offload as a shipped config (zero2,
    zero3, zero2_offload, zero3_offload); its accumulation, clipping and precision when the flags left
    them at their defaults. Settings kimi-lora cannot honour are refused, those it does differently are
    named in a note. Returns (config, notes)."""
    env = os.environ
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() not in ("true", "1"):
        return cfg, []
    if cfg.fsdp:
        raise ConfigError("accelerate launch --use_deepspeed and --fsdp both ask for the engine; pick one")
    notes: list[str] = []
    changes: dict[str, Any] = {}
    file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    stage_given = "ACCELERATE_DEEPSPEED_ZERO_STAGE" in env
    if file.lower() != "none":
        if cfg.deepspeed and Path(cfg.deepspeed).expanduser().resolve() != Path(file).expanduser().resolve():
            raise ConfigError(f"accelerate's deepspeed_config_file {file} and --deepspeed {cfg.deepspeed} "
                              "disagree; pass one of them")
        changes["deepspeed"] = file
    elif cfg.deepspeed:
        if stage_given:
            notes.append(f"--deepspeed {cfg.deepspeed} is used; accelerate's zero_stage and offload settings are not")
    else:
        stage = int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))
        if stage not in (2, 3):
            raise ConfigError(f"accelerate's DeepSpeed config asks for ZeRO stage {stage}; kimi-lora trains with "
                              "stage 2 or 3: set zero_stage: 2 or 3 (accelerate launch --zero_stage 3), or launch "
                              "without --use_deepspeed for plain DDP")
        devices = {what: env.get(f"ACCELERATE_DEEPSPEED_OFFLOAD_{what.upper()}_DEVICE", "none").lower()
                   for what in ("optimizer", "param")}
        for what, device in devices.items():
            if device not in ("none", "cpu"):
                raise ConfigError(f"accelerate's DeepSpeed config offloads the {what} to {device!r}; kimi-lora "
                                  f"offloads to the CPU only: set offload_{what}_device: cpu (or none)")
        if stage == 2 and devices["param"] == "cpu":
            raise ConfigError("accelerate's DeepSpeed config offloads parameters under ZeRO stage 2; parameter "
                              "offload needs zero_stage: 3 (or set offload_param_device: none)")
        offload = "cpu" in devices.values()
        if stage == 3 and offload and set(devices.values()) != {"cpu"}:
            notes.append("accelerate DeepSpeed config: kimi-lora's zero3_offload keeps both the optimizer state "
                         "and the parameters in CPU memory")
        changes["deepspeed"] = f"zero{stage}" + ("_offload" if offload else "")
    gas = env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "auto")
    if gas.lower() not in ("auto", "none"):
        changes.update(_honour("gradient_accumulation_steps", int(gas), cfg, 1))
    clip = env.get("ACCELERATE_GRADIENT_CLIPPING", "auto")
    if clip.lower() not in ("auto", "none"):
        changes.update(_honour("max_grad_norm", float(clip), cfg, 1.0))
    precision = env.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if precision in ("bf16", "fp16") and not getattr(cfg, precision):
        other = "fp16" if precision == "bf16" else "bf16"
        if getattr(cfg, other):
            raise ConfigError(f"accelerate's mixed_precision {precision} and --{other} disagree; pick one")
        changes[precision] = True
    if env.get("ACCELERATE_DEEPSPEED_ZERO3_INIT", "false").lower() == "true":
        notes.append("accelerate DeepSpeed config: zero3_init_flag is not needed; kimi-lora builds the model on the "
                     "meta device and partitions each layer as it reads it")
    if env.get("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL", "false").lower() == "true":
        notes.append("accelerate DeepSpeed config: zero3_save_16bit_model is not used; kimi-lora always saves the "
                     "gathered adapter (or model) in its usual files")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "false"  # the Accelerator must not wrap what kimi-lora wraps
    return cfg.with_(**changes), notes


def _honour(key: str, value: Any, cfg: TrainConfig, default: Any) -> dict[str, Any]:
    """accelerate's value for `key` when the flag is at its default; a disagreement is refused."""
    current = getattr(cfg, key)
    if current == value:
        return {}
    if current != default:
        flag = "--" + key.replace("_", "-")
        raise ConfigError(f"accelerate's DeepSpeed config sets {key} {value} but {flag} is {current}; set one "
                          "of them (or make them equal)")
    return {key: value}
