"""Shared Annotated option types."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from kimi_lora_cli.devices import DEVICE_HELP

ModelArg = Annotated[Path, typer.Argument(help="Model folder: the Kimi-Audio release folder, a merged folder, "
                                          "or a Hugging Face causal LM folder.", show_default=False)]
TargetOpt = Annotated[str, typer.Option("--target", "-t", help="LoRA targets: all, component names "
                                        "(backbone,text,mimo,adaptor,heads), module names, globs, "
                                        "re:REGEX, TERM:a-b layer ranges.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON to stdout.")]
AllowPickleOpt = Annotated[bool, typer.Option("--allow-pickle", help="Allow unpickling .bin/.pt weight "
                                              "files (they can run code: only for files you trust).")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto (the checkpoint's), float32, bfloat16, float16.")]
DeviceOpt = Annotated[str, typer.Option("--device", help=DEVICE_HELP)]
