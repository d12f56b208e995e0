"""Where commands may write: one rule for outputs against inputs, the marker that says "kimi-lora
wrote this folder", per-folder locks, and clean-up of what killed runs of this tool left behind.

* An output never is, contains, or lies inside an input (model folder, weights folder, adapter,
  data file, speech tokenizer, ...): `check_output`.
* A folder this tool writes gets `.kimi-lora.json` (command, pid, host, time); `--overwrite` /
  `--overwrite-output-dir` replace only such folders or empty ones: `replaceable`.
* A lock file with pid and host keeps two runs out of one folder; a lock whose process is gone is
  reported and taken over: `FolderLock`.
* Temporary entries carry the writer's pid or run id in their name, so a later run removes only
  those of dead runs of this tool: `pid_alive`, `clean_dead_partials`.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kimi_lora_cli.errors import ConfigError

MARKER = ".kimi-lora.json"
LOCK = ".kimi-lora.lock"
OLD_DEMO_MARKER = ".kimi-lora-demo"


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_output(output: str | Path, inputs: Iterable[tuple[str, str | Path | None]], *, flag: str = "--output",
                 kind: str = "folder") -> Path:
    """Refuse an output that is, contains, or is inside an input; and a folder output that is a
    file or a file output that is a folder. `inputs` are (what, path) pairs; None paths are skipped.
    Returns the resolved output path."""
    out = _resolved(output)
    for what, path in inputs:
        if path is None or str(path) == "":
            continue
        src = _resolved(path)
        if out == src:
            raise ConfigError(f"{flag} {output} is the {what} {path}; write to a new path (inputs are never "
                              "overwritten)")
        if _within(out, src):
            raise ConfigError(f"{flag} {output} is inside the {what} {path}; write outside it (inputs are "
                              "never written into)")
        if _within(src, out):
            raise ConfigError(f"{flag} {output} contains the {what} {path}; choose a folder that holds no input")
    if kind == "folder" and out.exists() and not out.is_dir():
        raise ConfigError(f"{flag} {output} is a file, not a folder; pass a folder path")
    if kind == "file" and out.is_dir():
        raise ConfigError(f"{flag} {output} is a folder; pass a file path such as {Path(output) / 'out.jsonl'}")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{flag} {output}: {parent} is a file, not a folder; fix the path")
            break
    return out


# -------------------------------------------------------------------------------------------
# Markers
# -------------------------------------------------------------------------------------------


def marker_info(folder: Path) -> dict[str, Any] | None:
    """The marker of a folder this tool wrote, or None."""
    f = folder / MARKER
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("tool") == "kimi-lora" else None


def write_marker(folder: Path, command: str, **extra: Any) -> dict[str, Any]:
    from kimi_lora_cli import __version__
    from kimi_lora_cli.fileops import write_atomic

    data = {"tool": "kimi-lora", "version": __version__, "command": command, "pid": os.getpid(),
            "host": socket.gethostname(), "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra}
    write_atomic(folder / MARKER, json.dumps(data, indent=1) + "\n")
    return data


def own_entries(name: str) -> bool:
    """Entries a folder may hold without being "used": the marker and the lock."""
    return name in (MARKER, LOCK, OLD_DEMO_MARKER)


def user_entries(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if not own_entries(p.name))


def replaceable(folder: Path, command: str | tuple[str, ...], flag: str = "--output") -> None:
    """Raise unless `folder` is absent, empty, or was written by this tool's `command`."""
    if not folder.exists() or not user_entries(folder):
        return
    commands = (command,) if isinstance(command, str) else command
    info = marker_info(folder)
    if info is None or info.get("command") not in commands:
        shown = ", ".join(user_entries(folder)[:3])
        made = f"made by `kimi-lora {info['command']}`" if info else "not made by kimi-lora"
        raise ConfigError(f"{flag} {folder} holds files {made} ({shown}, ...); it is never replaced - "
                          "choose a new folder (or empty this one yourself)")


# -------------------------------------------------------------------------------------------
# Processes
# -------------------------------------------------------------------------------------------


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OSError as e:
        return e.errno != errno.ESRCH
    # A zombie (killed, not yet reaped by its parent) holds nothing any more.
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def this_host() -> str:
    return socket.gethostname()


