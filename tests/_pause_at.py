"""Run `kimi-lora ARGS...` and stop for good at a named moment, for tests that kill a run there.

    python tests/_pause_at.py READY CALL GLOB ARGS...

CALL is the OS call to stop at (open-for-writing, mkdir, unlink, rmdir); GLOB matches the full path
it is called with, one path segment per pattern segment (a `*` never crosses a `/`, so a pattern
for a folder does not also stop at a file or folder inside it). At the first such call the process writes READY (the path, as JSON) and sleeps
until the test kills it; everything before that moment ran for real.
"""

from __future__ import annotations

import builtins
import fnmatch
import io
import json
import os
import sys
import time


def main() -> None:
    ready, call, pattern, args = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]

    wanted = pattern.split(os.sep)

    def matches(path) -> bool:
        parts = os.path.abspath(os.fspath(path)).split(os.sep)
        return len(parts) == len(wanted) and all(fnmatch.fnmatchcase(p, w) for p, w in zip(parts, wanted))

    def stop(path) -> None:
        if matches(path):
            with builtins.open(ready + ".tmp", "w") as f:
                json.dump({"path": os.fspath(path), "pid": os.getpid()}, f)
            os.replace(ready + ".tmp", ready)
            while True:
                time.sleep(60)

    real_open = builtins.open

    def opening(file, mode="r", *a, **kw):
        if call == "open" and isinstance(file, (str, os.PathLike)) and any(m in mode for m in "wax+"):
            stop(file)
        return real_open(file, mode, *a, **kw)

    builtins.open = io.open = opening
    for name in ("mkdir", "unlink", "rmdir"):
        if name == call:
            real = getattr(os, name)

            def wrapped(path, *a, _real=real, **kw):
                if "dir_fd" not in kw:
                    stop(path)
                return _real(path, *a, **kw)

            setattr(os, name, wrapped)
    sys.argv = ["kimi-lora", *args]
    from kimi_lora_cli.cli.app import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
