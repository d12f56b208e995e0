"""A base model's tensors from its headers, and whether an adapter fits them (no tensor data read)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kimi_lora_cli.adapters.reading import Adapter
from kimi_lora_cli.errors import ModelLoadError
from kimi_lora_cli.safetensors_io import FLOAT_DTYPES, TensorLoc, header_locations


@dataclass
class BaseCheckpoint:
    """A model folder's weight tensors, in file order, from config.json and safetensors headers."""

    path: Path
    info: Any  # loading.ModelInfo
    files: list[Path]
    tensors: dict[str, TensorLoc]
    index_file: Path | None

    @property
    def is_kimi(self) -> bool:
        return self.info.is_kimi

    @property
    def config(self) -> dict[str, Any]:
        return self.info.config

    @property
    def mimo_from(self) -> int | None:
        value = self.config.get("kimia_mimo_transformer_from_layer_index")
        return int(value) if self.is_kimi and value is not None else None


def read_base(path: str | Path) -> BaseCheckpoint:
    from kimi_lora_cli.loading import inspect_folder

    info = inspect_folder(path, need_weights=True, allow_pickle=False)
    folder = info.path
    bad = [f for f in info.weight_files if f.suffix != ".safetensors"]
    if bad:
        raise ModelLoadError(f"{bad[0]}: kimi-lora reads base weights as safetensors only; convert the "
                             "model with save_pretrained(..., safe_serialization=True)")
    tensors: dict[str, TensorLoc] = {}
    for f in info.weight_files:
        for name, loc in header_locations(f).items():
            if name in tensors:
                raise ModelLoadError(f"{f}: tensor {name} is also in {tensors[name].file.name}; "
                                     "the checkpoint has duplicate tensors")
            tensors[name] = loc
    index = folder / "model.safetensors.index.json"
    if info.weight_map and index.is_file():
        for name, file in info.weight_map.items():
            if name not in tensors or tensors[name].file != file:
                raise ModelLoadError(f"{index}: lists {name} in {Path(file).name}, which does not hold it; "
                                     "re-download the checkpoint")
    from kimi_lora_cli.loading import check_header_shapes

    check_header_shapes(info, {name: loc.shape for name, loc in tensors.items()})  # a base that cannot load never "fits"
    return BaseCheckpoint(path=folder, info=info, files=list(info.weight_files), tensors=tensors,
                          index_file=index if index.is_file() else None)


def check_against_base(adapter: Adapter, base: BaseCheckpoint) -> list[str]:
    """Every problem that would stop this adapter from applying to `base` (empty list: it fits)."""
    problems: list[str] = []
    tied = bool(base.config.get("tie_word_embeddings"))

    def missing(name: str) -> str:
        hint = " (the base ties it to the input embeddings)" if tied and name.startswith("lm_head") else ""
        return f"no tensor {name} in the base{hint}"

    for mod in adapter.modules.values():
        wname = f"{mod.name}.weight"
        w = base.tensors.get(wname)
        if w is None:
            problems.append(f"{mod.name}: {missing(wname)}")
            continue
        if w.dtype not in FLOAT_DTYPES:
            problems.append(f"{mod.name}: base weight is {w.dtype}, not a float tensor (quantised bases "
                            "cannot be merged; use the 16-bit release)")
        elif tuple(w.shape) != mod.weight_shape:
            layout = "[in, out]" if mod.transposed else "[out, in]"
            problems.append(f"{mod.name}: adapter implies weight {list(mod.weight_shape)} {layout} "
                            f"(lora_A [{mod.r}, {mod.in_features}], lora_B [{mod.out_features}, {mod.r}]) "
                            f"but the base has {list(w.shape)}")
        if mod.bias_key:
            b = base.tensors.get(f"{mod.name}.bias")
            if b is None:
                problems.append(f"{mod.name}: the adapter has a LoRA bias (lora_bias=True) but the base "
                                "layer has no bias")
            elif tuple(b.shape) != (mod.out_features,):
                problems.append(f"{mod.name}: LoRA bias [{mod.out_features}] but base bias {list(b.shape)}")
    for name, key in adapter.replacements.items():
        t = base.tensors.get(name)
        shape = tuple(adapter.tensors[key].shape)
        if t is None:
            problems.append(f"{name}: saved in the adapter (modules_to_save / bias) but {missing(name)}")
        elif tuple(t.shape) != shape:
            problems.append(f"{name}: adapter copy is {list(shape)} but the base has {list(t.shape)}")
    for tok in adapter.token_adapters.values():
        t = base.tensors.get(f"{tok.name}.weight")
        delta = adapter.tensors[tok.key].shape
        if t is None:
            problems.append(f"{tok.name}: trainable tokens saved but {missing(tok.name + '.weight')}")
        elif len(t.shape) != 2 or delta != (len(tok.indices), t.shape[1]):
            problems.append(f"{tok.name}: trainable tokens {list(delta)} do not fit the base embedding "
                            f"{list(t.shape)}")
        elif tok.indices and max(tok.indices) >= t.shape[0]:
            problems.append(f"{tok.name}: token index {max(tok.indices)} is outside the base vocabulary "
                            f"({t.shape[0]} rows)")
    return problems


def summarize_problems(problems: list[str], shown: int = 3) -> str:
    head = "; ".join(problems[:shown])
    more = f"; and {len(problems) - shown} more" if len(problems) > shown else ""
    return f"{len(problems)} mismatch{'es' if len(problems) != 1 else ''}: {head}{more}"
