"""Reading a Kimi-Audio folder's tensors into a model built from its config.json: the release, fine-tune
and export layouts (`read_weights`), the meta-device path where each process reads only the rows it
holds (`read_prepared`, FSDP2 and per-rank loads), and the Whisper feature encoder (`read_whisper`).
`loading.load_model` is the entry point; this module only fills what it built."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kimi_lora_cli.errors import ModelLoadError
from kimi_lora_cli.model_files import FINETUNE_WHISPER_PREFIX, INV_FREQ_SUFFIX, WHISPER_DIR, ModelInfo
from kimi_lora_cli.sharded import checkpoint_key, fill_from_file
from kimi_lora_cli.tensor_files import iter_tensors, match_state, names_mismatch

if TYPE_CHECKING:
    import torch


def read_weights(model: Any, info: ModelInfo, dtype: Any, device: Any, base_path: Any, load_whisper: bool) -> Any:
    """Fill `model` (built on the meta device from config.json) with the folder's weights, strictly
    checked; returns the Whisper feature encoder (or None without `load_whisper`)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    whisper_state: dict[str, torch.Tensor] = {}
    found: dict[str, tuple[int, ...]] = {}
    for path, key, get in iter_tensors(info.weight_files):
        if key.endswith(INV_FREQ_SUFFIX):
            info.ignored_keys.append(key)
            continue
        if key.startswith(FINETUNE_WHISPER_PREFIX):
            if load_whisper:
                whisper_state[key[len(FINETUNE_WHISPER_PREFIX):]] = get()
            continue
        if key not in expected:
            found[f"{key} ({path.name})"] = ()
            continue
        t = get()
        match_state(expected, {key: tuple(t.shape)}, path, strict=False)
        found[key] = tuple(t.shape)
        state[key] = t.to(device=device, dtype=dtype)
    match_state(expected, found, info.path)
    model.load_state_dict(state, strict=True, assign=True)
    model.requires_grad_(True)
    info.num_parameters = sum(t.numel() for t in state.values())

    return read_whisper(info, whisper_state, dtype, device, base_path) if load_whisper else None


def read_whisper(info: ModelInfo, whisper_state: dict[str, Any], dtype: Any, device: Any, base_path: Any) -> Any:
    """The Whisper feature encoder from the main shards' keys (`whisper_state`) or `whisper-large-v3/`."""
    from kimi_lora_cli.models.kimi_audio.whisper import (
        WhisperFeatureEncoder,
        strip_whisper_prefix,
        whisper_config_from_tensors,
    )

    wcfg = None
    source = info.whisper_source
    candidates = [info.path / WHISPER_DIR] + ([Path(base_path) / WHISPER_DIR] if base_path else [])
    if not whisper_state:
        wfile = next((c / "model.safetensors" for c in candidates if (c / "model.safetensors").is_file()), None)
        if wfile is None:
            raise ModelLoadError(
                f"{info.path}: no Whisper encoder ({WHISPER_DIR}/model.safetensors or whisper_model.* keys); "
                "pass the release folder as --model-name-or-path / base so its whisper-large-v3/ can be used"
            )
        source = str(wfile.parent)
        for _, key, get in iter_tensors([wfile]):
            name = strip_whisper_prefix(key)
            if name is not None:
                whisper_state[name] = get()
        if not whisper_state:
            raise ModelLoadError(f"{wfile}: holds no encoder tensors (expected model.encoder.* or encoder.*)")
    for c in candidates:
        if (c / "config.json").is_file():
            from transformers import WhisperConfig

            wcfg = WhisperConfig.from_json_file(str(c / "config.json"))
            break
    if wcfg is None:
        wcfg = whisper_config_from_tensors({k: tuple(v.shape) for k, v in whisper_state.items()})
    try:
        enc = WhisperFeatureEncoder.from_state_dict(wcfg, whisper_state, dtype=dtype, device=device, source=source)
    except (KeyError, RuntimeError) as e:
        raise ModelLoadError(f"{source}: Whisper weights do not match its config ({e})") from None
    kimi_dim = info.config.get("kimia_adaptor_input_dim")
    if kimi_dim and enc.row_dim != kimi_dim:
        raise ModelLoadError(
            f"{source}: Whisper d_model {wcfg.d_model} gives {enc.row_dim}-dim rows but config.json has "
            f"kimia_adaptor_input_dim {kimi_dim}; use the whisper-large-v3 folder of the same release"
        )
    info.whisper_source = source
    return enc


