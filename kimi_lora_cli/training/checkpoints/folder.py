"""Checkpoint folders: atomic writes, discovery for --resume-from-checkpoint, rotation, RNG state.

`checkpoint-N/` holds `trainable.safetensors` (every trainable tensor by parameter name), the adapter
itself for LoRA runs (`adapter_config.json` + `adapter_model.safetensors`, usable as-is),
`optimizer.pt`, `scheduler.pt` (tensors and numbers only), `rng_state_<rank>.json` and
`trainer_state.json` (written last; it records the run's settings, its series and run id).
DeepSpeed runs keep the engine's own files under `deepspeed/` instead of trainable + optimizer.
Everything is written into `.tmp-checkpoint-N-<run id>` and renamed into place, so a crash never
leaves a half-written `checkpoint-N` for a resume to pick up.

Nothing read here can run code: `.pt` files are read with `torch.load(weights_only=True)` (plain
tensors, numbers, strings and containers only), the rest is JSON and safetensors.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path
from typing import Any

from kimi_lora_cli.errors import ConfigError
from kimi_lora_cli.fileops import naming_errors, remove_tree

LATEST = ("latest", "last", "true", "True")  # --resume-from-checkpoint values meaning "the newest"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
# Temporary entries of a run: `.tmp-checkpoint-N-<run>`, `.tmp-final-<run>`, `.<file>.<run>.tmp`.
TMP_RE = re.compile(r"^\.tmp-(?:checkpoint-\d+|final)-(?P<run>[0-9a-f]{12})$")
TMP_FILE_RE = re.compile(r"^\.[\w.-]+\.(?P<run>[0-9a-f]{12})\.tmp$")


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
    if spec in LATEST:
        if not output_dir.is_dir():
            # Most often a relative --output-dir read from another folder than the run's.
            where = "" if output_dir.is_absolute() else f" (read from the current folder {Path.cwd()})"
            raise ConfigError(f"--resume-from-checkpoint {spec}: --output-dir {output_dir} does not exist{where}; "
                              "pass the --output-dir of the run to resume (its train_config.yaml records it "
                              "absolute: --config RUN/train_config.yaml)")
        found = list_checkpoints(output_dir)
        if not found:
            raise ConfigError(f"{output_dir}: no checkpoint-N folder to resume from (a run saves one every "
                              "--save-steps steps and when stopped); drop --resume-from-checkpoint to start fresh")
        return found[-1][1]
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise ConfigError(f"{path}: no such checkpoint folder; pass a checkpoint-N folder or 'latest'")
    if not (path / STATE_FILE).is_file():
        raise ConfigError(f"{path}: not a complete checkpoint (no {STATE_FILE}); pass a checkpoint-N folder")
    return path


def read_state(folder: Path) -> dict[str, Any]:
    try:
        state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{folder / STATE_FILE}: unreadable ({e}); resume from another checkpoint") from None
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        raise ConfigError(f"{folder / STATE_FILE}: not a kimi-lora trainer state (no global_step); resume from "
                          "another checkpoint")
    return state


def tmp_dir_for(output_dir: Path, step: int, run_id: str) -> Path:
    return output_dir / f".tmp-checkpoint-{step}-{run_id}"


def finish(tmp: Path, final: Path, state: dict[str, Any]) -> None:
    """Write trainer_state.json last and rename the folder into place (rank 0 only). An existing
    checkpoint of the same step is replaced only when it belongs to this run's series."""
    with naming_errors(tmp / STATE_FILE):
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1), encoding="utf-8")
    if final.exists():
        if not owned_by(final, state.get("series")):
            raise ConfigError(f"{final} exists and was not written by this training run; move it away or "
                              "use another --output-dir")
        remove_tree(final)
    with naming_errors(final):
        os.replace(tmp, final)


def owned_by(checkpoint: Path, series: str | None) -> bool:
    """True when `checkpoint` records the same series (the run and its resumptions)."""
    if not series:
        return False
    try:
        return json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8")).get("series") == series
    except (OSError, ValueError, AttributeError):
        return False


