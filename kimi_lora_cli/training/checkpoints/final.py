"""What a training run writes: files moved into place one rename at a time, the PEFT adapter, and
the full fine-tuned model in the release layout."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from kimi_lora_cli.fileops import link_or_copy, naming_errors, write_atomic
from kimi_lora_cli.outputs import MARKER
from kimi_lora_cli.training.config import TrainConfig

MAX_SHARD_BYTES = 5 * 1024**3


def atomic_files(tmp: Path, dest: Path) -> list[Path]:
    """Move every file of `tmp` into `dest` (each rename atomic), then remove `tmp`."""
    dest.mkdir(parents=True, exist_ok=True)
    moved = []
    for f in sorted(tmp.rglob("*")):
        if f.is_file() and f.name != MARKER:
            target = dest / f.relative_to(tmp)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(f, target)
            moved.append(target)
    shutil.rmtree(tmp, ignore_errors=True)
    return moved


def save_adapter(unwrapped: Any, trainable: dict[str, Any], folder: Path) -> None:
    with naming_errors(folder / "adapter_model.safetensors"):
        unwrapped.save_pretrained(str(folder), state_dict=trainable, is_main_process=True,
                                  save_embedding_layers=False)
    readme = folder / "README.md"
    if readme.exists():
        readme.unlink()


def save_full_model(state: dict[str, Any], folder: Path, cfg: TrainConfig, loaded: Any) -> None:
    """Full fine-tuning: release tensor names, release-style shards + index, config, tokenizer and
    Whisper next to it, so the folder loads like the release."""
    import json

    import torch

    from kimi_lora_cli.training.checkpoints.folder import save_tensors

    dtype = torch.bfloat16 if cfg.bf16 else torch.float16 if cfg.fp16 else None
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in state.items()}
    groups, size = [[]], 0
    for k in state:
        nbytes = state[k].numel() * state[k].element_size()
        if groups[-1] and size + nbytes > MAX_SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += nbytes
    n = len(groups)
    weight_map, total = {}, 0
    for i, names in enumerate(groups, 1):
        shard = f"model-{i}-of-{n}.safetensors"
        save_tensors({k: state[k] for k in names}, folder / shard)
        for k in names:
            weight_map[k] = shard
            total += state[k].numel() * state[k].element_size()
    write_atomic(folder / "model.safetensors.index.json", json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    cfg_dict = loaded.config.to_dict()
    cfg_dict["torch_dtype"] = str(next(iter(state.values())).dtype).replace("torch.", "")
    write_atomic(folder / "config.json", json.dumps(cfg_dict, indent=2))
    info = loaded.info
    if info.tokenizer_source:
        for name in ("tiktoken.model", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
            src = Path(info.tokenizer_source) / name
            if src.is_file():
                link_or_copy(src, folder / name)
    wsrc = Path(info.whisper_source) if info.whisper_source else None
    wdir = folder / "whisper-large-v3"
    with naming_errors(wdir):
        wdir.mkdir()
    if wsrc is not None and wsrc.is_dir() and (wsrc / "model.safetensors").is_file():
        for f in wsrc.iterdir():
            if f.is_file():
                link_or_copy(f, wdir / f.name)
    else:
        enc = loaded.feature_encoder.encoder
        save_tensors({f"model.encoder.{k}": v for k, v in enc.state_dict().items()}, wdir / "model.safetensors")
        with naming_errors(wdir / "config.json"):
            enc.config.to_json_file(str(wdir / "config.json"))


def final_save_error(e: OSError, step: int, *, saved: bool, lora: bool, output_dir: Path, series: str) -> Exception:
    """The one message for a final save the OS refused: the file, the cause, what is on disk and how
    to finish (`saved`: the adapter / model itself is in place, only the run files failed)."""
    from kimi_lora_cli.errors import OutputError
    from kimi_lora_cli.fileops import describe_os_error
    from kimi_lora_cli.training.checkpoints import folder as ckpt

    what = "adapter" if lora else "model"
    text = describe_os_error(e).rstrip(".")
    if saved:
        return OutputError(f"{text}; the {what} in {output_dir} is complete and loads (step {step}): only "
                           "the loss curve, trainer_state.json or the model card is missing, nothing to redo")
    done = [(n, p) for n, p in ckpt.list_checkpoints(output_dir) if ckpt.owned_by(p, series)]
    if done:
        name, n = done[-1][1].name, done[-1][0]
        redo = f"continues from {name}" + (f", redoing steps {n + 1}-{step}" if n < step else "")
        return OutputError(f"{text}; the final {what} was not saved (nothing half-written is left): free some "
                           f"space, then rerun the same command with --resume-from-checkpoint latest ({redo})")
    return OutputError(f"{text}; the final {what} was not saved and the run saved no checkpoint (nothing "
                       "half-written is left): free some space and rerun the same command (it starts over in "
                       f"{output_dir}; a lower --save-steps keeps checkpoints to resume from)")