def read_prepared(base: Any, info: ModelInfo, dtype: Any, device: Any, base_path: Any, load_whisper: bool,
                  prepare: Callable[[Any], Any], quantization: Any = None) -> tuple[Any, Any]:
    """`load_model(..., prepare=...)` for Kimi-Audio (headers already checked against config.json):
    `base` built on the meta device is cast to `dtype`, `prepare` wraps / shards it, allocate what is still on the meta
    device on `device`, then read every base parameter's own rows. Adapter weights are left to the
    caller (see `training.lora.init_adapter_weights`).

    With `quantization` (a `quantization.QuantSpec`) the decoder linears become empty bitsandbytes
    layers before `prepare`, and each is quantized onto `device` as its tensor is read."""
    base = base.to(dtype)
    base.name_or_path = str(info.path)  # peft saves it as the adapter's base_model_name_or_path
    if quantization is not None:
        from kimi_lora_cli.quantization import quantize_skeleton

        quantize_skeleton(base, quantization, dtype, device)
    model = prepare(base)
    quantized = _quantized_layers(model) if quantization is not None else {}
    if quantized:
        _allocate(model, device, skip={id(m.weight) for m in quantized.values()})
    elif any(p.is_meta for p in model.parameters()):
        model.to_empty(device=device)
    params: dict[str, list[Any]] = {}
    numel: dict[str, int] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        key = checkpoint_key(name)
        if key is not None and key not in quantized:
            params.setdefault(key, []).append(p)
            numel[key] = p.numel()
    whisper_state: dict[str, Any] = {}
    done: set[str] = set()

    def other(key: str, get: Callable[[], Any]) -> None:
        if key in quantized:
            from kimi_lora_cli.quantization import quantize_into

            layer = quantized[key]
            numel[key] = layer.in_features * layer.out_features
            quantize_into(layer, get(), quantization, dtype, device)
            done.add(key)
        elif key.startswith(FINETUNE_WHISPER_PREFIX):
            if load_whisper:
                whisper_state[key[len(FINETUNE_WHISPER_PREFIX):]] = get()
        elif not key.endswith(INV_FREQ_SUFFIX):
            raise names_mismatch(info.path, [], [key])

    for f in info.weight_files:
        done |= fill_from_file(f, params, other)
    missing = sorted((set(params) | set(quantized)) - done)
    if missing:
        raise names_mismatch(info.path, missing)
    info.num_parameters = sum(numel.values())
    encoder = read_whisper(info, whisper_state, dtype, device, base_path) if load_whisper else None
    return model, encoder


def _quantized_layers(model: Any) -> dict[str, Any]:
    """Checkpoint key of each quantized layer's weight -> the bitsandbytes layer."""
    from kimi_lora_cli.quantization import is_quantized_layer

    return {checkpoint_key(f"{name}.weight"): m for name, m in model.named_modules() if is_quantized_layer(m)}


def _allocate(model: Any, device: Any, skip: set[int]) -> None:
    """`model.to_empty(device)` for every meta tensor except those in `skip` (the quantized weights,
    which are made from the checkpoint one by one); a tensor shared by several modules stays shared."""
    import torch

    made: dict[int, Any] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None or not p.is_meta or id(p) in skip:
                continue
            if id(p) not in made:
                made[id(p)] = torch.nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
            module._parameters[name] = made[id(p)]
        for name, b in list(module._buffers.items()):
            if b is not None and b.is_meta:
                module._buffers[name] = torch.empty_like(b, device=device)
