"""`prepare`'s files and resume state: the output written as OUT.partial, the state file beside it
(next input line, byte sizes, a hash of the lines done), the rejects file, the clips folder, and the
rename into place that ends a run."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kimi_lora_cli.fileops import naming_errors, write_atomic

STATE_VERSION = 2


@dataclass
class PrepareFiles:
    output: Path
    partial: Path
    state: Path
    rejects: Path
    rejects_partial: Path

    @property
    def clips(self) -> Path:
        return self.output.with_name(f"{self.output.stem}.clips")

    @classmethod
    def of(cls, out: Path, rejects: Path | None) -> PrepareFiles:
        """OUT's partial and state files; the rejects file (default OUT_STEM.rejects.jsonl) and its partial."""
        rejects = rejects or out.with_name(f"{out.stem}.rejects{out.suffix or '.jsonl'}")
        return cls(out, out.with_name(out.name + ".partial"), out.with_name(out.name + ".partial.json"),
                   rejects, rejects.with_name(rejects.name + ".partial"))


def load_state(paths: PrepareFiles, options: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
    if overwrite or not (paths.state.is_file() and paths.partial.is_file()):
        return None
    try:
        state = json.loads(paths.state.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if state.get("version") != STATE_VERSION or state.get("options") != options:
        return None
    if paths.partial.stat().st_size < state.get("output_bytes", -1):
        return None
    if state.get("rejects_bytes", 0) and (not paths.rejects_partial.is_file()
                                          or paths.rejects_partial.stat().st_size < state["rejects_bytes"]):
        return None
    return state


def write_state(paths: PrepareFiles, state: dict[str, Any]) -> None:
    write_atomic(paths.state, json.dumps(state, indent=1))


def finish_file(partial: Path, final: Path) -> None:
    """Record the finished file as prepare's, then rename it into place in one step."""
    from kimi_lora_cli.outputs import record_file

    with naming_errors(final):
        record_file(final, partial, "prepare")
        os.replace(partial, final)