def clean_dead_partials(parent: Path, name: str, command: str, say: Callable[[str], None] | None = None) -> list[Path]:
    """Remove what dead runs of this tool's `command` left next to the output `name`: unfinished
    `.<name>.partial-<pid>` folders, and `.<name>.old-<pid>` (a replaced output whose removal was
    cut short; put back in place when the output itself is missing). Each is recognised by its name,
    a dead pid on this host, and the marker inside it."""
    removed: list[Path] = []
    if not parent.is_dir():
        return removed
    pattern = re.compile(rf"^\.{re.escape(name)}\.(partial|old)-(\d+)$")
    from kimi_lora_cli.fileops import remove_tree

    for p in sorted(parent.iterdir()):
        m = pattern.match(p.name)
        if not m or not p.is_dir() or pid_alive(int(m.group(2))):
            continue
        info = marker_info(p)
        if info is None or info.get("command") != command or info.get("host", this_host()) != this_host():
            continue
        if m.group(1) == "partial" and int(info.get("pid", -1)) != int(m.group(2)):
            continue
        if m.group(1) == "old" and not (parent / name).exists():
            p.rename(parent / name)
            if say:
                say(f"restored {parent / name} from {p.name}, left by an interrupted `kimi-lora {command}`")
            continue
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        remove_tree(p)
        removed.append(p)
        if say:
            say(f"removed {p} ({size / 1e6:.1f} MB), left by an interrupted `kimi-lora {command}` (pid "
                f"{m.group(2)})")
    return removed


# -------------------------------------------------------------------------------------------
# Locks
# -------------------------------------------------------------------------------------------


@dataclass
class FolderLock:
    """`.kimi-lora.lock` in a folder: one writer at a time. A lock left by a process that no longer
    runs on this host is taken over (and said); one held by a live process, or by another host,
    stops the second run with a message that says how to break it."""

    folder: Path
    command: str
    held: bool = False
    note: str | None = None

    @property
    def path(self) -> Path:
        return self.folder / LOCK

    def acquire(self) -> FolderLock:
        from kimi_lora_cli.fileops import naming_errors

        body = json.dumps({"pid": os.getpid(), "host": this_host(), "command": self.command,
                           "started": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n"
        for _ in range(3):
            try:
                with naming_errors(self.path):
                    fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._judge_existing()
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(body)
            self.held = True
            return self
        raise ConfigError(f"{self.path}: could not take the lock (another run keeps taking it); retry")

    def _judge_existing(self) -> None:
        try:
            info = json.loads(self.path.read_text(encoding="utf-8"))
            pid, host = int(info["pid"]), str(info["host"])
        except (OSError, ValueError, KeyError, TypeError):
            info, pid, host = {}, -1, ""
        how = f"if no kimi-lora run is writing there, delete {self.path} and rerun"
        if not info and self.path.exists():
            age = time.time() - self.path.stat().st_mtime
            if age < 5:  # just being written by another run
                time.sleep(0.2)
                return
            raise ConfigError(f"{self.path}: unreadable lock file; {how}")
        if host == this_host():
            if pid == os.getpid() or not pid_alive(pid):
                self.path.unlink(missing_ok=True)
                if pid != os.getpid():
                    self.note = (f"took over the lock of an earlier `kimi-lora {info.get('command', '?')}` "
                                 f"(pid {pid}) that is no longer running")
                return
            raise ConfigError(f"{self.folder} is in use by `kimi-lora {info.get('command', '?')}` (pid {pid}, started "
                              f"{info.get('started', '?')}); wait for it to finish or use another folder ({how})")
        raise ConfigError(f"{self.folder} is locked by a `kimi-lora {info.get('command', '?')}` run on host {host} "
                          f"(pid {pid}, started {info.get('started', '?')}); wait for it, or {how}")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            info = json.loads(self.path.read_text(encoding="utf-8"))
            if int(info.get("pid", -1)) == os.getpid() and info.get("host") == this_host():
                self.path.unlink(missing_ok=True)
        except (OSError, ValueError):
            pass
