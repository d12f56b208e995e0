"""FSDP2 for `kimi-lora train --fsdp`: settings (flags, or accelerate's FSDP plugin under
`accelerate launch --use_fsdp`), sharding the model, and the gathering / re-sharding that saves and
resumes need.

Each decoder layer of both stacks (main and mimo), each head and then the rest of the model (embedding,
adaptor, norms) become one `fully_shard` unit: every process keeps 1/world of every parameter and
gathers one unit at a time for its forward and backward. The model is sharded on the meta device
before any weight is read (see `loading.load_model(prepare=...)`).

kimi-lora applies `fully_shard` itself rather than through `Accelerator.prepare`: accelerate (1.15)
drives FSDP only on accelerators (on the CPU it silently falls back to DDP) and its FSDP2 preparation
re-wraps and re-loads a peft model from a full rank-0 copy. The same code therefore runs on the CPU
(gloo, the tests) and on GPUs; accelerate still provides processes, devices, reductions and
clipping, and its FSDP plugin is where the settings come from.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from kimi_lora_cli.errors import ConfigError
from kimi_lora_cli.training.config import TrainConfig
from kimi_lora_cli.training.distributed import init_process_group  # noqa: F401 - shared with DeepSpeed


@dataclass(frozen=True)
class FsdpSettings:
    cpu_offload: bool = False  # sharded parameters, gradients and optimizer state live in CPU memory
    reshard_after_forward: bool = True  # False: keep gathered layers until backward (faster, more memory)
    bf16: bool = False  # gather parameters in bfloat16 for compute (gradients reduced in float32)

    def plugin(self) -> Any:
        """The same settings as accelerate's FSDP plugin (what `accelerate launch --use_fsdp` reads)."""
        from accelerate.utils import FullyShardedDataParallelPlugin

        return FullyShardedDataParallelPlugin(fsdp_version=2, cpu_offload=self.cpu_offload,
                                              reshard_after_forward=self.reshard_after_forward)


def settings(cfg: TrainConfig) -> FsdpSettings:
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() not in ("false", "0", "no")
    return FsdpSettings(cpu_offload=cfg.fsdp_cpu_offload, reshard_after_forward=reshard, bf16=cfg.bf16)