def rotate(output_dir: Path, limit: int | None, series: str | None, keep: list[Path] = ()) -> list[Path]:
    """Delete the oldest checkpoints of this run's series beyond `limit` (never those in `keep`: the
    newest, the best; never a checkpoint another run wrote)."""
    if not limit:
        return []
    found = [(n, p) for n, p in list_checkpoints(output_dir) if owned_by(p, series)]
    removed = []
    excess = len(found) - limit
    kept = {p.resolve() for p in keep}
    for _, path in found:
        if excess <= 0:
            break
        if path.resolve() in kept:
            continue
        remove_tree(path)
        removed.append(path)
        excess -= 1
    return removed


def clean_stale_tmp(output_dir: Path, current_run: str, dead_runs: tuple[str, ...] = ()) -> list[Path]:
    """Remove temporary entries that earlier, killed runs of this tool left. Their name carries a
    run id; a folder is also known as ours by our marker inside it, or (killed before the marker was
    written or after it was removed) by the run id being that of a run known to be over
    (`dead_runs`: the folder marker's and the taken-over lock's). Called under the folder's lock, so
    no other run is writing them; entries of other tools never match."""
    from kimi_lora_cli.outputs import marker_info

    removed = []
    if not output_dir.is_dir():
        return removed
    for p in sorted(output_dir.iterdir()):
        m = TMP_RE.match(p.name) or TMP_FILE_RE.match(p.name)
        if not m or m.group("run") == current_run:
            continue
        if p.is_dir() and m.group("run") not in dead_runs:
            info = marker_info(p)
            if info is None or info.get("command") != "train":
                continue
        remove_tree(p)
        removed.append(p)
    return removed


# -------------------------------------------------------------------------------------------
# RNG state: JSON, no pickle
# -------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss], "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def save_rng(folder: Path, rank: int) -> None:
    path = folder / f"rng_state_{rank}.json"
    with naming_errors(path):
        path.write_text(json.dumps(rng_state()), encoding="utf-8")


def load_rng(folder: Path, rank: int) -> dict[str, Any] | None:
    """This rank's RNG state (None when the checkpoint has none for it)."""
    path = folder / f"rng_state_{rank}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise ConfigError(f"{path}: unreadable RNG state ({e}); resume from another checkpoint") from None
    old = folder / f"rng_state_{rank}.pt"  # checkpoints of earlier versions
    if old.is_file():
        import numpy as np

        state = load_torch_file(old, extra_safe=_numpy_safe_globals())
        keys = state["numpy"][1]
        state["numpy"] = [state["numpy"][0], np.asarray(keys).tolist(), *state["numpy"][2:]]
        state["python"] = [state["python"][0], list(state["python"][1]), state["python"][2]]
        state["torch"] = state["torch"].tolist()
        if "cuda" in state:
            state["cuda"] = [s.tolist() for s in state["cuda"]]
        return state
    return None


def _numpy_safe_globals() -> list[Any]:
    """numpy's array reconstruction (the random state holds one uint32 array): data, no code."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_torch_file(path: Path, extra_safe: list[Any] | None = None) -> Any:
    """torch.load(weights_only=True): tensors, numbers, strings and containers only - a file that
    holds anything else (which could run code when unpickled) is refused, not executed."""
    from kimi_lora_cli.fileops import load_torch

    return load_torch(path, ConfigError, "resume from a checkpoint kimi-lora wrote, or another checkpoint",
                      extra_safe=extra_safe)


def save_tensors(tensors: dict[str, Any], path: Path) -> None:
    from safetensors.torch import save_file

    with naming_errors(path):
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path),
                  metadata={"format": "pt"})


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """{name: shape} from a safetensors header (no tensor read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type
        raise ConfigError(f"{path}: unreadable ({str(e).splitlines()[0][:160]}); resume from another "
                          "checkpoint") from None
