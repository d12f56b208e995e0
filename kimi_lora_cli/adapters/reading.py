"""A peft LoRA adapter folder described from adapter_config.json and the safetensors header alone.

peft saves, per adapted module X (names relative to the base model, after `base_model.model.`):
  X.lora_A.weight [r, in]   X.lora_B.weight [out, r]   X.lora_B.bias [out] (lora_bias)
  X.lora_magnitude_vector [out] (DoRA)   X.lora_embedding_A [r, num]  X.lora_embedding_B [dim, r]
  X.token_adapter.trainable_tokens_delta [n, dim] (trainable_token_indices)
and whole tensors for modules_to_save / bias="all" (`X.weight`, `X.bias`, `X.base_layer.bias`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kimi_lora_cli.errors import AdapterError, KimiLoraError
from kimi_lora_cli.model_files import ADAPTER_PICKLE_FIX
from kimi_lora_cli.model_files import read_adapter_config as read_config
from kimi_lora_cli.safetensors_io import DTYPES, TensorLoc, header_locations, numel

if TYPE_CHECKING:
    import torch

PREFIX = "base_model.model."
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"

# adapter_config.json keys whose adapters change the model in ways a weight merge cannot reproduce
# (or whose arithmetic kimi-lora does not implement); merge refuses them, inspect reports them.
UNMERGEABLE = {
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "layer_replication": "layer replication (changes the architecture)",
    "alora_invocation_tokens": "activated LoRA (applies only after its invocation tokens)",
    "arrow_config": "Arrow routing between adapters",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
    "use_bdlora": "block-diagonal LoRA",
    "use_qalora": "QALoRA",
}


@dataclass
class LoraModule:
    """One adapted module: X.weight += scaling * B @ A (transposed for fan_in_fan_out / embeddings)."""

    name: str
    kind: str  # "linear" | "embedding"
    r: int
    in_features: int
    out_features: int
    alpha: float
    scaling: float
    a_key: str
    b_key: str
    bias_key: str | None = None
    magnitude_key: str | None = None
    # True when the base weight is stored [in, out] (embeddings always, Conv1D with fan_in_fan_out).
    transposed: bool = False

    @property
    def params(self) -> int:
        return self.r * (self.in_features + self.out_features)

    @property
    def weight_shape(self) -> tuple[int, int]:
        """Expected shape of the base tensor X.weight."""
        if self.transposed:
            return (self.in_features, self.out_features)
        return (self.out_features, self.in_features)


@dataclass
class TokenAdapter:
    name: str
    key: str
    indices: list[int]


@dataclass
class Adapter:
    """Everything about an adapter folder that needs no tensor data."""

    path: Path
    config: dict[str, Any]
    weights_file: Path
    tensors: dict[str, TensorLoc]  # adapter key (prefix stripped) -> location; empty for .bin until loaded
    modules: dict[str, LoraModule] = field(default_factory=dict)
    replacements: dict[str, str] = field(default_factory=dict)  # base tensor name -> adapter key
    token_adapters: dict[str, TokenAdapter] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    _loaded: dict[str, Any] | None = None

    # -- config views --------------------------------------------------------------------------
    @property
    def peft_type(self) -> str:
        return str(self.config.get("peft_type") or "?")

    @property
    def peft_version(self) -> str | None:
        return self.config.get("peft_version")

    @property
    def r(self) -> int:
        return int(self.config.get("r", 8))

    @property
    def alpha(self) -> float:
        return float(self.config.get("lora_alpha", 8))

    @property
    def use_rslora(self) -> bool:
        return bool(self.config.get("use_rslora"))

    @property
    def use_dora(self) -> bool:
        return bool(self.config.get("use_dora"))

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out"))

    @property
    def rank_pattern(self) -> dict[str, int]:
        return dict(self.config.get("rank_pattern") or {})

    @property
    def alpha_pattern(self) -> dict[str, float]:
        return dict(self.config.get("alpha_pattern") or {})

    @property
    def modules_to_save(self) -> list[str]:
        return list(self.config.get("modules_to_save") or [])

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def format(self) -> str:
        return "safetensors" if self.weights_file.suffix == ".safetensors" else "pickle"

    def unmergeable(self) -> list[str]:
        return [desc for key, desc in UNMERGEABLE.items() if self.config.get(key)]

    def scaling_for(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def rank_alpha_for(self, module: str) -> tuple[int, float]:
        """(r, alpha) peft uses for `module`: first matching rank/alpha pattern, else the defaults."""
        r = self.rank_pattern.get(_pattern_key(self.rank_pattern, module), self.r)
        alpha = self.alpha_pattern.get(_pattern_key(self.alpha_pattern, module), self.alpha)
        return int(r), float(alpha)

    # -- sizes ---------------------------------------------------------------------------------
    @property
    def num_parameters(self) -> int:
        return sum(numel(t.shape) for t in self.tensors.values())

    @property
    def dtypes(self) -> list[str]:
        return sorted({DTYPES[t.dtype][0] for t in self.tensors.values()})

    def size_on_disk(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

    # -- tensor data ---------------------------------------------------------------------------
    def tensor(self, key: str) -> torch.Tensor:
        """One adapter tensor, read on its own unless everything is loaded already."""
        if self._loaded is not None:
            return self._loaded[key]
        from kimi_lora_cli.safetensors_io import read_tensor

        return read_tensor(self.tensors[key])

    def load(self) -> dict[str, torch.Tensor]:
        """All adapter tensors (prefix-stripped names); an adapter is small next to its base."""
        if self._loaded is None:
            if self.format == "pickle":
                self._loaded = _load_pickle(self.weights_file)
            else:
                from kimi_lora_cli.safetensors_io import read_tensor

                self._loaded = {k: read_tensor(loc) for k, loc in self.tensors.items()}
        return self._loaded


def _pattern_key(patterns: dict[str, Any], module: str) -> str:
    # The same rule peft applies: a pattern matches the end of the module name at a dot boundary.
    for key in patterns:
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return key
        except re.error:
            if module == key or module.endswith("." + key):
                return key
    return module


def _load_pickle(path: Path) -> dict[str, Any]:
    from kimi_lora_cli.fileops import load_torch

    state = load_torch(path, AdapterError, ADAPTER_PICKLE_FIX)
    if not isinstance(state, dict):
        raise AdapterError(f"{path}: holds a {type(state).__name__}, not a dict of tensors; {ADAPTER_PICKLE_FIX}")
    return {_strip(k): v for k, v in state.items()}


def _strip(key: str) -> str:
    return key[len(PREFIX):] if key.startswith(PREFIX) else key


def read_adapter(path: str | Path, *, allow_pickle: bool = False) -> Adapter:
    """Describe an adapter folder from its config and weight header (no tensor data read)."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise AdapterError(f"{folder}: no such adapter folder; pass the output folder of `kimi-lora train`")
    if not folder.is_dir():
        raise AdapterError(f"{folder}: not a folder; pass the adapter folder, not a file in it")
    config = read_config(folder)
    peft_type = str(config.get("peft_type") or "").upper()
    if peft_type != "LORA":
        raise AdapterError(f"{folder / 'adapter_config.json'}: peft_type is {config.get('peft_type')!r}; "
                           "kimi-lora handles LoRA adapters only (peft_type LORA)")
    st_file, bin_file = folder / SAFETENSORS_NAME, folder / PICKLE_NAME
    if st_file.is_file():
        try:
            locs = header_locations(st_file)
        except KimiLoraError as e:
            raise AdapterError(str(e)) from None
        tensors = {_strip(k): v for k, v in locs.items()}
        adapter = Adapter(path=folder, config=config, weights_file=st_file, tensors=tensors)
    elif bin_file.is_file():
        if not allow_pickle:
            raise AdapterError(f"{bin_file}: pickle adapter (unpickling can run code); pass --allow-pickle "
                               "if you trust it, or re-save it as safetensors")
        state = _load_pickle(bin_file)
        tensors = {
            k: TensorLoc(k, bin_file, 0, v.numel() * v.element_size(), _st_name(v), tuple(v.shape))
            for k, v in state.items()
        }
        adapter = Adapter(path=folder, config=config, weights_file=bin_file, tensors=tensors, _loaded=state)
    else:
        raise AdapterError(f"{folder}: no {SAFETENSORS_NAME} (or {PICKLE_NAME}); the adapter folder is "
                           "incomplete - copy the weights file next to adapter_config.json")
    _classify(adapter)
    return adapter


