"""Filesystem helpers shared by the writers of model folders (merge, full fine-tuning)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


def link_or_copy(src: Path, dst: Path, counts: dict[str, int] | None = None,
                 say: Callable[[str], None] | None = None) -> None:
    """Hard-link `src` to `dst` (folders recursively), copying where links cannot be made
    (another filesystem). `counts` tallies "linked" / "copied"; `say` hears about big copies."""
    counts = counts if counts is not None else {"linked": 0, "copied": 0}
    if src.is_dir():
        dst.mkdir()
        for child in sorted(src.iterdir()):
            link_or_copy(child, dst / child.name, counts, say)
        return
    try:
        os.link(src, dst)
        counts["linked"] = counts.get("linked", 0) + 1
    except OSError:
        size = src.stat().st_size
        if say and size > 64 << 20:
            say(f"copying {src.name} ({size / 1e9:.1f} GB; hard links need the output on the same filesystem)")
        shutil.copy2(src, dst)
        counts["copied"] = counts.get("copied", 0) + 1