def from_launcher(cfg: TrainConfig) -> tuple[TrainConfig, list[str]]:
    """Under `accelerate launch --use_fsdp` (ACCELERATE_USE_FSDP=true): the run becomes `--fsdp` with
    the plugin's offload and activation-checkpointing settings. Returns (config, notes)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() not in ("true", "1"):
        return cfg, []
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # reads accelerate's FSDP_* variables
    if plugin.fsdp_version != 2:
        raise ConfigError(f"accelerate's FSDP config asks for FSDP version {plugin.fsdp_version}; kimi-lora "
                          "trains with FSDP2 (fully_shard): set fsdp_version: 2 in the accelerate config "
                          "(accelerate launch --fsdp_version 2)")
    if cfg.deepspeed:
        raise ConfigError("accelerate launch --use_fsdp and --deepspeed both ask for the engine; pick one")
    notes = ["accelerate FSDP config: kimi-lora shards each decoder layer, each head and the rest of the model, "
             "and saves gathered full weights (the auto-wrap policy and state-dict type are not used)"]
    from torch.distributed.fsdp import CPUOffloadPolicy

    offload = cfg.fsdp_cpu_offload or isinstance(plugin.cpu_offload, CPUOffloadPolicy)
    cfg = cfg.with_(fsdp=True, fsdp_cpu_offload=offload,
                    gradient_checkpointing=cfg.gradient_checkpointing or bool(plugin.activation_checkpointing))
    os.environ["ACCELERATE_USE_FSDP"] = "false"  # the Accelerator must not re-wrap what kimi-lora sharded
    return cfg, notes


def return_freed_memory() -> None:
    """Hand large freed blocks straight back to the system (glibc). FSDP gathers and frees every
    layer's weights in each forward and backward; with shards in CPU memory, glibc's malloc would
    keep those blocks in its heap (its mmap threshold rises with every large block freed) and the
    process would grow back to a whole-model footprint. Fixing the threshold at glibc's starting value
    (128 KiB) stops that."""
    import ctypes
    import ctypes.util

    m_mmap_threshold = -3  # from glibc's malloc.h
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(m_mmap_threshold, 128 * 1024)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def units(inner: Any) -> list[Any]:
    """The modules that get their own FSDP unit, in forward order (the root comes last)."""
    return [*inner.model.layers, *inner.model.mimo_layers, inner.lm_head, inner.mimo_output]


def shard_model(inner: Any, fsdp: FsdpSettings, device: Any) -> Any:
    """`fully_shard` the Kimi-Audio model (under a peft wrapper the base model, whose LoRA layers
    become part of their decoder layer's unit), on the meta device or a real one. Then allocate
    this process's shards: on the CPU with offload, else on `device`."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    world = torch.distributed.get_world_size()
    mesh = init_device_mesh(torch.device(device).type, (world,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if fsdp.bf16 else None, reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy(pin_memory=torch.device(device).type == "cuda") if fsdp.cpu_offload \
        else OffloadPolicy()
    for module in units(inner):
        fully_shard(module, mesh=mesh, mp_policy=mp, offload_policy=offload,
                    reshard_after_forward=fsdp.reshard_after_forward)
    fully_shard(inner, mesh=mesh, mp_policy=mp, offload_policy=offload)
    if hasattr(inner, "set_reduce_scatter_unused_params"):
        # A rank whose micro-batch has no audio does not use the adaptor: its gradients count as zeros
        # (DDP's find_unused_parameters), so every rank reduces the same tensors.
        inner.set_reduce_scatter_unused_params(True)
    if fsdp.cpu_offload or torch.device(device).type == "cpu":
        return_freed_memory()
    inner.to_empty(device="cpu" if fsdp.cpu_offload else device)
    return inner


class FsdpRun:
    """What the trainer needs from a sharded model: gradient sync control and full-state I/O."""

    def __init__(self, root: Any, fsdp: FsdpSettings) -> None:
        self.root = root
        self.settings = fsdp

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients without reducing them (all but the last micro-batch of a step)."""
        self.root.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.root.set_requires_gradient_sync(True)

    @staticmethod
    def full_optimizer_state(optimizer: Any, keep: bool) -> dict[str, Any]:
        """`optimizer.state_dict()` with every sharded tensor gathered (a collective: every process
        calls it); the same layout as an unsharded run's, so checkpoints do not depend on the engine.
        Only a process with `keep` holds the result (the others get {})."""
        from kimi_lora_cli.sharded import full_tensor

        sd = optimizer.state_dict()
        state = {}
        for i in sorted(sd["state"]):
            entry = {}
            for k, v in sd["state"][i].items():
                v = full_tensor(v)
                entry[k] = v.detach().to("cpu") if hasattr(v, "detach") else v
            if keep:
                state[i] = entry
        return {"state": state, "param_groups": sd["param_groups"]} if keep else {}

    @staticmethod
    def local_optimizer_state(sd: dict[str, Any], optimizer: Any) -> dict[str, Any]:
        """A full optimizer state (as saved) cut to this process's shards: each state tensor shaped
        like its sharded parameter becomes a DTensor holding this process's rows."""
        from torch.distributed.tensor import DTensor

        from kimi_lora_cli.sharded import is_sharded, local_rows

        params = [p for group in optimizer.param_groups for p in group["params"]]
        state = {}
        for i, entry in sd["state"].items():
            p = params[int(i)]
            out = {}
            for k, v in entry.items():
                if is_sharded(p) and hasattr(v, "shape") and tuple(v.shape) == tuple(p.shape):
                    part = v[local_rows(p)].to(p.to_local().device, v.dtype).contiguous()
                    v = DTensor.from_local(part, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                           stride=p.stride())
                out[k] = v
            state[i] = out
        return {"state": state, "param_groups": sd["param_groups"]}
