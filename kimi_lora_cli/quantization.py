"""Quantized decoder linears (QLoRA): nf4 / fp4 / int8 bitsandbytes layers filled tensor by tensor.

Only the linear layers of the two decoder stacks (`model.layers.*`, `model.mimo_layers.*`) are
quantized; Whisper, the adaptor, the embeddings, the norms and both heads stay in the load dtype,
which is also the compute dtype of the 4-bit layers. `quantize_skeleton` swaps the layers of a model
built on the meta device for bitsandbytes ones holding no data; `quantize_into` then fills one layer
from its full-precision tensor as the checkpoint is read, so no full-precision copy of the decoder
ever exists.

bitsandbytes is optional (`pip install 'kimi-lora[qlora]'`). It is always imported through
`import_bitsandbytes`: on import, its CPU backend asks the `kernels` package to download a compiled
kernel from the Hugging Face Hub and, when the Hub refuses, logs advice to trust remote code. Here
that download is never attempted (no network, no remote code): bitsandbytes then uses the kernels it
ships, and its warning is not shown.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kimi_lora_cli.errors import ModelLoadError

if TYPE_CHECKING:
    import torch

MODES = ("nf4", "fp4", "int8")
INSTALL = "pip install 'kimi-lora[qlora]'"
# Module names whose linear layers are quantized (the two decoder stacks).
DECODER_PREFIXES = ("model.layers.", "model.mimo_layers.")
CPU_BLOCK = 64  # bitsandbytes' 4-bit block size
_BNB_LOGGERS = ("bitsandbytes.backends.cpu.ops", "bitsandbytes.backends.mps.ops")


@dataclass(frozen=True)
class QuantSpec:
    """How the decoder linears are stored: `mode` nf4 / fp4 (4-bit, bitsandbytes Linear4bit) or int8
    (Linear8bitLt); `double_quant` also quantizes the 4-bit blocks' scales (about 0.4 bits per weight
    less). The compute dtype is the dtype the rest of the model loads in."""

    mode: str
    double_quant: bool = False

    @property
    def bits(self) -> int:
        return 8 if self.mode == "int8" else 4

    def describe(self) -> str:
        return self.mode + (" + double quant" if self.double_quant and self.bits == 4 else "")


def quant_spec(mode: str | QuantSpec | None, double_quant: bool = False, flag: str = "quantization") -> QuantSpec | None:
    """The spec for a mode name (None or "none": no quantization); a bad name is a one-line error."""
    if mode is None or isinstance(mode, QuantSpec):
        return mode
    name = str(mode).strip().lower()
    if name in ("", "none", "no"):
        return None
    if name not in MODES:
        raise ModelLoadError(f"{flag} {mode!r} is not a quantization; use one of {', '.join(MODES)}")
    return QuantSpec(name, bool(double_quant))


class _DropKernelAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


class _DropInt8CastNote(logging.Filter):
    """int8 layers always multiply in float16 (LLM.int8); bitsandbytes says so at every call of every
    layer whose input is not float16, which would flood a run's log. Said once, in --quantization's help."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


@contextmanager
def _no_hub_kernels() -> Iterator[None]:
    """While bitsandbytes loads: `import kernels` fails (so nothing is downloaded or run from the
    Hub) and the warning bitsandbytes logs about it is dropped."""
    saved = sys.modules.get("kernels", _MISSING)
    sys.modules["kernels"] = None  # type: ignore[assignment]  # `import kernels` raises ImportError
    loggers = [logging.getLogger(name) for name in _BNB_LOGGERS]
    drop = _DropKernelAdvice()
    for lg in loggers:
        lg.addFilter(drop)
    try:
        yield
    finally:
        if saved is _MISSING:
            sys.modules.pop("kernels", None)
        else:
            sys.modules["kernels"] = saved
        for lg in loggers:
            lg.removeFilter(drop)
        logging.getLogger("bitsandbytes.autograd._functions").addFilter(_DropInt8CastNote())
        mps = sys.modules.get("bitsandbytes.backends.mps.ops")
        if mps is not None and hasattr(mps, "_kernel_load_failed"):
            mps._kernel_load_failed = True  # its Hub kernel would be fetched at the first op: never


class _QuietLoader:
    """bitsandbytes' own loader, run inside `_no_hub_kernels`."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def create_module(self, spec: Any) -> Any:
        return self._inner.create_module(spec)

    def exec_module(self, module: Any) -> None:
        with _no_hub_kernels():
            self._inner.exec_module(module)

    def __getattr__(self, name: str) -> Any:  # resource readers and the like
        return getattr(self._inner, name)


class _QuietFinder:
    """Finds bitsandbytes as usual and hands it `_QuietLoader`, whoever imports it (peft does on
    `import peft`, transformers through peft), so the rule holds in every command and in the API."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "bitsandbytes":
            return None
        for finder in sys.meta_path:
            if isinstance(finder, _QuietFinder) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _QuietLoader(spec.loader)
                return spec
        return None


