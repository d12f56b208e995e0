"""Device names as the commands accept them (checked before anything loads; no torch import at module
level), and the device `auto` (or no --device) stands for."""

from __future__ import annotations

import re

from kimi_lora_cli.errors import ConfigError

DEVICE_HELP = "cpu, cuda, cuda:1, mps, ... (default: cuda if available)."
_DEVICE = re.compile(r"^(cpu|cuda|mps|xpu|npu|hpu|meta)(:\d+)?$")


def check_device(value: str | None, flag: str = "--device", allow_auto: bool = True) -> str | None:
    """`value` unchanged when it names a device torch knows (cpu, cuda, cuda:1, mps, ...)."""
    if value is None or value == "" or (allow_auto and value == "auto"):
        return value
    if not _DEVICE.match(value) or value.startswith("meta"):
        raise ConfigError(f"{flag} {value!r} is not a device; use cpu, cuda, cuda:N or mps"
                          + (" (or auto)" if allow_auto else ""))
    return value


def resolve_device(device: str | None) -> str:
    """The torch device to load on: `device` as given, or cuda when it is there (cpu otherwise)."""
    import torch

    if device and device != "auto":
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: CUDA is not available here; use --device cpu")
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"
