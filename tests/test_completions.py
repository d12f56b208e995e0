"""Committed completion scripts equal what the app renders now."""

from __future__ import annotations

from pathlib import Path

import pytest

from kimi_lora_cli.cli._completion import SHELLS, render

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("shell", sorted(SHELLS))
def test_completion_scripts_are_current(shell):
    committed = (ROOT / "completions" / SHELLS[shell]).read_text()
    assert committed == render(shell), (
        f"completions/{SHELLS[shell]} is stale: run `python -m kimi_lora_cli.cli._completion completions/`")


def test_bash_script_protocol_is_answered(tmp_path):
    """The committed bash script's request (what the shell sends) gets real candidates back."""
    import os
    import re
    import subprocess
    import sys

    script = (ROOT / "completions" / SHELLS["bash"]).read_text()
    instruction = re.search(r"_KIMI_LORA_COMPLETE=(\w+)", script).group(1)
    env = {**os.environ, "_KIMI_LORA_COMPLETE": instruction, "COMP_WORDS": "kimi-lora list-m", "COMP_CWORD": "1"}
    code = "import sys; sys.argv[0] = 'kimi-lora'; from kimi_lora_cli.cli.app import main; main()"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0].startswith("list-modules") and "Usage" not in proc.stdout