def _st_name(t: Any) -> str:
    name = str(t.dtype).replace("torch.", "")
    for st, (torch_name, _) in DTYPES.items():
        if torch_name == name:
            return st
    raise AdapterError(f"adapter tensor dtype {name} is not supported")


_LORA_KEY = re.compile(r"^(?P<mod>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|"
                       r"lora_embedding_A|lora_embedding_B|lora_magnitude_vector(?:\.weight)?)$")
_TOKENS_KEY = re.compile(r"^(?P<mod>.+)\.token_adapter\.trainable_tokens_delta$")


def _classify(adapter: Adapter) -> None:
    empty = [k for k, t in adapter.tensors.items() if numel(t.shape) == 0]
    if empty:
        adapter.problems.append(
            f"{len(empty)} of {len(adapter.tensors)} tensors are empty (e.g. {empty[0]} "
            f"{list(adapter.tensors[empty[0]].shape)}): saved from ZeRO-3 shards without gathering them; "
            "re-save with the full state dict (stage3_gather_16bit_weights_on_model_save)"
        )
    parts: dict[str, dict[str, str]] = {}
    for key in adapter.tensors:
        m = _LORA_KEY.match(key)
        if m:
            parts.setdefault(m.group("mod"), {})[m.group("part").removesuffix(".weight")] = key
            continue
        m = _TOKENS_KEY.match(key)
        if m:
            mod = m.group("mod")
            adapter.token_adapters[mod] = TokenAdapter(mod, key, _token_indices(adapter, mod))
            continue
        # Whole tensors (modules_to_save, trained biases): `X.base_layer.bias` is the base `X.bias`.
        adapter.replacements[key.replace(".base_layer.", ".")] = key

    for mod, p in sorted(parts.items()):
        embedding = "lora_embedding_A" in p or "lora_embedding_B" in p
        a_key = p.get("lora_embedding_A" if embedding else "lora_A")
        b_key = p.get("lora_embedding_B" if embedding else "lora_B")
        if a_key is None or b_key is None:
            have = ", ".join(sorted(p))
            adapter.problems.append(f"{mod}: has {have} but no {'lora_A' if a_key is None else 'lora_B'}; "
                                    "the adapter file is incomplete")
            continue
        a, b = adapter.tensors[a_key], adapter.tensors[b_key]
        if a_key in empty or b_key in empty:
            continue  # reported above
        if len(a.shape) != 2 or len(b.shape) != 2:
            adapter.problems.append(f"{mod}: lora_A {list(a.shape)} / lora_B {list(b.shape)} are not matrices "
                                    "(convolution LoRA is not supported)")
            continue
        r, alpha = adapter.rank_alpha_for(mod)
        module = LoraModule(
            name=mod, kind="embedding" if embedding else "linear", r=a.shape[0], in_features=a.shape[1],
            out_features=b.shape[0], alpha=alpha, scaling=adapter.scaling_for(a.shape[0] or 1, alpha),
            a_key=a_key, b_key=b_key, bias_key=p.get("lora_B.bias"), magnitude_key=p.get("lora_magnitude_vector"),
            transposed=embedding or adapter.fan_in_fan_out,
        )
        adapter.modules[mod] = module
        if b.shape[1] != a.shape[0]:
            adapter.problems.append(f"{mod}: lora_A has rank {a.shape[0]} but lora_B has {b.shape[1]}; "
                                    "the adapter file is corrupt")
        elif a.shape[0] != r and numel(a.shape):
            adapter.problems.append(f"{mod}: rank {a.shape[0]} in the file but adapter_config.json gives r={r}; "
                                    "the config does not belong to these weights")
        if module.magnitude_key and adapter.tensors[module.magnitude_key].shape != (module.out_features,):
            adapter.problems.append(f"{mod}: DoRA magnitude has shape "
                                    f"{list(adapter.tensors[module.magnitude_key].shape)}, expected "
                                    f"[{module.out_features}]")
    if not empty and not adapter.modules and not adapter.replacements and not adapter.token_adapters:
        adapter.problems.append(f"{adapter.weights_file.name} holds no LoRA tensors")


