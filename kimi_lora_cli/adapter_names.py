"""Adapters as the commands name them: `DIR` (named after the folder) or `NAME=DIR`, and `base`, the
model without adapter (no torch import)."""

from __future__ import annotations

from pathlib import Path

from kimi_lora_cli.errors import ConfigError

BASE = "base"  # the model without adapter: infer's variant, serve's model id


def parse_named_adapters(values: list[str], usage: str = "DIR or NAME=DIR",
                         model_ids: bool = False) -> tuple[tuple[str, Path], ...]:
    """(name, folder) of each `--adapter` value; names unique and not 'base'. `model_ids`: names are also
    what API clients send as `model`, so no spaces or slashes."""
    out: list[tuple[str, Path]] = []
    for v in values:
        name, sep, folder = v.partition("=")
        if not sep:
            folder, name = v, Path(v).expanduser().resolve().name
        if not name or not folder:
            raise ConfigError(f"--adapter {v!r}: use {usage}")
        if name == BASE:
            raise ConfigError(f"--adapter {v!r}: the name 'base' is reserved for the model without adapter; "
                              "pick another NAME=DIR")
        if any(n == name for n, _ in out):
            raise ConfigError(f"--adapter {v!r}: two adapters named {name!r}; name them with NAME=DIR")
        if model_ids and (any(c.isspace() for c in name) or "/" in name):
            raise ConfigError(f"--adapter {v!r}: the name {name!r} is what clients send as `model`; use one "
                              "without spaces or slashes (NAME=DIR)")
        out.append((name, Path(folder).expanduser()))
    return tuple(out)
