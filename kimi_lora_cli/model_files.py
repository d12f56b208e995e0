"""Model folders without tensors: config.json, safetensors headers and the layout they describe.

`inspect_folder(path)` says what a folder holds (Kimi-Audio release / fine-tune / export layout or a
Hugging Face causal LM), which weight files and keys it has and where its tokenizer and Whisper come
from; every unreadable or malformed file is a one-line `ModelLoadError` naming it. Nothing here
imports torch or reads a tensor: the loading core (`loading.py`), inspect-adapter and merge build
on it.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kimi_lora_cli.errors import AdapterError, ModelLoadError
from kimi_lora_cli.models.kimi_audio.configuration import is_kimi_config

WHISPER_DIR = "whisper-large-v3"
INV_FREQ_SUFFIX = "rotary_emb.inv_freq"
FINETUNE_WHISPER_PREFIX = "whisper_model.speech_encoder."  # the official fine-tune layout
# How to get past a pickle weight file that is refused (fileops.load_torch), for models and adapters.
MODEL_PICKLE_FIX = "use the release's .safetensors files, or convert the file with a tool you trust"
ADAPTER_PICKLE_FIX = "use an adapter saved as adapter_model.safetensors (peft's default)"


@dataclass
class ModelInfo:
    """What the loader found in a model folder (no tensors)."""

    path: Path
    kind: str  # "kimi-audio" | "causal-lm"
    layout: str  # "release" | "finetune" | "export" | "single-file" | "hf"
    config: dict[str, Any]
    weight_files: list[Path] = field(default_factory=list)
    weight_map: dict[str, Path] = field(default_factory=dict)
    whisper_source: str | None = None
    tokenizer_source: str | None = None
    ignored_keys: list[str] = field(default_factory=list)
    num_parameters: int = 0
    dtype: str | None = None

    @property
    def is_kimi(self) -> bool:
        return self.kind == "kimi-audio"


# -------------------------------------------------------------------------------------------
# Folder inspection (config + safetensors headers only)
# -------------------------------------------------------------------------------------------


def read_config(folder: Path) -> dict[str, Any]:
    if not folder.exists():
        raise ModelLoadError(f"{folder}: no such folder; pass the model folder that holds config.json")
    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: not a folder; pass the model folder that holds config.json")
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(
            f"{cfg_file}: not found; pass the Kimi-Audio release folder (or a Hugging Face model folder) "
            "that holds config.json"
        )
    return read_json_object(cfg_file, ModelLoadError)


def read_json_object(path: Path, error: type[Exception] = ModelLoadError) -> dict[str, Any]:
    """A JSON file that must hold one object; every way it can be broken is one named-file error."""
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8").removeprefix("\ufeff")
        data = json.loads(text)
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise error(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); restore the original file") from None
    except json.JSONDecodeError as e:
        raise error(f"{path}:{e.lineno}: invalid JSON ({e.msg}); restore the original file") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, found a {type(data).__name__}; restore the original file")
    return data


def read_safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """Tensor name -> {dtype, shape, data_offsets}; checks the file covers its header's tensors."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("file shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100_000_000:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: file not found; the safetensors index names it, re-download it") from None
    except (ValueError, UnicodeDecodeError, OSError) as e:
        raise ModelLoadError(f"{path}: unreadable safetensors file ({e}); re-download or re-save it") from None
    problem = _header_problem(header)
    if problem:
        raise ModelLoadError(f"{path}: malformed safetensors header ({problem}); re-download or re-save it")
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise ModelLoadError(
            f"{path}: truncated safetensors file ({size} bytes, header needs {8 + n + end}); re-download it"
        )
    return header


def _header_problem(header: Any) -> str | None:
    """What is wrong with a parsed safetensors header, or None (names, dtypes, shapes, offsets)."""
    if not isinstance(header, dict):
        return f"a JSON {type(header).__name__} instead of an object of tensors"
    for name, v in header.items():
        if name == "__metadata__":
            if v is not None and not isinstance(v, dict):
                return "__metadata__ is not an object"
            continue
        if not isinstance(v, dict):
            return f"tensor {name} is described by a {type(v).__name__}, not an object"
        for key in ("dtype", "shape", "data_offsets"):
            if key not in v:
                return f"tensor {name} lacks {key}"
        shape, offsets = v["shape"], v["data_offsets"]
        if not isinstance(v["dtype"], str):
            return f"tensor {name} has dtype {v['dtype']!r}"
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            return f"tensor {name} has shape {shape!r}"
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
                or offsets[0] > offsets[1]):
            return f"tensor {name} has data_offsets {offsets!r}"
    return None


def _weight_files(folder: Path, allow_pickle: bool) -> tuple[list[Path], dict[str, Path]]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = read_json_object(index)
        try:
            weight_map = {k: folder / v for k, v in data["weight_map"].items()}
        except (KeyError, AttributeError, TypeError) as e:
            raise ModelLoadError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e}); "
                                 "re-download it") from None
        files = sorted(set(weight_map.values()), key=lambda p: p.name)
        inside = folder.resolve()
        for f in files:
            if inside not in f.resolve().parents:
                shown = next(v for k, v in data["weight_map"].items() if folder / v == f)
                raise ModelLoadError(f"{index}: lists {shown!r}, a path outside the model folder {folder}; every "
                                     "shard must be a file in that folder - re-download the index")
            if not f.is_file():
                raise ModelLoadError(f"{f}: listed in {index.name} but missing; re-download the shard")
        return files, weight_map
    single = folder / "model.safetensors"
    if single.is_file():
        return [single], {}
    pickles = sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pt"))
    if pickles:
        if not allow_pickle:
            raise ModelLoadError(
                f"{folder}: only pickle weights ({pickles[0].name}); unpickling can run code, so pass "
                "--allow-pickle if you trust this folder (or convert it to safetensors)"
            )
        return pickles, {}
    raise ModelLoadError(f"{folder}: no weights found (model.safetensors, an index, or shards)")