def _token_indices(adapter: Adapter, module: str) -> list[int]:
    spec = adapter.config.get("trainable_token_indices")
    if isinstance(spec, list):
        return [int(i) for i in spec]
    if isinstance(spec, dict):
        for key, idx in spec.items():
            if module == key or module.endswith("." + key):
                return [int(i) for i in idx]
    adapter.problems.append(f"{module}: trainable tokens saved but adapter_config.json has no "
                            "trainable_token_indices for it")
    return []


def component_of(name: str, mimo_from: int | None, kimi: bool) -> str:
    """Component of an adapted module, as list-modules names it (`layers` when the base is unknown)."""
    from kimi_lora_cli.targets import generic_component, kimi_component

    if kimi:
        if mimo_from is None and name.startswith("model.layers."):
            return "layers"
        return kimi_component(name, mimo_from if mimo_from is not None else 0)
    return generic_component(name, {"lm_head", "embed_out", "output"})


def looks_like_kimi(adapter: Adapter) -> bool:
    mapping = adapter.config.get("auto_mapping") or {}
    if isinstance(mapping, dict) and "KimiAudio" in str(mapping.get("base_model_class", "")):
        return True
    return any(n.startswith(("model.mimo_layers.", "model.vq_adaptor.")) or n == "mimo_output"
               for n in [*adapter.modules, *(k.rsplit(".", 1)[0] for k in adapter.replacements)])
