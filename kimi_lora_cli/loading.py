"""The one model-loading core: every command gets its model, tokenizer and feature encoder here.

`load_model(path, ...)` recognises
  * the Kimi-Audio release layout (config.json, sharded safetensors + index, `whisper-large-v3/`
    with `model.encoder.*` keys, tiktoken tokenizer),
  * the fine-tune layout (Whisper under `whisper_model.speech_encoder.*` in the main shards),
  * the export layout (`whisper-large-v3/` with `encoder.*` keys),
  * any other Hugging Face causal LM folder (transformers Auto classes, never remote code).
`weights=False` builds the model on the meta device from config.json alone and reads no tensor.
`quantization="nf4" | "fp4" | "int8"` (Kimi-Audio, bitsandbytes installed) quantizes the linear layers of both
decoder stacks while the tensors are read; the rest keeps `dtype` (see quantization.py).
`.bin` / `.pt` files are unpickled only with `allow_pickle=True`; code in the folder never runs.
`load_detokenizer(path)` reads the release's `audio_detokenizer/` + `vocoder/` (their `model.pt`
files with `torch.load(weights_only=True)`: plain tensors only).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kimi_lora_cli.errors import AdapterError, ConfigError, ModelLoadError
from kimi_lora_cli.model_files import (  # noqa: F401 (re-exported: the core's public names)
    ADAPTER_PICKLE_FIX,
    FINETUNE_WHISPER_PREFIX,
    INV_FREQ_SUFFIX,
    MODEL_PICKLE_FIX,
    WHISPER_DIR,
    ModelInfo,
    inspect_folder,
    read_adapter_config,
    read_json_object,
    read_safetensors_header,
)
from kimi_lora_cli.models.kimi_audio.configuration import KimiAudioConfig
from kimi_lora_cli.quantization import (
    QuantSpec,
    check_backend,
    quant_spec,
    quantize_skeleton,
    quiet_bitsandbytes,
)
from kimi_lora_cli.tensor_files import iter_tensors, match_state

if TYPE_CHECKING:
    import torch


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    feature_encoder: Any
    info: ModelInfo
    config: Any
    adapter_names: list[str] = field(default_factory=list)


# -------------------------------------------------------------------------------------------
# Loading
# -------------------------------------------------------------------------------------------


def resolve_dtype(dtype: str | torch.dtype | None, info: ModelInfo) -> torch.dtype:
    import torch

    if dtype is None or dtype == "auto":
        dtype = info.dtype or "float32"
    if isinstance(dtype, torch.dtype):
        return dtype
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    name = aliases.get(str(dtype), str(dtype)).replace("torch.", "")
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return value


@contextmanager
def skip_weight_init():
    """Build modules without running their random initialisers (weights are loaded or meta anyway).

    On the meta device the initialisers cost more than the build itself (they pull in torch's
    reference-op machinery, about a second), and on a real device they would be overwritten."""
    from torch import nn

    classes = (nn.Linear, nn.Embedding, nn.LayerNorm)
    saved = [c.reset_parameters for c in classes]
    try:
        for c in classes:
            c.reset_parameters = lambda self: None
        yield
    finally:
        for c, fn in zip(classes, saved):
            c.reset_parameters = fn


def build_kimi_model(config: KimiAudioConfig, device: str | torch.device = "meta"):
    import torch

    from kimi_lora_cli.models.kimi_audio.modeling import KimiAudioForCausalLM

    with torch.device(device), skip_weight_init():
        return KimiAudioForCausalLM(config)


def kimi_config(info: ModelInfo, attn_implementation: str = "sdpa") -> KimiAudioConfig:
    try:
        cfg = KimiAudioConfig.from_dict(info.config)
    except (TypeError, ValueError, AttributeError) as e:
        raise ModelLoadError(f"{info.path / 'config.json'}: {e}; restore the original config.json") from None
    cfg.attn_implementation = attn_implementation
    return cfg


def check_header_shapes(info: ModelInfo, shapes: dict[str, tuple[int, ...]]) -> None:
    """Raise ModelLoadError unless the tensors of a folder's headers (`shapes`) are what its
    config.json builds - the checks `load_model` makes, without reading a tensor. Kimi-Audio folders
    must match exactly; other models (tied weights may be absent) where both have a tensor."""
    skeleton = load_model(info.path, weights=False, load_whisper=False, load_tokenizer_=False)
    expected = {k: tuple(v.shape) for k, v in skeleton.model.state_dict().items()}
    present = {k: v for k, v in shapes.items() if not k.endswith(INV_FREQ_SUFFIX)
               and not k.startswith(FINETUNE_WHISPER_PREFIX)}
    match_state(expected, present, info.path, strict=info.is_kimi)


def load_tokenizer(info: ModelInfo):
    if info.kind != "kimi-audio":
        if not info.tokenizer_source:
            return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(info.tokenizer_source, trust_remote_code=False)
    from kimi_lora_cli.models.kimi_audio.tokenizer import KimiTokenizer, TokenizerLoadError

    if not info.tokenizer_source:
        raise ModelLoadError(
            f"{info.path}: no tiktoken.model here; pass the Kimi-Audio release folder (it holds the text "
            "tokenizer) as --model-name-or-path / base"
        )
    try:
        return KimiTokenizer.from_dir(info.tokenizer_source)
    except TokenizerLoadError as e:
        raise ModelLoadError(str(e)) from None


def load_model(
    path: str | Path,
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device = "cpu",
    adapters: list[tuple[str, str | Path]] | None = None,
    weights: bool = True,
    allow_pickle: bool = False,
    base_path: str | Path | None = None,
    load_whisper: bool = True,
    load_tokenizer_: bool = True,
    attn_implementation: str = "sdpa",
    adapters_trainable: bool = False,
    prepare: Callable[[Any], Any] | None = None,
    quantization: str | QuantSpec | None = None,
    double_quant: bool = False,
) -> LoadedModel:
    """Load a model folder (see module docstring). `adapters` = [(name, folder), ...] are
    attached with peft, the first one active. `base_path` is where tokenizer and Whisper are
    looked up when `path` lacks them (the guide's --model_name_or_path).

    `prepare(model)` (Kimi-Audio): the model is built on the meta device and handed to `prepare`
    before any tensor is read; it may wrap adapters and shard the model across processes (FSDP2)
    and returns the module to fill. Whatever is still on the meta device is then allocated on
    `device` and every parameter reads only the rows it holds, straight from the files, so no
    process holds a full CPU copy first. Adapter weights are left to the caller.

    `quantization` (nf4, fp4 or int8; `double_quant` for the 4-bit ones): the decoder linears become
    bitsandbytes layers, each quantized on `device` as its tensor is read (never a full-precision copy
    of the decoder); Whisper, adaptor, embeddings, norms and heads keep `dtype`, the layers' compute dtype."""
    import torch

    quant = quant_spec(quantization, double_quant)
    info = inspect_folder(path, allow_pickle=allow_pickle, need_weights=weights, base_path=base_path)
    torch_dtype = resolve_dtype(dtype, info)
    device = torch.device(device)
    encoder = None
    if quant is not None:
        if not info.is_kimi:
            raise ModelLoadError(f"{info.path}: quantization ({quant.mode}) loads Kimi-Audio folders; this is a "
                                 f"{info.kind} model - load it without quantization")
        if weights:
            check_backend(quant, device)  # bitsandbytes missing / without this device: one line, nothing read yet
            prepare = prepare or (lambda m: m)
    if prepare is not None and not (info.is_kimi and weights):
        raise ModelLoadError(f"{info.path}: a prepared (meta-device) load needs a Kimi-Audio folder with weights")
    if info.is_kimi:
        if prepare is not None:
            from kimi_lora_cli.models.kimi_audio.checkpoint import read_prepared

            shapes = {k: tuple(v["shape"]) for f in info.weight_files if f.suffix == ".safetensors"
                      for k, v in read_safetensors_header(f).items()}
            if shapes and all(f.suffix == ".safetensors" for f in info.weight_files):
                check_header_shapes(info, shapes)  # a wrong folder fails here, before any allocation
            cfg = kimi_config(info, attn_implementation)
            model, encoder = read_prepared(build_kimi_model(cfg), info, torch_dtype, device, base_path, load_whisper,
                                           prepare, quant)
        elif weights:
            from kimi_lora_cli.models.kimi_audio.checkpoint import read_weights

            cfg = kimi_config(info, attn_implementation)
            model = build_kimi_model(cfg)
            encoder = read_weights(model, info, torch_dtype, device, base_path, load_whisper)
        else:
            cfg = kimi_config(info, attn_implementation)
            model = build_kimi_model(cfg)
            info.num_parameters = sum(p.numel() for p in model.parameters())
            if quant is not None:
                quantize_skeleton(model.to(torch_dtype), quant, torch_dtype)
    else:
        model, cfg = _load_hf(info, torch_dtype, device, weights, allow_pickle)
    if info.is_kimi and prepare is None:
        model.name_or_path = str(info.path)  # peft saves it as the adapter's base_model_name_or_path
    tokenizer = load_tokenizer(info) if load_tokenizer_ else None
    loaded = LoadedModel(model=model, tokenizer=tokenizer, feature_encoder=encoder, info=info, config=cfg)
    if adapters:
        if not weights:
            raise ModelLoadError("adapters need real weights (weights=True)")
        attach_adapters(loaded, adapters, trainable=adapters_trainable, allow_pickle=allow_pickle)
    return loaded


def _load_hf(info: ModelInfo, dtype, device, weights: bool, allow_pickle: bool):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        cfg = AutoConfig.from_pretrained(str(info.path), trust_remote_code=False)
    except Exception as e:
        raise ModelLoadError(f"{info.path / 'config.json'}: transformers cannot read it ({e})") from None
    try:
        if not weights:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=False)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                str(info.path), dtype=dtype, trust_remote_code=False, use_safetensors=not allow_pickle
            ).to(device)
    except (ValueError, TypeError) as e:
        raise ModelLoadError(f"{info.path}: not a causal LM transformers can build ({e})") from None
    info.num_parameters = sum(p.numel() for p in model.parameters())
    return model, cfg


