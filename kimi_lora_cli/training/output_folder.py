"""`train`'s output folder: checked against the inputs, refused when another run's files are in it
(unless resuming or --overwrite-output-dir), locked while a run writes, and compared with the
checkpoint's settings on resume.

A fresh run starts a *series* (an id in the folder's `.kimi-lora.json` and in every checkpoint's
`trainer_state.json`); resumptions continue it. Each process run also has a *run id*, carried by
the names of its temporary entries. Rotation (--save-total-limit) only deletes checkpoints of the
series; start-up only removes temporary entries of dead runs of this tool.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path
from typing import Any

from kimi_lora_cli.errors import ConfigError
from kimi_lora_cli.outputs import FolderLock, check_output, marker_info, user_entries, write_marker
from kimi_lora_cli.training.checkpoints import folder as ckpt
from kimi_lora_cli.training.config import TrainConfig

# Settings a resumed run may change on purpose (more steps, another learning rate, how often to
# save / log / evaluate, where the run executes); every other difference stops the resume.
RESUMABLE_CHANGES = ("max_steps", "num_train_epochs", "learning_rate", "save_steps", "save_total_limit",
                     "logging_steps", "eval_steps", "evaluation_strategy", "per_device_eval_batch_size",
                     "report_to", "device", "gradient_checkpointing", "feature_cache_dir", "fsdp_cpu_offload", "output_dir",
                     "resume_from_checkpoint", "overwrite_output_dir")
UNREPORTED = ("output_dir", "resume_from_checkpoint", "overwrite_output_dir")
# Compared through the global batch (processes x per-device batch x accumulation) instead.
BATCH_KEYS = ("per_device_train_batch_size", "gradient_accumulation_steps")
PATH_KEYS = ("model_name_or_path", "model_path", "data_path", "eval_data_path", "speech_tokenizer", "deepspeed",
             "feature_cache_dir")

# What `kimi-lora train` writes at the top of its output folder (--overwrite-output-dir removes these).
RUN_FILES = {"train_config.yaml", "adapter_config.json", "adapter_model.safetensors", "loss_curve.png",
             "config.json", "model.safetensors.index.json", "tiktoken.model", "tokenizer_config.json",
             "special_tokens_map.json", "generation_config.json", "logs", "whisper-large-v3", "trainer_state.json"}
SHARD_RE = re.compile(r"^model-\d+-of-\d+\.safetensors$")


def resolved_paths(cfg: TrainConfig) -> dict[str, str | None]:
    """The input paths of a run made absolute (a checkpoint records them so a resume from another
    working folder compares the same files); shipped DeepSpeed names (zero2, zero3) stay names."""
    out: dict[str, str | None] = {}
    for key in PATH_KEYS:
        value = getattr(cfg, key)
        if value and (key != "deepspeed" or value.endswith(".json")):
            value = str(Path(value).expanduser().resolve())
        out[key] = value
    return out


# Paths train_config.yaml, the model card and adapter_config.json record absolute, so a run can be
# repeated or resumed (`--config OUT/train_config.yaml`) and the card used from any folder; the
# console keeps showing them as typed.
ABSOLUTE_KEYS = ("model_name_or_path", "model_path", "data_path", "eval_data_path", "output_dir",
                 "feature_cache_dir", "speech_tokenizer")
RESUME_WORDS = ("latest", "last", "true", "True")


def absolute(path: str) -> str:
    """`path` made absolute against the current folder (symbolic links kept as typed)."""
    return os.path.abspath(Path(path).expanduser())


def with_absolute_paths(cfg: TrainConfig) -> TrainConfig:
    changes = {key: absolute(getattr(cfg, key)) for key in ABSOLUTE_KEYS if getattr(cfg, key)}
    if cfg.deepspeed and cfg.deepspeed.endswith(".json"):  # shipped names (zero2, zero3) stay names
        changes["deepspeed"] = absolute(cfg.deepspeed)
    if cfg.resume_from_checkpoint and cfg.resume_from_checkpoint not in RESUME_WORDS:
        changes["resume_from_checkpoint"] = absolute(cfg.resume_from_checkpoint)
    return cfg.with_(**changes)


def data_digest(cfg: TrainConfig) -> str | None:
    from kimi_lora_cli.data.features import file_sha256

    path = Path(cfg.data_path).expanduser() if cfg.data_path else None
    return file_sha256(path) if path is not None and path.is_file() else None


class OutputDir:
    """The output folder of one training process (every rank checks, rank 0 claims and writes)."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.path = Path(cfg.output_dir).expanduser()
        self.run_id = uuid.uuid4().hex[:12]
        self.series: str | None = None
        self.lock = FolderLock(self.path, "train", extra={"run_id": self.run_id})
        self.notes: list[str] = []
        self.restart = False  # a fresh run in the folder of a run that stopped before its first checkpoint

    # -- before any weight is read ------------------------------------------------------------
    def check(self, resuming: bool) -> None:
        """Inputs never overlap the output; a used folder needs a resume or --overwrite-output-dir."""
        cfg = self.cfg
        check_output(self.path, [("model folder", cfg.model_name_or_path), ("weights folder", cfg.model_path),
                                 ("data file", cfg.data_path), ("speech tokenizer folder", cfg.speech_tokenizer)],
                     flag="--output-dir")
        entries = [e for e in user_entries(self.path) if not _stale_tmp(e)]
        if not entries:
            return
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        if resuming:
            info = marker_info(self.path)
            if (info is not None and info.get("command") != "train") or (
                    info is None and not ckpt.list_checkpoints(self.path)):
                raise ConfigError(f"--output-dir {self.path} holds files not written by kimi-lora train ({shown}); "
                                  "resume into the folder of the interrupted run or into a new folder")
            return
        if not cfg.overwrite_output_dir and self.restartable():
            self.restart = True
            return
        if not cfg.overwrite_output_dir:
            raise ConfigError(f"--output-dir {self.path} already holds files ({shown}); pass "
                              "--resume-from-checkpoint latest to continue that run, --overwrite-output-dir "
                              "to replace it, or choose a new folder")
        info = marker_info(self.path)
        if info is None or info.get("command") != "train":
            made = f"made by `kimi-lora {info['command']}`" if info else "not made by kimi-lora train"
            raise ConfigError(f"--output-dir {self.path} holds files {made} ({shown}); "
                              "--overwrite-output-dir only replaces a folder `kimi-lora train` wrote - choose a "
                              "new folder (or empty this one yourself)")

    def restartable(self) -> bool:
        """True for the folder of a `train` run that stopped before its first checkpoint: it holds
        nothing but that run's train_config.yaml and logs, so a fresh run may start there (the logs
        are set aside, see `claim`)."""
        info = marker_info(self.path)
        if info is None or info.get("command") != "train":
            return False
        entries = [e for e in user_entries(self.path) if not _stale_tmp(e)]
        return bool(entries) and set(entries) <= {"train_config.yaml", "logs"}

    def no_checkpoint(self) -> ConfigError:
        """The refusal of `--resume-from-checkpoint latest` in a folder without checkpoints, with
        the advice that works there."""
        if self.restartable():
            return ConfigError(f"{self.path}: no checkpoint-N folder to resume from (the earlier run stopped before "
                               "its first checkpoint); drop --resume-from-checkpoint to start over in this folder "
                               "(its logs are kept aside)")
        if self.path.is_dir() and [e for e in user_entries(self.path) if not _stale_tmp(e)]:
            return ConfigError(f"{self.path}: no checkpoint-N folder to resume from, and the folder holds other "
                               "files; resume into the folder of the interrupted run, or drop "
                               "--resume-from-checkpoint and choose a new --output-dir")
        return ConfigError(f"{self.path}: no checkpoint-N folder to resume from; drop --resume-from-checkpoint to "
                           "start fresh")

    # -- rank 0, right before the weights load ------------------------------------------------
    def claim(self, resume_state: dict[str, Any] | None) -> None:
        """Create and lock the folder, remove dead runs' temporary entries, start or continue the
        series, and (with --overwrite-output-dir) remove the previous run's files."""
        from kimi_lora_cli.fileops import naming_errors

        self.created = not self.path.exists()
        with naming_errors(self.path):
            self.path.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        if self.lock.note:
            self.notes.append(self.lock.note)
        try:
            info = marker_info(self.path)
            over = tuple(str(x["run_id"]) for x in (info, self.lock.previous) if x and x.get("run_id"))
            removed = ckpt.clean_stale_tmp(self.path, self.run_id, over)
            if removed:
                self.notes.append(f"removed {len(removed)} unfinished entries of an interrupted run "
                                  f"({', '.join(p.name for p in removed[:3])})")
            if resume_state is not None:
                self.series = resume_state.get("series") or (info or {}).get("series") or uuid.uuid4().hex[:12]
            else:
                if self.cfg.overwrite_output_dir:
                    self._remove_previous_run((info or {}).get("series"))
                elif self.restart:
                    self._set_aside_logs((info or {}).get("series"))
                self.series = uuid.uuid4().hex[:12]
            write_marker(self.path, "train", series=self.series, run_id=self.run_id)
        except BaseException:
            self.lock.release()
            raise

    def _set_aside_logs(self, series: str | None) -> None:
        """The earlier run stopped before its first checkpoint: keep its metrics under another name."""
        from kimi_lora_cli.fileops import naming_errors

        old = self.path / "logs" / "metrics.jsonl"
        note = f"{self.path}: the earlier run stopped before its first checkpoint; starting over"
        if old.is_file():
            kept = old.with_name(f"metrics.{series or self.run_id}.jsonl")
            with naming_errors(kept):
                os.replace(old, kept)
            note += f" (its metrics kept as {kept.relative_to(self.path)})"
        self.notes.append(note)

    def _remove_previous_run(self, series: str | None) -> None:
        from kimi_lora_cli.fileops import remove_tree
        from kimi_lora_cli.training.model_card import is_card

        removed, kept = [], []
        for p in sorted(self.path.iterdir()):
            if p.name in RUN_FILES or SHARD_RE.match(p.name) or (p.name == "README.md" and is_card(p)):
                remove_tree(p)
                removed.append(p.name)
            elif ckpt.CHECKPOINT_RE.match(p.name) and p.is_dir() and ckpt.owned_by(p, series):
                remove_tree(p)  # the previous run's (its series is the folder marker's)
                removed.append(p.name)
            elif not p.name.startswith(".kimi-lora"):
                kept.append(p.name)
        if removed:
            self.notes.append(f"--overwrite-output-dir: removed the previous run's {', '.join(removed[:6])}"
                              + (", ..." if len(removed) > 6 else ""))
        if kept:
            self.notes.append(f"kept {', '.join(kept[:6])} (not written by kimi-lora train)")

    def release(self, before_start: bool = False) -> None:
        """Unlock. `before_start`: the run failed before training began, so a folder it created and
        that holds nothing but the marker is removed again."""
        held = self.lock.held
        self.lock.release()
        if before_start and held and getattr(self, "created", False) and not user_entries(self.path):
            from kimi_lora_cli.fileops import remove_tree

            remove_tree(self.path)

    def tmp_name(self, what: str) -> Path:
        return self.path / f".tmp-{what}-{self.run_id}"


