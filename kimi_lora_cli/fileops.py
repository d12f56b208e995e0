"""Filesystem helpers shared by every writer: copies that never alias the source, atomic writes,
and OS errors that name their path."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

# Files a model folder holds in bulk; `--link-files` hard-links these (everything else is copied).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".npz")
_FICLONE = 0x40049409  # Linux ioctl: copy-on-write clone of a whole file (btrfs, xfs, ...)

# errno -> (what happened, how to fix it); the causes users meet when writing outputs.
OS_CAUSES: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on the device", "free some space or write the output to another disk"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or write the output to another disk"),
    errno.EROFS: ("read-only file system", "choose an output folder on a writable disk"),
    errno.EACCES: ("permission denied", "choose a folder you can write to, or fix its permissions"),
    errno.EPERM: ("operation not permitted", "choose a folder you can write to, or fix its permissions"),
    errno.EFBIG: ("file too large (the file size limit, `ulimit -f`, or the file system's maximum)",
                  "raise the limit or write to another file system"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder", "fix the path"),
    errno.EISDIR: ("is a folder where a file is expected", "pass a file path"),
    errno.ENOENT: ("no such file or folder", "check the path"),
    errno.EEXIST: ("already exists", "choose another path"),
    errno.ENAMETOOLONG: ("file name too long", "use a shorter path"),
    errno.EMFILE: ("too many open files", "raise the limit (`ulimit -n`)"),
    errno.EIO: ("input/output error (the disk or network file system failed)", "check the disk"),
}
# Errors of the writing side: for a copy (two file names) they concern the destination.
_WRITE_SIDE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)
_CODE_IN_TEXT = re.compile(r"(?:os error |code: |errno[ =:]*)(\d+)", re.IGNORECASE)


def describe_os_error(e: OSError, path: str | Path | None = None) -> str:
    """`PATH: cause (ENAME); fix` for an OSError (the path from the error, else `path`)."""
    where, other = e.filename or path, e.filename2
    if other and e.errno in _WRITE_SIDE:  # a copy: the destination is the file that could not be written
        where, other = other, f"copying {where}"
    elif other:
        other = f"with {other}"
    name = errno.errorcode.get(e.errno or 0, "")
    cause, fix = OS_CAUSES.get(e.errno or -1, ((e.strerror or str(e)).rstrip("."), ""))
    text = f"{where}: {cause}" if where else cause
    if other:
        text += f" ({other})"
    if name:
        text += f" ({name})"
    return text + (f"; {fix}" if fix else "")


def os_error_from(exc: BaseException, path: str | Path) -> OSError | None:
    """The OSError inside `exc` (libraries written in Rust or C++ report errno in their message),
    with `path` as its filename when it has none; None when `exc` is no OS error."""
    if isinstance(exc, OSError) and exc.errno:
        if not exc.filename:
            exc.filename = str(path)
        return exc
    m = _CODE_IN_TEXT.search(str(exc))
    if m and int(m.group(1)) in errno.errorcode:
        code = int(m.group(1))
        return OSError(code, os.strerror(code), str(path))
    return None


@contextlib.contextmanager
def naming_errors(path: str | Path) -> Iterator[None]:
    """Re-raise OS errors met while writing `path` as OSError naming it (also those that safetensors,
    torch or peft wrap in their own exception types)."""
    try:
        yield
    except OSError as e:
        found = os_error_from(e, path)
        if found is e or found is None:
            raise
        raise found from e
    except Exception as e:  # noqa: BLE001 - only re-raised as OSError when it is one
        found = os_error_from(e, path)
        if found is None:
            raise
        raise found from e


def write_atomic(path: Path, data: str | bytes, tag: str | None = None) -> None:
    """Write `data` to a temporary sibling and rename it over `path`: readers see the old file or
    the whole new one, never a half-written one."""
    tmp = path.with_name(f".{path.name}.{tag or os.getpid()}.tmp")
    raw = data.encode("utf-8") if isinstance(data, str) else data
    try:
        with naming_errors(path), open(tmp, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        with naming_errors(path):
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def clone_or_copy(src: Path, dst: Path) -> str:
    """Copy one file; a copy-on-write clone where the file system offers one (instant, no extra
    space, and still a separate file). Returns "cloned" or "copied"."""
    try:
        import fcntl

        with open(src, "rb") as s, open(dst, "wb") as d:
            fcntl.ioctl(d.fileno(), _FICLONE, s.fileno())
        shutil.copystat(src, dst)
        return "cloned"
    except (ImportError, OSError):
        pass
    with naming_errors(dst):
        shutil.copy2(src, dst)
    return "copied"


def link_or_copy(src: Path, dst: Path, counts: dict[str, int] | None = None,
                 say: Callable[[str], None] | None = None, link_weights: bool = False) -> None:
    """Put a copy of `src` (folders recursively) at `dst`. Never an alias by default: editing the
    result must not change the source. With `link_weights`, weight files (WEIGHT_SUFFIXES) are
    hard-linked instead (the user's choice to save space; small files are still copied).
    `counts` tallies "linked" / "copied" / "cloned"; `say` hears about big copies."""
    counts = counts if counts is not None else {}
    if src.is_dir():
        with naming_errors(dst):
            dst.mkdir()
        for child in sorted(src.iterdir()):
            link_or_copy(child, dst / child.name, counts, say, link_weights)
        return
    if link_weights and src.name.endswith(WEIGHT_SUFFIXES):
        try:
            os.link(src, dst)
            counts["linked"] = counts.get("linked", 0) + 1
            return
        except OSError:
            pass  # another file system: copy below
    size = src.stat().st_size
    how = clone_or_copy(src, dst)
    if how == "copied" and say and size > 64 << 20:
        say(f"copied {src.name} ({size / 1e9:.1f} GB; --link-files hard-links weight files instead)")
    counts[how] = counts.get(how, 0) + 1


# The marker that says "kimi-lora wrote this folder" (outputs.MARKER); kept until a folder is empty.
_MARKER = ".kimi-lora.json"


def remove_tree(path: Path) -> None:
    """Delete a folder or file that this tool wrote (callers check that first). A folder's marker
    goes last, so a removal cut short by a kill leaves a folder that is still recognisably ours
    (marked, or empty) for the next run to finish."""
    if path.is_dir() and not path.is_symlink():
        for child in sorted(path.iterdir(), key=lambda c: c.name == _MARKER):
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    child.unlink()
        with contextlib.suppress(OSError):
            path.rmdir()
    else:
        path.unlink(missing_ok=True)


class _RecordingWriter:
    """A file wrapper that remembers the OSError of a failed write (torch.save reports only its own
    RuntimeError, without the errno)."""

    def __init__(self, f) -> None:
        self.f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()

    def tell(self) -> int:
        return self.f.tell()

    def seek(self, *args) -> int:
        return self.f.seek(*args)


def save_torch(obj, path: Path) -> None:
    """torch.save that streams to `path` and reports a failed write as the OSError naming `path`.
    The file holds only tensors, numbers, strings and containers (readable with weights_only=True)."""
    import torch

    with naming_errors(path), open(path, "wb") as f:
        w = _RecordingWriter(f)
        try:
            torch.save(obj, w)
        except RuntimeError:
            if w.error is not None:
                raise w.error from None
            raise


def load_torch(path: Path, error: type[Exception], fix: str, extra_safe: list | None = None, mmap: bool = False):
    """torch.load(weights_only=True) for every pickle file this tool reads (--allow-pickle included):
    tensors, numbers, strings and containers only. A file holding anything else could run code when
    unpickled, so it is refused with one message (`error`, ending in `fix`) that names what it holds;
    torch's own advice to retry with weights_only=False (which would run it) is never passed on."""
    import pickle

    import torch

    try:
        with torch.serialization.safe_globals(extra_safe or []):
            if mmap:
                try:
                    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as e:
                    if "mmap" not in str(e):
                        raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise error(_refused(path, str(e), fix)) from None
    except (RuntimeError, EOFError, ValueError, OSError, AttributeError, ImportError, TypeError) as e:
        text = str(e)
        if "weights_only" in text or "GLOBAL" in text:
            raise error(_refused(path, text, fix)) from None
        first = next((x for x in text.splitlines() if x.strip()), type(e).__name__)
        raise error(f"{path}: unreadable ({first[:160]}); {fix}") from None


def _refused(path: Path, text: str, fix: str) -> str:
    found = re.search(r"GLOBAL ([\w.]+)", text)
    what = f" ({found.group(1)})" if found else ""
    return (f"{path}: refused - it holds Python objects{what}, which could run code when loaded; kimi-lora reads "
            f"only tensors and numbers from pickle files, with --allow-pickle too: {fix}")