def inspect_folder(path: str | Path, *, allow_pickle: bool = False, need_weights: bool = True,
                   base_path: str | Path | None = None) -> ModelInfo:
    """Describe a model folder from config.json and safetensors headers, reading no tensor."""
    folder = Path(path).expanduser()
    data = read_config(folder)
    if not is_kimi_config(data):
        return _inspect_hf(folder, data, allow_pickle, need_weights)
    info = ModelInfo(path=folder, kind="kimi-audio", layout="release", config=data,
                     dtype=data.get("torch_dtype") or data.get("dtype"))
    if need_weights:
        info.weight_files, info.weight_map = _weight_files(folder, allow_pickle)
        if not info.weight_map:
            for f in info.weight_files:
                if f.suffix == ".safetensors":
                    info.weight_map.update(dict.fromkeys(read_safetensors_header(f), f))
        if any(k.startswith("whisper_model.") for k in info.weight_map):
            info.layout = "finetune"
            info.whisper_source = f"{folder} (whisper_model.speech_encoder.* keys)"
    wdir = folder / WHISPER_DIR
    bases = [folder] + ([Path(base_path).expanduser()] if base_path else [])
    if info.whisper_source is None:
        for b in bases:
            if (b / WHISPER_DIR / "model.safetensors").is_file():
                info.whisper_source = str(b / WHISPER_DIR)
                if b == folder and need_weights:
                    keys = read_safetensors_header(wdir / "model.safetensors")
                    info.layout = "export" if any(k.startswith("encoder.") for k in keys) else "release"
                break
    for b in bases:
        if (b / "tiktoken.model").is_file():
            info.tokenizer_source = str(b)
            break
    return info


def _inspect_hf(folder: Path, data: dict[str, Any], allow_pickle: bool, need_weights: bool) -> ModelInfo:
    model_type = data.get("model_type")
    if not model_type:
        raise ModelLoadError(
            f"{folder / 'config.json'}: not a Kimi-Audio config (no kimia_* keys, architectures "
            f"{data.get('architectures')}) and no model_type; point at the Kimi-Audio release folder"
        )
    from transformers import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise ModelLoadError(
            f"{folder / 'config.json'}: model_type {model_type!r} is unknown to kimi-lora and to this "
            "transformers version (remote code is never run); use a Kimi-Audio folder or a supported model"
        )
    info = ModelInfo(path=folder, kind="causal-lm", layout="hf", config=data,
                     dtype=data.get("torch_dtype") or data.get("dtype"))
    if need_weights:
        info.weight_files, info.weight_map = _weight_files(folder, allow_pickle)
    if (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file():
        info.tokenizer_source = str(folder)
    return info


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """adapter_config.json of a peft adapter folder, every value peft needs checked (one-line errors)."""
    cfg_file = folder / "adapter_config.json"
    if not cfg_file.is_file():
        inside = sorted((p.parent for p in folder.glob("*/adapter_config.json")), key=lambda d: d.stat().st_mtime)
        hint = (f"; did you mean {inside[-1]}?" if inside else
                "; pass a peft adapter folder (the output folder of `kimi-lora train` or `save_pretrained`)")
        raise AdapterError(f"{cfg_file}: not found{hint}")
    data = read_json_object(cfg_file, AdapterError)
    problem = config_problem(data)
    if problem:
        raise AdapterError(f"{cfg_file}: {problem}; restore the file peft wrote")
    return data


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _names(v: Any) -> bool:
    return v is None or isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))


def config_problem(cfg: dict[str, Any]) -> str | None:
    """The first value of an adapter_config.json that peft (and kimi-lora) cannot use, or None."""
    checks = [
        ("r", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a whole number >= 1"),
        ("lora_alpha", lambda v: _number(v) and v > 0, "a positive number"),
        ("lora_dropout", lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
        ("target_modules", _names, "a list of module names, a name or a regular expression"),
        ("modules_to_save", lambda v: v is None or (isinstance(v, list) and all(isinstance(x, str) for x in v)),
         "a list of module names"),
        ("rank_pattern", lambda v: v is None or (isinstance(v, dict) and all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in v.values())),
         "an object of module pattern -> rank"),
        ("alpha_pattern", lambda v: v is None or (isinstance(v, dict) and all(_number(x) and x > 0 for x in v.values())),
         "an object of module pattern -> alpha"),
        ("use_rslora", lambda v: isinstance(v, bool), "true or false"),
        ("use_dora", lambda v: isinstance(v, bool), "true or false"),
        ("fan_in_fan_out", lambda v: isinstance(v, bool), "true or false"),
        ("peft_type", lambda v: isinstance(v, str), "a string such as \"LORA\""),
        ("base_model_name_or_path", lambda v: v is None or isinstance(v, str), "a path or null"),
        ("trainable_token_indices", lambda v: v is None or isinstance(v, (list, dict)), "a list or an object"),
    ]
    for key, ok, expected in checks:
        if key in cfg and not ok(cfg[key]):
            return f"{key} = {cfg[key]!r} is not valid (expected {expected})"
    return None