def attach_adapters(loaded: LoadedModel, adapters, *, trainable: bool = False, allow_pickle: bool = False) -> None:
    """Wrap `loaded.model` with one or more peft adapters (names must be unique)."""
    quiet_bitsandbytes()  # peft imports it to pick layer kinds: without its Hub-kernel warning
    from peft import PeftConfig, PeftModel

    model = loaded.model
    for i, (name, folder) in enumerate(adapters):
        folder = Path(folder).expanduser()
        check_adapter_folder(folder, allow_pickle)
        config = PeftConfig.from_pretrained(str(folder))
        # The task type only picks peft's wrapper class (CAUSAL_LM adds HF generate() plumbing); the
        # adapted modules and weights do not depend on it. One plain wrapper for every adapter, whatever
        # its task_type (CAUSAL_LM from the official recipe, null, absent), for Kimi-Audio and HF models.
        config.task_type = None
        config.inference_mode = not trainable
        try:
            if i == 0 and not isinstance(model, PeftModel):
                model = PeftModel.from_pretrained(model, str(folder), adapter_name=name, is_trainable=trainable,
                                                  config=config)
            else:
                model.add_adapter(name, config)
                if trainable:
                    model.set_requires_grad(name)
                model.load_adapter(str(folder), adapter_name=name, is_trainable=trainable)
        except (ValueError, RuntimeError, KeyError) as e:
            raise AdapterError(f"{folder}: adapter does not fit {loaded.info.path} ({str(e).splitlines()[0]})") from None
        loaded.adapter_names.append(name)
    model.set_adapter(loaded.adapter_names[0])
    loaded.model = model


