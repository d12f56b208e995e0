"""Where commands may write: one rule for outputs against inputs, the marker that says "kimi-lora
wrote this folder", per-folder locks, and clean-up of what killed runs of this tool left behind.

* An output never is, contains, or lies inside an input (model folder, weights folder, adapter,
  data file, speech tokenizer, ...): `check_output`.
* A folder this tool writes gets `.kimi-lora.json` (command, pid, host, time); `--overwrite` /
  `--overwrite-output-dir` replace only such folders or empty ones: `replaceable`.
* A lock file with pid and host keeps two runs out of one folder; a lock whose process is gone is
  reported and taken over: `FolderLock`.
* A file output (prepare, infer) or a folder swapped into place (merge) is locked by a sibling
  `.<name>.kimi-lora.lock`: `FolderLock.beside`.
* Temporary entries carry the writer's pid or run id in their name, so a later run removes only
  those of dead runs of this tool: `pid_alive`, `clean_dead_partials`. An entry is known as ours by
  that name plus our marker inside it (written first, removed last) or, when a kill came before the
  marker was written or after it was removed, by the pid / run id in the name being that of the
  dead run whose lock the new run took over (a killed run's lock file outlives it).
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


def file_record_path(path: Path) -> Path:
    """Where the record of a file output lives: `.<name>.kimi-lora.json` beside it."""
    return path.with_name(f".{path.name}{MARKER}")


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def record_file(final: Path, written: Path, command: str) -> None:
    """Record that `command` wrote `written`, which is about to become `final` (size and sha256,
    so a file put there later by someone else is not taken for ours)."""
    from kimi_lora_cli import __version__
    from kimi_lora_cli.fileops import write_atomic

    data = {"tool": "kimi-lora", "version": __version__, "command": command, "file": final.name,
            "bytes": written.stat().st_size, "sha256": _sha256(written),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_atomic(file_record_path(final), json.dumps(data, indent=1) + "\n")


def file_written_by(path: Path, command: str) -> bool:
    """True when `path` is, byte for byte, the file an earlier `command` recorded."""
    try:
        data = json.loads(file_record_path(path).read_text(encoding="utf-8"))
        return (isinstance(data, dict) and data.get("tool") == "kimi-lora" and data.get("command") == command
                and data.get("file") == path.name and path.is_file() and path.stat().st_size == data.get("bytes")
                and _sha256(path) == data.get("sha256"))
    except (OSError, ValueError):
        return False


def forget_file(path: Path) -> None:
    """Remove a file output and its record (callers checked it is ours)."""
    path.unlink(missing_ok=True)
    file_record_path(path).unlink(missing_ok=True)


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


def clean_dead_partials(parent: Path, name: str, command: str, say: Callable[[str], None] | None = None,
                        dead_pids: Iterable[int] = ()) -> list[Path]:
    """Remove what dead runs of this tool's `command` left next to the output `name`: unfinished
    `.<name>.partial-<pid>` folders, and `.<name>.old-<pid>` (a replaced output whose removal was
    cut short; put back in place when the output itself is missing). Each is recognised by its name,
    a dead pid on this host, and either the marker inside it or a pid in `dead_pids` (that of a dead
    run whose lock on `name` was just taken over: it was ours, marker or not)."""
    removed: list[Path] = []
    if not parent.is_dir():
        return removed
    pattern = re.compile(rf"^\.{re.escape(name)}\.(partial|old)-(\d+)$")
    known = {int(p) for p in dead_pids}
    from kimi_lora_cli.fileops import remove_tree

    for p in sorted(parent.iterdir()):
        m = pattern.match(p.name)
        if not m or not p.is_dir() or pid_alive(int(m.group(2))):
            continue
        pid = int(m.group(2))
        info = marker_info(p)
        if info is not None:
            if info.get("command") != command or info.get("host", this_host()) != this_host():
                continue
            if m.group(1) == "partial" and int(info.get("pid", -1)) != pid:
                continue
        elif pid not in known:
            continue
        if m.group(1) == "old" and info is not None and not (parent / name).exists():
            p.rename(parent / name)
            if say:
                say(f"restored {parent / name} from {p.name}, left by an interrupted `kimi-lora {command}`")
            continue
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        remove_tree(p)
        removed.append(p)
        if say:
            what = "an unfinished output" if m.group(1) == "partial" else "a replaced output"
            say(f"removed {p} ({size / 1e6:.1f} MB, {what} left by an interrupted `kimi-lora {command}`, pid "
                f"{pid})")
    return removed


# -------------------------------------------------------------------------------------------
# Locks
# -------------------------------------------------------------------------------------------


@dataclass
class FolderLock:
    """`.kimi-lora.lock` in a folder (or `.<name>.kimi-lora.lock` beside a file or swapped folder,
    see `beside`): one writer at a time. A lock left by a process that no longer runs on this host
    is taken over (and said; `previous` keeps what it recorded, so the new run can recognise the dead
    run's temporary entries); one held by a live process, or by another host, stops the second run
    with a message that says how to break it. The lock file appears whole (written aside, then
    hard-linked into place), so a kill never leaves a half-written one."""

    folder: Path
    command: str
    held: bool = False
    note: str | None = None
    lock_file: Path | None = None
    extra: dict[str, Any] | None = None
    previous: dict[str, Any] | None = None

    @classmethod
    def beside(cls, output: Path, command: str) -> FolderLock:
        """The lock of a file output, or of a folder that is replaced by a rename."""
        return cls(output, command, lock_file=output.parent / f".{output.name}{LOCK}")

    @property
    def path(self) -> Path:
        return self.lock_file if self.lock_file is not None else self.folder / LOCK

    def acquire(self) -> FolderLock:
        from kimi_lora_cli.fileops import naming_errors

        body = json.dumps({"pid": os.getpid(), "host": this_host(), "command": self.command,
                           "started": time.strftime("%Y-%m-%dT%H:%M:%S"), **(self.extra or {})}) + "\n"
        self._drop_dead_drafts()
        draft = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        with naming_errors(self.path):
            draft.write_text(body, encoding="utf-8")
        try:
            for _ in range(3):
                try:
                    with naming_errors(self.path):
                        self._place(draft, body)
                except FileExistsError:
                    self._judge_existing()
                    continue
                self.held = True
                return self
        finally:
            draft.unlink(missing_ok=True)
        raise ConfigError(f"{self.path}: could not take the lock (another run keeps taking it); retry")

    def _place(self, draft: Path, body: str) -> None:
        try:
            os.link(draft, self.path)
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
                raise
            # A file system without hard links: exclusive create, then the body.
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(body)

    def _drop_dead_drafts(self) -> None:
        """Lock drafts of killed runs (`<lock>.<pid>.tmp`, pid dead)."""
        pattern = re.compile(rf"^{re.escape(self.path.name)}\.(\d+)\.tmp$")
        try:
            entries = list(self.path.parent.iterdir())
        except OSError:
            return
        for p in entries:
            m = pattern.match(p.name)
            if m and not pid_alive(int(m.group(1))):
                p.unlink(missing_ok=True)

    def _judge_existing(self) -> None:
        try:
            info = json.loads(self.path.read_text(encoding="utf-8"))
            pid, host = int(info["pid"]), str(info["host"])
        except (OSError, ValueError, KeyError, TypeError):
            info, pid, host = {}, -1, ""
        how = f"if no kimi-lora run is writing there, delete {self.path} and rerun"
        if not info and self.path.exists():
            age = time.time() - self.path.stat().st_mtime
            if age < 5:  # written by an earlier version, which wrote the lock in place
                time.sleep(0.2)
                return
            raise ConfigError(f"{self.path}: unreadable lock file; {how}")
        if host == this_host():
            if pid == os.getpid() or not pid_alive(pid):
                self.path.unlink(missing_ok=True)
                if pid != os.getpid():
                    self.previous = info
                    self.note = (f"took over the lock of an earlier `kimi-lora {info.get('command', '?')}` "
                                 f"(pid {pid}) that is no longer running")
                return
            raise ConfigError(f"{self.folder} is in use by `kimi-lora {info.get('command', '?')}` (pid {pid}, started "
                              f"{info.get('started', '?')}); wait for it to finish or use another "
                              f"{'folder' if self.lock_file is None else 'path'} ({how})")
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

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
