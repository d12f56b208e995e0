"""Reading tensor files, below the loading core: safetensors opened with one named error, pickled
weight files read with `torch.load(weights_only=True)` only, and `match_state`, the one comparison
of what a model expects with what a file holds (missing / unexpected / mismatched names, one wording
for every loader).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kimi_lora_cli.errors import KimiLoraError, ModelLoadError
from kimi_lora_cli.fileops import load_torch
from kimi_lora_cli.model_files import MODEL_PICKLE_FIX, read_safetensors_header


@contextmanager
def open_safetensors(path: Path) -> Iterator[Any]:
    """safetensors' `safe_open` (CPU, torch) after a header check; a file it cannot read becomes one
    line naming it. Errors raised by the caller's own code pass through unchanged."""
    from safetensors import safe_open

    read_safetensors_header(path)
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error type
        raise ModelLoadError(f"{path}: unreadable safetensors file ({e}); re-download it") from None
    with handle as f:
        try:
            yield f
        except (KimiLoraError, RuntimeError, NotImplementedError, KeyError, TypeError, ValueError):
            raise
        except Exception as e:  # a tensor the file claims but cannot deliver (truncated, corrupt)
            raise ModelLoadError(f"{path}: unreadable safetensors file ({e}); re-download it") from None


def load_weights_only(path: Path, mmap: bool = False, fix: str = MODEL_PICKLE_FIX) -> Any:
    """A pickled weight file read by the one pickle reader (`fileops.load_torch`: weights_only=True,
    so nothing in it can run; a file holding Python objects is refused in one line ending in `fix`)."""
    return load_torch(path, ModelLoadError, fix, mmap=mmap)


def iter_tensors(files: list[Path]) -> Iterator[tuple[Path, str, Callable[[], Any]]]:
    """(file, key, getter) over every tensor of the files, one file open at a time; a getter reads its
    tensor only when called (safetensors) ."""
    for path in files:
        if path.suffix != ".safetensors":
            state = load_weights_only(path)
            for k, v in state.items():
                yield path, k, (lambda v=v: v)
            continue
        with open_safetensors(path) as f:
            for k in f.keys():
                yield path, k, (lambda k=k, f=f: f.get_tensor(k))


def _first(names: list[str]) -> str:
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def shape_mismatch(where: Any, key: str, shape: tuple[int, ...], expected: tuple[int, ...],
                   config: str = "config.json") -> ModelLoadError:
    return ModelLoadError(f"{where}: tensor {key} has shape {tuple(shape)} but {config} implies {tuple(expected)}; "
                          "the config and the weights come from different models")


def names_mismatch(where: Any, missing: list[str], unexpected: list[str] = (), config: str = "config.json",
                   fix: str = "") -> ModelLoadError:
    parts = [f"{label} {len(names)} tensors ({_first(list(names))})"
             for label, names in (("missing", missing), ("unexpected", unexpected)) if names]
    return ModelLoadError(f"{where}: weights do not match {config}: {'; '.join(parts)}" + (f"; {fix}" if fix else ""))


def match_state(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], where: Any, *,
                config: str = "config.json", fix: str = "", strict: bool = True) -> None:
    """Raise one ModelLoadError unless `found` (name -> shape) is what `expected` describes: first a
    shape that differs, then the missing and the unexpected names. `strict=False` only compares
    the names both have (models whose tied weights may be absent)."""
    for key, shape in found.items():
        if key in expected and tuple(shape) != tuple(expected[key]):
            raise shape_mismatch(where, key, tuple(shape), tuple(expected[key]), config)
    if strict:
        missing = sorted(set(expected) - set(found))
        unexpected = sorted(set(found) - set(expected))
        if missing or unexpected:
            raise names_mismatch(where, missing, unexpected, config, fix)
