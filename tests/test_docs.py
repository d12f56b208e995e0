"""docs/cli.md equals what the help texts render now; every command's help has a summary and examples."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_cli_reference_is_current():
    from kimi_lora_cli.cli._docs import render

    committed = (ROOT / "docs" / "cli.md").read_text()
    assert committed == render(), "docs/cli.md is stale: run `python -m kimi_lora_cli.cli._docs docs/cli.md`"


def _commands():
    import typer.main

    from kimi_lora_cli.cli.app import app

    return typer.main.get_command(app).commands


@pytest.mark.parametrize("name", sorted(_commands()))
def test_help_has_summary_and_examples(cli, name):
    code, out, _ = cli(name, "--help")
    assert code == 0
    assert "Examples" in out and out.count("$ kimi-lora") + out.count("$ torchrun") >= 2, out
