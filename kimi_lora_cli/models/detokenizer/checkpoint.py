"""Reading the detokenizer folders of a release: configs, `model.pt` files (tensors only), strict checks.

    <release>/audio_detokenizer/config.yaml   DiT config (see config.py)
    <release>/audio_detokenizer/model.pt      {"state_dict": {"speech_model.<name>": tensor, ...}, ...}
    <release>/vocoder/config.json             BigVGAN hyper-parameters
    <release>/vocoder/model.pt                {"generator": {"<name>": tensor, ...}, ...}

These are the layouts the official loader reads (`torch.load(...)["state_dict"]`, keys with the
`speech_model.` prefix; `torch.load(...)["generator"]`). Other top-level entries (optimizer states,
training metadata) and `state_dict` keys outside `speech_model.` are ignored; inside, every tensor
the config implies must be there with its shape, and nothing else. Files are opened with
`torch.load(weights_only=True)` (memory-mapped where the format allows, so a checkpoint that also
holds optimizer states costs only the tensors used): a pickled object is refused, never run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kimi_lora_cli.errors import ModelLoadError
from kimi_lora_cli.models.detokenizer.config import ConfigValueError, DiTConfig, VocoderConfig
from kimi_lora_cli.tensor_files import load_weights_only, match_state, names_mismatch, shape_mismatch

if TYPE_CHECKING:
    import torch

DETOKENIZER_DIR = "audio_detokenizer"
VOCODER_DIR = "vocoder"
DIT_PREFIX = "speech_model."
PICKLE_FIX = "re-save it as a dict of tensors, or re-download the release file"
FIX = "use the audio_detokenizer/ and vocoder/ folders of the Kimi-Audio release"


@dataclass(frozen=True)
class DetokenizerFiles:
    root: Path
    dit_config: DiTConfig
    vocoder_config: VocoderConfig

    @property
    def dit_weights(self) -> Path:
        return self.root / DETOKENIZER_DIR / "model.pt"

    @property
    def vocoder_weights(self) -> Path:
        return self.root / VOCODER_DIR / "model.pt"


def read_detokenizer_configs(root: str | Path) -> DetokenizerFiles:
    """Parse both configs and check both weight files exist (no tensor is read)."""
    import yaml

    root = Path(root).expanduser()
    det, voc = root / DETOKENIZER_DIR, root / VOCODER_DIR
    for folder in (det, voc):
        if not folder.is_dir():
            raise ModelLoadError(f"{folder}: not found; spoken answers need the Kimi-Audio detokenizer "
                                 f"({DETOKENIZER_DIR}/ and {VOCODER_DIR}/ of the release folder): pass the release "
                                 "folder with --detokenizer, or link both folders next to the model")
    for f in (det / "config.yaml", det / "model.pt", voc / "config.json", voc / "model.pt"):
        if not f.is_file():
            raise ModelLoadError(f"{f}: not found; {FIX} (re-download it)")
    yaml_file = det / "config.yaml"
    try:
        data = yaml.safe_load(yaml_file.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{yaml_file}:{mark.line + 1}" if mark is not None else str(yaml_file)
        raise ModelLoadError(f"{where}: invalid YAML ({getattr(e, 'problem', None) or e}); restore the original "
                             "file") from None
    try:
        dit_cfg = DiTConfig.from_yaml_dict(data)
    except ConfigValueError as e:
        raise ModelLoadError(f"{yaml_file}: {e}; {FIX}") from None
    json_file = voc / "config.json"
    try:
        voc_cfg = VocoderConfig.from_json_dict(json.loads(json_file.read_text(encoding="utf-8")))
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{json_file}:{e.lineno}: invalid JSON ({e.msg}); restore the original file") from None
    except ConfigValueError as e:
        raise ModelLoadError(f"{json_file}: {e}; {FIX}") from None
    if voc_cfg.num_mels != dit_cfg.input_size:
        raise ModelLoadError(f"{json_file}: num_mels {voc_cfg.num_mels} but {yaml_file.name} has input_size "
                             f"{dit_cfg.input_size}; both folders must come from the same release")
    return DetokenizerFiles(root=root, dit_config=dit_cfg, vocoder_config=voc_cfg)


def _section(obj: Any, key: str, path: Path) -> dict[str, Any]:
    if not isinstance(obj, dict) or not isinstance(obj.get(key), dict):
        found = sorted(map(str, obj))[:5] if isinstance(obj, dict) else type(obj).__name__
        raise ModelLoadError(f"{path}: no '{key}' dict of tensors (found {found}); {FIX}")
    return obj[key]


def _check_shape(path: Path, key: str, t: Any, expected: tuple[int, ...], config: str) -> None:
    import torch

    if not isinstance(t, torch.Tensor):
        raise ModelLoadError(f"{path}: entry {key} is a {type(t).__name__}, not a tensor; {FIX}")
    if tuple(t.shape) != expected:
        raise shape_mismatch(path, key, tuple(t.shape), expected, config)


def _assign(module: Any, state: dict[str, torch.Tensor]) -> None:
    module.load_state_dict(state, strict=True, assign=True)
    module.requires_grad_(False)
    module.eval()


def load_dit(files: DetokenizerFiles, dtype: torch.dtype, device: torch.device):
    """The DiT of `audio_detokenizer/model.pt`, strictly checked against config.yaml."""
    import torch

    from kimi_lora_cli.models.detokenizer.dit import DiT

    path = files.dit_weights
    with torch.device("meta"):
        model = DiT(files.dit_config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    raw = _section(load_weights_only(path, mmap=True, fix=PICKLE_FIX), "state_dict", path)
    found = {k[len(DIT_PREFIX):]: k for k in raw if isinstance(k, str) and k.startswith(DIT_PREFIX)}
    for key in found.values():
        if not isinstance(raw[key], torch.Tensor):
            raise ModelLoadError(f"{path}: entry {key} is a {type(raw[key]).__name__}, not a tensor; {FIX}")
    match_state({DIT_PREFIX + k: shape for k, shape in expected.items()},
                {key: tuple(raw[key].shape) for key in found.values()}, path, config="config.yaml", fix=FIX)
    state = {name: raw[key].to(device=device, dtype=dtype) for name, key in found.items()}
    _assign(model, state)
    return model


def load_vocoder(files: DetokenizerFiles, dtype: torch.dtype, device: torch.device):
    """BigVGAN of `vocoder/model.pt`; weight-normalised convolutions are folded in `dtype`."""
    import torch

    from kimi_lora_cli.models.detokenizer.vocoder import BigVGAN

    path = files.vocoder_weights
    with torch.device("meta"):
        model = BigVGAN(files.vocoder_config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    raw = _section(load_weights_only(path, mmap=True, fix=PICKLE_FIX), "generator", path)
    normed = set(model.weight_normed())
    state: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    for name, shape in expected.items():
        prefix, _, leaf = name.rpartition(".")
        g_key, v_key = f"{prefix}.weight_g", f"{prefix}.weight_v"
        if leaf == "weight" and prefix in normed and name not in raw and (g_key in raw or v_key in raw):
            if g_key not in raw or v_key not in raw:
                missing.append(v_key if g_key in raw else g_key)
                continue
            _check_shape(path, v_key, raw[v_key], shape, "config.json")
            g, v = raw[g_key], raw[v_key]
            g_shape = (shape[0],) + (1,) * (len(shape) - 1)
            _check_shape(path, g_key, g, g_shape, "config.json")
            g, v = g.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype)
            state[name] = torch._weight_norm(v, g, 0)  # g * v / |v|, the norm over all dims but 0
            used.update((g_key, v_key))
        elif name in raw:
            _check_shape(path, name, raw[name], shape, "config.json")
            state[name] = raw[name].to(device=device, dtype=dtype)
            used.add(name)
        else:
            missing.append(name)
    unexpected = sorted(set(map(str, raw)) - used)
    if missing or unexpected:
        raise names_mismatch(path, missing, unexpected, "config.json", FIX)
    _assign(model, state)
    return model


def build_detokenizer(files: DetokenizerFiles, dtype: torch.dtype, device: torch.device, ode_steps: int | None = None):
    """`Detokenizer` with both checkpoints loaded and the official streaming rules (`ode_steps` changed)."""
    import dataclasses

    from kimi_lora_cli.models.detokenizer.streaming import Detokenizer, StreamingRules

    rules = StreamingRules() if ode_steps is None else dataclasses.replace(StreamingRules(), ode_steps=ode_steps)
    return Detokenizer(load_dit(files, dtype, device), load_vocoder(files, dtype, device), rules)
