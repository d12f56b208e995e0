"""Checkpoint folders: atomic writes, discovery for --resume-from-checkpoint, rotation, RNG state.

`checkpoint-N/` holds `trainable.safetensors` (every trainable tensor by parameter name), the adapter
itself for LoRA runs (`adapter_config.json` + `adapter_model.safetensors`, usable as-is),
`optimizer.pt`, `scheduler.pt`, `rng_state_<rank>.pt` and `trainer_state.json` (written last).
DeepSpeed runs keep the engine's own files under `deepspeed/` instead of trainable + optimizer.
Everything is written into `.tmp-checkpoint-N` and renamed into place, so a crash never leaves a
half-written `checkpoint-N` for a resume to pick up.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

from kimi_lora_cli.errors import ConfigError

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with trainer_state.json), oldest first."""
    if not output_dir.is_dir():
        return []
    found = []
    for p in output_dir.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def find_checkpoint(spec: str, output_dir: Path) -> Path:
    """`latest` (newest complete checkpoint of output_dir) or a checkpoint folder path."""
    if spec in ("latest", "last", "true", "True"):
        found = list_checkpoints(output_dir)
        if not found:
            raise ConfigError(f"{output_dir}: no checkpoint-N folder to resume from; drop "
                              "--resume-from-checkpoint to start fresh")
        return found[-1][1]
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise ConfigError(f"{path}: no such checkpoint folder; pass a checkpoint-N folder or 'latest'")
    if not (path / STATE_FILE).is_file():
        raise ConfigError(f"{path}: not a complete checkpoint (no {STATE_FILE}); pass a checkpoint-N folder")
    return path


def read_state(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{folder / STATE_FILE}: unreadable ({e}); resume from another checkpoint") from None


def tmp_dir_for(output_dir: Path, step: int) -> Path:
    return output_dir / f".tmp-checkpoint-{step}"


def finish(tmp: Path, final: Path, state: dict[str, Any]) -> None:
    """Write trainer_state.json last and rename the folder into place (rank 0 only)."""
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1), encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def rotate(output_dir: Path, limit: int | None, keep: list[Path] = ()) -> list[Path]:
    """Delete the oldest checkpoints beyond `limit` (never those in `keep`: the newest, the best)."""
    if not limit:
        return []
    found = list_checkpoints(output_dir)
    removed = []
    excess = len(found) - limit
    kept = {p.resolve() for p in keep}
    for _, path in found:
        if excess <= 0:
            break
        if path.resolve() in kept:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
        excess -= 1
    return removed


def clean_stale_tmp(output_dir: Path) -> None:
    if output_dir.is_dir():
        for p in output_dir.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_tensors(tensors: dict[str, Any], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path),
              metadata={"format": "pt"})


def load_tensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path))