def check_adapter_folder(folder: Path, allow_pickle: bool = False) -> None:
    if not folder.is_dir():
        raise AdapterError(f"{folder}: no such adapter folder; pass the output folder of `kimi-lora train`")
    read_adapter_config(folder)  # the same checks (and messages) as inspect-adapter
    if (folder / "adapter_model.safetensors").is_file():
        read_safetensors_header(folder / "adapter_model.safetensors")
        return
    if (folder / "adapter_model.bin").is_file():
        if not allow_pickle:
            raise AdapterError(
                f"{folder / 'adapter_model.bin'}: pickle adapter; pass --allow-pickle if you trust it"
            )
        from kimi_lora_cli.fileops import load_torch

        load_torch(folder / "adapter_model.bin", AdapterError, ADAPTER_PICKLE_FIX)  # refused here, not inside peft
        return
    raise AdapterError(f"{folder}: no adapter_model.safetensors; the adapter folder is incomplete")


# -------------------------------------------------------------------------------------------
# Audio front ends without the language model (prepare, on-the-fly tokenization)
# -------------------------------------------------------------------------------------------



def load_feature_encoder(path: str | Path, *, dtype: str | torch.dtype | None = "auto",
                         device: str | torch.device = "cpu", base_path: str | Path | None = None,
                         allow_pickle: bool = False):
    """Only the Whisper feature encoder of a Kimi-Audio folder (any layout); the LM is not read."""
    import torch

    from kimi_lora_cli.models.kimi_audio.checkpoint import read_whisper

    info = inspect_folder(path, allow_pickle=allow_pickle, base_path=base_path)
    if not info.is_kimi:
        raise ModelLoadError(f"{info.path}: not a Kimi-Audio folder; Whisper features need the Kimi-Audio "
                             "release folder (it holds whisper-large-v3/)")
    state: dict[str, torch.Tensor] = {}
    if info.layout == "finetune":
        prefix = FINETUNE_WHISPER_PREFIX
        files = sorted({f for k, f in info.weight_map.items() if k.startswith(prefix)}, key=lambda p: p.name)
        for _, key, get in iter_tensors(files):
            if key.startswith(prefix):
                state[key[len(prefix):]] = get()
    return read_whisper(info, state, resolve_dtype(dtype, info), torch.device(device), base_path)