def guard_bitsandbytes_import() -> None:
    """Install `_QuietFinder` once (cheap: nothing is imported until someone imports bitsandbytes)."""
    if not any(isinstance(f, _QuietFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietFinder())


def bitsandbytes_installed() -> bool:
    import importlib.util

    if "bitsandbytes" in sys.modules:
        return sys.modules["bitsandbytes"] is not None
    return importlib.util.find_spec("bitsandbytes") is not None


def import_bitsandbytes(required: bool = True) -> Any:
    """bitsandbytes (imported through the guard); None when it is not installed and not `required`,
    else a one-line error naming what to install."""
    if sys.modules.get("bitsandbytes") is not None:
        return sys.modules["bitsandbytes"]
    guard_bitsandbytes_import()
    if not bitsandbytes_installed():
        if not required:
            return None
        raise ModelLoadError(f"quantized loading needs bitsandbytes, which is not installed: {INSTALL}")
    try:
        import bitsandbytes
    except Exception as e:  # a broken install: say what to reinstall
        if not required:
            return None
        raise ModelLoadError(f"bitsandbytes is installed but cannot be imported ({str(e).splitlines()[0]}); "
                             f"reinstall it: {INSTALL}") from None
    return bitsandbytes


_MISSING = object()


def quiet_bitsandbytes() -> None:
    """Import bitsandbytes the quiet way if it is installed and not yet imported."""
    import_bitsandbytes(required=False)


def check_backend(spec: QuantSpec, device: torch.device) -> None:
    """Quantize and use a tiny layer on `device`, so a bitsandbytes without a backend for it fails
    here, in one line, before any weight is read."""
    import torch

    bnb = import_bitsandbytes()
    try:
        w = torch.linspace(-1, 1, 64 * 64).reshape(64, 64)
        layer = new_layer(w.shape[1], w.shape[0], False, spec, torch.float32, device="cpu")
        quantize_into(layer, w, spec, torch.float32, device)
        out = layer(torch.ones(1, 64, device=device))
        ok = bool(torch.isfinite(out).all())
    except Exception as e:
        raise ModelLoadError(f"bitsandbytes {getattr(bnb, '__version__', '')} cannot run {spec.mode} layers on "
                             f"{device.type} ({str(e).splitlines()[0][:160]}); install a bitsandbytes build with a "
                             f"{device.type} backend ({INSTALL}) or load without quantization") from None
    if not ok:
        raise ModelLoadError(f"bitsandbytes gives non-finite {spec.mode} results on {device.type}; update it "
                             f"({INSTALL}) or load without quantization")


def is_decoder_linear(name: str) -> bool:
    return name.startswith(DECODER_PREFIXES)


def new_layer(in_features: int, out_features: int, bias: bool, spec: QuantSpec, compute_dtype: torch.dtype,
              device: Any = "meta") -> Any:
    """An empty bitsandbytes layer (weights filled later by `quantize_into`)."""
    import torch

    bnb = import_bitsandbytes()
    if spec.mode == "int8":
        layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=bias, has_fp16_weights=False, threshold=6.0,
                                    device=device)
    else:
        layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias, compute_dtype=compute_dtype,
                                  compress_statistics=spec.double_quant, quant_type=spec.mode,
                                  quant_storage=torch.uint8, device=device)
        # On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights in place for a faster kernel at
        # the first no-grad eval call: that layout has no input gradient (a training run evaluates,
        # then trains on), dequantizes wrongly through the public functions (DoRA, checks) and rounds
        # inputs to bfloat16, so results would depend on the CPU. Every CPU takes the same path here.
        layer.support_avx512bf16_for_cpu = False
    if bias:
        layer.bias = torch.nn.Parameter(torch.empty(out_features, dtype=compute_dtype, device=device))
    if torch.device(device).type == "meta":
        # Until `quantize_into` fills it, the weight is a plain meta tensor carrying what peft reads
        # when it wraps the layer (a meta 4-bit parameter cannot be copied, which DoRA's set-up does).
        placeholder = torch.nn.Parameter(torch.empty(out_features, in_features, dtype=compute_dtype, device=device),
                                         requires_grad=False)
        placeholder.quant_type, placeholder.compress_statistics = spec.mode, spec.double_quant
        layer.weight = placeholder
    return layer


