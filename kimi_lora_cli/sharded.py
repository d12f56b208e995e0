"""Parameters that hold only this process's rows (FSDP2 DTensors), and loading weights into a model
built on the meta device: each parameter reads only the rows it holds, so no process holds the
whole model in memory.

FSDP2 (`torch.distributed.fsdp.fully_shard`) splits every parameter along dim 0 like `torch.chunk`
over the processes: rank r holds rows [r * ceil(n / world), ...), possibly none. A plain tensor is
its own "local part" (all rows), so every helper here works for sharded and unsharded models alike.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kimi_lora_cli.errors import ModelLoadError

if TYPE_CHECKING:
    import torch

# peft's parts of a parameter name that the release checkpoint does not have.
_PEFT_PREFIX = re.compile(r"^base_model\.model\.")
_ADAPTER_PART = re.compile(r"^(lora_|hra_|oft_|boft_)")


def is_sharded(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this process stores (a view: writing it writes the parameter)."""
    return t.to_local() if is_sharded(t) else t.data


def local_rows(t: torch.Tensor) -> slice:
    """Rows of the full tensor that this process holds (all of them for a plain tensor)."""
    if not is_sharded(t):
        return slice(0, t.shape[0] if t.dim() else 1)
    from torch.distributed.tensor import Shard

    placements = tuple(t.placements)
    if t.device_mesh.ndim != 1 or placements != (Shard(0),):
        raise NotImplementedError(f"only 1-D row sharding (FSDP2) is supported, not {placements}")
    n, world, rank = t.shape[0], t.device_mesh.size(), t.device_mesh.get_local_rank()
    size = -(-n // world)
    start = min(rank * size, n)
    rows = slice(start, min(start + size, n))
    held = t.to_local().shape[0] if t.dim() else 1
    if rows.stop - rows.start != held:
        raise RuntimeError(f"unexpected shard: rows {rows.start}:{rows.stop} of {n} but {held} held locally")
    return rows


def copy_full_(param: torch.Tensor, full: torch.Tensor) -> None:
    """Write a full tensor into a parameter: this process's rows only when it is sharded."""
    import torch

    dest = local(param)
    if dest.numel() == 0:
        return
    part = full[local_rows(param)] if is_sharded(param) else full
    with torch.no_grad():
        dest.copy_(part.to(dest.device, dest.dtype))


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective for a sharded one: every process must call it, in the same
    order). Shards kept on the CPU (FSDP CPU offload) are moved to the mesh's device to be gathered."""
    if not is_sharded(t):
        return t
    from torch.distributed.tensor import DTensor

    part = t.to_local()
    mesh_device = t.device_mesh.device_type
    if part.device.type != mesh_device:
        t = DTensor.from_local(part.to(mesh_device), t.device_mesh, t.placements, run_check=False,
                               shape=t.shape, stride=t.stride())
    return t.full_tensor()


def as_plain(t: Any) -> Any:
    """A replicated DTensor (a reduced norm, a loss) as an ordinary tensor; anything else unchanged."""
    return t.full_tensor() if is_sharded(t) else t


def checkpoint_key(param_name: str) -> str | None:
    """The release tensor name of a (peft-wrapped) model parameter; None for adapter weights
    (lora_A, lora_B, DoRA magnitudes), which the base checkpoint does not hold. A module trained in
    full next to an adapter (`modules_to_save`) starts from its base tensor, like the original."""
    parts = _PEFT_PREFIX.sub("", param_name).split(".")
    out, skip = [], False
    for part in parts:
        if skip:  # the adapter name after modules_to_save
            skip = False
        elif part == "modules_to_save":
            skip = True
        elif _ADAPTER_PART.match(part):
            return None
        elif part not in ("base_layer", "original_module"):
            out.append(part)
    return ".".join(out)


def read_rows(source: Any, key: str, rows: slice | None) -> torch.Tensor:
    """`rows` of tensor `key` from an open safetensors file (only those bytes are read) or a dict."""
    if isinstance(source, dict):
        t = source[key]
        return t if rows is None else t[rows]
    if rows is None:
        return source.get_tensor(key)
    return source.get_slice(key)[rows.start:rows.stop]