def _stale_tmp(name: str) -> bool:
    return bool(ckpt.TMP_RE.match(name) or ckpt.TMP_FILE_RE.match(name))


def check_resume(cfg: TrainConfig, state: dict[str, Any], folder: Path, world: int, digest: str | None) -> list[str]:
    """Refuse a resume whose checkpoint was trained with other settings; returns the allowed
    changes (as `key old -> new`) for the caller to report."""
    saved = state.get("config")
    if not isinstance(saved, dict):
        return ["(the checkpoint records no settings: they could not be compared)"]
    current = cfg.to_dict()
    paths = state.get("paths") or {}
    now_paths = resolved_paths(cfg)
    differences, allowed = [], []
    for key, new in current.items():
        if key not in saved or key in BATCH_KEYS:
            continue
        old = saved[key]
        if key in PATH_KEYS:  # compared as absolute paths (recorded so, or resolved here)
            new = now_paths.get(key)
            old = paths[key] if key in paths else (str(Path(old).expanduser().resolve()) if old else old)
        if _same(old, new):
            continue
        change = f"{key} {_show(old)} -> {_show(new)}"
        if key not in RESUMABLE_CHANGES:
            differences.append(change)
        elif key not in UNREPORTED:
            allowed.append(change)
    recorded = state.get("data_sha256")
    if recorded and digest and recorded != digest and not any(d.startswith("data_path ") for d in differences):
        differences.append(f"data_path content changed since the checkpoint ({cfg.data_path})")
    batch = world * cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    if state.get("global_batch", batch) != batch:
        differences.append(f"global batch {state['global_batch']} -> {batch} (processes x per-device batch x "
                           "accumulation)")
    if differences:
        shown = "; ".join(differences[:6]) + (f"; and {len(differences) - 6} more" if len(differences) > 6 else "")
        raise ConfigError(
            f"{folder / ckpt.STATE_FILE}: the checkpoint comes from a run with other settings: {shown}. Resume "
            f"with that run's settings (--config {Path(cfg.output_dir) / 'train_config.yaml'}"
            ") or start over with --overwrite-output-dir; a resume may change only "
            f"{', '.join(k for k in RESUMABLE_CHANGES if k not in UNREPORTED)}")
    return allowed


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def _show(v: Any) -> str:
    text = repr(v) if isinstance(v, str) else str(v)
    return text if len(text) <= 60 else "..." + text[-57:]
