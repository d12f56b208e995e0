"""Shell completion scripts rendered from the app (bash, zsh, fish) - written to completions/.

    python -m kimi_lora_cli.cli._completion completions/
"""

from __future__ import annotations

import sys
from pathlib import Path

SHELLS = {"bash": "kimi-lora.bash", "zsh": "_kimi-lora", "fish": "kimi-lora.fish"}
PROG = "kimi-lora"
COMPLETE_VAR = "_KIMI_LORA_COMPLETE"


def render(shell: str) -> str:
    import typer.main
    from click.shell_completion import get_completion_class

    from kimi_lora_cli.cli.app import app

    command = typer.main.get_command(app)  # registers typer's completion classes
    cls = get_completion_class(shell)
    if cls is None:
        raise ValueError(f"unsupported shell {shell!r}")
    return cls(command, {}, PROG, COMPLETE_VAR).source().rstrip() + "\n"


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