def fill_from_file(path: Path, params: dict[str, list[torch.Tensor]],
                   on_other: Callable[[str, Callable[[], torch.Tensor]], None] | None = None) -> set[str]:
    """Copy tensors of a safetensors (or, already allowed, pickle) file into the parameters listed
    under their key, each reading only its own rows. Keys not in `params` go to `on_other(key, get)`.
    Returns the keys copied."""
    import torch

    done: set[str] = set()

    def copy(src: Any, key: str) -> None:
        for p in params[key]:
            dest = local(p)
            if dest.numel() == 0:
                continue
            rows = local_rows(p) if is_sharded(p) else None
            with torch.no_grad():
                dest.copy_(read_rows(src, key, rows).to(dest.device, dest.dtype))
        done.add(key)

    if path.suffix != ".safetensors":
        from kimi_lora_cli.fileops import load_torch
        from kimi_lora_cli.model_files import MODEL_PICKLE_FIX

        state = load_torch(path, ModelLoadError, MODEL_PICKLE_FIX)
        for key, value in state.items():
            if key in params:
                copy(state, key)
            elif on_other is not None:
                on_other(key, lambda v=value: v)
        return done
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                if key in params:
                    copy(f, key)
                elif on_other is not None:
                    on_other(key, lambda k=key: f.get_tensor(k))
    except (ModelLoadError, RuntimeError, NotImplementedError):
        raise
    except Exception as e:  # safetensors raises its own error type
        raise ModelLoadError(f"{path}: unreadable safetensors file ({e}); re-download it") from None
    return done


def load_kimi_prepared(info: Any, dtype: Any, device: Any, base_path: Any, load_whisper: bool, attn: str,
                       prepare: Callable[[Any], Any]) -> tuple[Any, Any, Any]:
    """`load_model(..., prepare=...)` for Kimi-Audio: check the headers against config.json, build on
    the meta device in `dtype`, let `prepare` wrap / shard it, allocate what is still on the meta
    device on `device`, then read every base parameter's own rows. Adapter weights are left to the
    caller (see `training.lora.init_adapter_weights`)."""
    from kimi_lora_cli.loading import (
        FINETUNE_WHISPER_PREFIX,
        INV_FREQ_SUFFIX,
        _load_whisper,
        build_kimi_model,
        check_header_shapes,
        kimi_config,
        read_safetensors_header,
        weights_mismatch,
    )

    shapes: dict[str, tuple[int, ...]] = {}
    for f in info.weight_files:
        if f.suffix == ".safetensors":
            shapes.update({k: tuple(v["shape"]) for k, v in read_safetensors_header(f).items()})
    if len(shapes) and all(f.suffix == ".safetensors" for f in info.weight_files):
        check_header_shapes(info, shapes)  # a wrong folder fails here, before any allocation
    cfg = kimi_config(info, attn)
    base = build_kimi_model(cfg).to(dtype)
    base.name_or_path = str(info.path)  # peft saves it as the adapter's base_model_name_or_path
    model = prepare(base)
    if any(p.is_meta for p in model.parameters()):
        model.to_empty(device=device)
    params: dict[str, list[Any]] = {}
    numel: dict[str, int] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        key = checkpoint_key(name)
        if key is not None:
            params.setdefault(key, []).append(p)
            numel[key] = p.numel()
    whisper_state: dict[str, Any] = {}

    def other(key: str, get: Callable[[], Any]) -> None:
        if key.startswith(FINETUNE_WHISPER_PREFIX):
            if load_whisper:
                whisper_state[key[len(FINETUNE_WHISPER_PREFIX):]] = get()
        elif not key.endswith(INV_FREQ_SUFFIX):
            raise weights_mismatch(info.path, [], [key])

    done: set[str] = set()
    for f in info.weight_files:
        done |= fill_from_file(f, params, other)
    missing = sorted(set(params) - done)
    if missing:
        raise weights_mismatch(info.path, missing)
    info.num_parameters = sum(numel.values())
    encoder = _load_whisper(info, whisper_state, dtype, device, base_path) if load_whisper else None
    return model, cfg, encoder
