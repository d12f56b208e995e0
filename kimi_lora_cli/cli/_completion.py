"""Shell completion scripts rendered from the app (bash, zsh, fish) - written to completions/.

    python -m kimi_lora_cli.cli._completion completions/
"""

from __future__ import annotations

import sys
from pathlib import Path

SHELLS = {"bash": "kimi-lora.bash", "zsh": "_kimi-lora", "fish": "kimi-lora.fish"}
PROG = "kimi-lora"
COMPLETE_VAR = "_KIMI_LORA_COMPLETE"
_SWITCH = "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION"


def render(shell: str) -> str:
    """The script `kimi-lora --show-completion SHELL` prints (typer's own flavour, the one the app answers)."""
    # typer reads this switch to take the shell as an argument instead of detecting the parent shell.
    # It is read while the command is built, so it must be in os.environ before invoke().
    import os

    from typer.testing import CliRunner

    from kimi_lora_cli.cli.app import app

    old = os.environ.get(_SWITCH)
    os.environ[_SWITCH] = "1"
    try:
        result = CliRunner().invoke(app, ["--show-completion", shell], prog_name=PROG)
    finally:
        if old is None:
            os.environ.pop(_SWITCH, None)
        else:
            os.environ[_SWITCH] = old
    if result.exit_code != 0 or not result.stdout.strip():
        raise ValueError(f"cannot render the {shell} completion script: {result.output.strip()}")
    return result.stdout.rstrip() + "\n"


def write_all(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for shell, name in SHELLS.items():
        path = folder / name
        path.write_text(render(shell))
        written.append(path)
    return written


if __name__ == "__main__":
    for p in write_all(Path(sys.argv[1] if len(sys.argv) > 1 else "completions")):
        print(p)