def quantize_skeleton(model: Any, spec: QuantSpec, compute_dtype: torch.dtype, device: Any = None) -> list[str]:
    """Replace every linear layer of both decoder stacks of `model` (built on the meta device) by an
    empty bitsandbytes layer; returns their names. Marks the model as peft expects of a k-bit model,
    so its LoRA layers are the ones made for bitsandbytes. `device`: where the weights will go (checked
    against what bitsandbytes can do there)."""
    from torch import nn

    names = []
    for name, module in list(model.named_modules()):
        if not (is_decoder_linear(name) and type(module) is nn.Linear):
            continue
        if spec.bits == 4 and device is not None and str(device).startswith("cpu") and module.in_features % CPU_BLOCK:
            # bitsandbytes' CPU kernels dequantize row by row: a block must not span two rows
            raise ModelLoadError(f"{name}: {module.in_features} inputs; bitsandbytes' CPU {spec.mode} kernels need a "
                                 f"multiple of {CPU_BLOCK} (Kimi-Audio's sizes are) - load this model without "
                                 "quantization or on a GPU")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, new_layer(module.in_features, module.out_features, module.bias is not None, spec,
                                         compute_dtype))
        names.append(name)
    if not names:
        raise ModelLoadError("quantization found no decoder linear layer to quantize in this model")
    model.is_loaded_in_4bit = spec.bits == 4
    model.is_loaded_in_8bit = spec.bits == 8
    model.quantization = spec
    return names


def is_quantized_layer(module: Any) -> bool:
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def is_quantized_weight(t: Any) -> bool:
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(t, (bnb.nn.Params4bit, bnb.nn.Int8Params))


def quantize_into(layer: Any, weight: torch.Tensor, spec: QuantSpec, dtype: torch.dtype, device: Any) -> None:
    """Quantize one full-precision weight (cast to `dtype` first: the values the unquantized model
    would hold) straight onto `device` and make it `layer`'s weight."""
    import torch

    bnb = import_bitsandbytes()
    w = weight.detach().to(dtype)
    if tuple(w.shape) != (layer.out_features, layer.in_features):
        raise ModelLoadError(f"quantized layer expects a {layer.out_features}x{layer.in_features} weight, "
                             f"the checkpoint has {tuple(w.shape)}")
    if spec.mode == "int8":
        param = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    else:
        param = bnb.nn.Params4bit(w, requires_grad=False, quant_type=spec.mode, compress_statistics=spec.double_quant,
                                  quant_storage=torch.uint8, module=layer)
    layer.weight = param.to(device)


def quantized_bytes(model: Any) -> tuple[int, int]:
    """(bytes the quantized layers hold: weights, their scales and biases; number of such layers)."""
    total = n = 0
    for module in model.modules():
        if not is_quantized_layer(module):
            continue
        w = module.weight
        n += 1
        total += w.numel() * w.element_size()
        state = getattr(w, "quant_state", None)
        if state is not None:  # 4-bit: per-block scales (and their own scales with double quant)
            total += state.absmax.numel() * state.absmax.element_size()
            if state.state2 is not None:
                total += state.state2.absmax.numel() * state.state2.absmax.element_size() + 256 * 4
        scb = getattr(w, "SCB", None)
        if scb is None:
            scb = getattr(getattr(module, "state", None), "SCB", None)
        if scb is not None:  # int8: one scale per row
            total += scb.numel() * scb.element_size()
        if module.bias is not None:
            total += module.bias.numel() * module.bias.element_size()
    return total, n


def dequantized_weight(layer: Any) -> torch.Tensor:
    """The full-precision weight a quantized layer computes with (float32)."""
    import torch

    bnb = import_bitsandbytes()
    w = layer.weight
    if isinstance(w, bnb.nn.Params4bit):
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
    if isinstance(w, bnb.nn.Int8Params):
        scb = w.SCB if w.SCB is not None else layer.state.SCB
        return w.data.float() * (scb.float()[:, None] / 127.0)
    return torch.as_tensor(w).float()


def logical_numel(p: Any) -> int:
    """Parameters a tensor stands for: a 4-bit weight packs two in a byte."""
    state = getattr(p, "quant_state", None)
    if state is not None and is_quantized_weight(p):
        import math

        return math.prod(state.shape)
    return p.numel()


def summary(model: Any, spec: QuantSpec, dtype: torch.dtype, norms_fp32: bool = False) -> str:
    """One line for banners: what is quantized, its memory, what stays in `dtype`."""
    from kimi_lora_cli.formatting import human_bytes

    stored, n = quantized_bytes(model)
    full = sum(logical_numel(m.weight) + (m.bias.numel() if m.bias is not None else 0)
               for m in model.modules() if is_quantized_layer(m)) * dtype.itemsize
    name = str(dtype).replace("torch.", "")
    return (f"{spec.describe()}: {n} decoder linears (both stacks) in {human_bytes(stored)} ({human_bytes(full)} in "
            f"{name}); in {name}: Whisper, adaptor, embeddings, " + ("heads; norms float32" if norms_fp32 else
                                                                    "norms, heads"))


def trained_over(adapter_folder: Any) -> str | None:
    """The quantization a `kimi-lora train` adapter was trained over (its train_config.yaml), or None."""
    from pathlib import Path

    import yaml

    path = Path(adapter_folder) / "train_config.yaml"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    mode = data.get("quantization") if isinstance(data, dict) else None
    return mode if mode in MODES else None
