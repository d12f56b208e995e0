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