def load_speech_tokenizer(path: str | Path, *, dtype: str | torch.dtype | None = "float32",
                          device: str | torch.device = "cpu"):
    """The GLM-4-Voice speech tokenizer from a local `glm-4-voice-tokenizer` folder (config.json +
    model.safetensors; tensor names bare or under `model.encoder.`; unused tensors ignored)."""
    import torch

    from kimi_lora_cli.models.speech_tokenizer.checkpoint import read_speech_tokenizer

    files = read_speech_tokenizer(path)
    info = ModelInfo(path=files.folder, kind="speech-tokenizer", layout="single-file", config=files.raw,
                     dtype=files.raw.get("torch_dtype") or files.raw.get("dtype"))
    return files.load(resolve_dtype(dtype, info), torch.device(device))


# -------------------------------------------------------------------------------------------
# Audio detokenizer (semantic codes -> waveform)
# -------------------------------------------------------------------------------------------


def check_detokenizer(path: str | Path):
    """The detokenizer configs of a release folder, checked, and both weight files present (no tensor read)."""
    from kimi_lora_cli.models.detokenizer.checkpoint import read_detokenizer_configs

    return read_detokenizer_configs(path)


def load_detokenizer(path: str | Path, *, dtype: str | torch.dtype | None = "bfloat16",
                     device: str | torch.device = "cpu", ode_steps: int | None = None):
    """`Detokenizer` (DiT + BigVGAN + streaming rules) from `path`/audio_detokenizer and `path`/vocoder;
    dtype "auto" is bfloat16, the dtype the official code runs them in."""
    import torch

    from kimi_lora_cli.models.detokenizer.checkpoint import build_detokenizer

    files = check_detokenizer(path)
    info = ModelInfo(path=files.root, kind="detokenizer", layout="release", config={}, dtype="bfloat16")
    torch_dtype = resolve_dtype(dtype, info)
    try:
        return build_detokenizer(files, torch_dtype, torch.device(device), ode_steps)
    except ValueError as e:  # streaming rules (ode_steps)
        raise ConfigError(str(e)) from None
