"""docs/cli.md, the CLI reference, rendered from the help texts by typer's own docs generator.

    python -m kimi_lora_cli.cli._docs docs/cli.md
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def render() -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "typer", "kimi_lora_cli.cli.app", "utils", "docs", "--name", "kimi-lora",
         "--title", "kimi-lora CLI reference"],
        capture_output=True, text=True, env={"COLUMNS": "100", "TERM": "dumb", **_base_env()},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"typer docs failed: {proc.stderr.strip()}")
    return proc.stdout.rstrip() + "\n"


def _base_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "TERM")}


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/cli.md")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render())
    print(target)
