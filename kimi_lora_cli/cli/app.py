"""The `kimi-lora` Typer app: command registration and main() (no torch import here)."""

from __future__ import annotations

import typer

from kimi_lora_cli import __version__
from kimi_lora_cli.cli._output import guarded
from kimi_lora_cli.cli.demo import demo
from kimi_lora_cli.cli.infer import infer
from kimi_lora_cli.cli.inspect_adapter import inspect_adapter
from kimi_lora_cli.cli.list_modules import list_modules
from kimi_lora_cli.cli.merge import merge
from kimi_lora_cli.cli.prepare import prepare
from kimi_lora_cli.cli.serve import serve
from kimi_lora_cli.cli.train import TrainCommand, train

app = typer.Typer(
    name="kimi-lora",
    help="LoRA fine-tuning toolkit for Kimi-Audio: see which modules LoRA can target, train adapters, "
    "inspect and merge them, and run inference - on CPU or GPU, no remote code.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"kimi-lora {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    """LoRA fine-tuning toolkit for Kimi-Audio."""


app.command("list-modules", rich_help_panel="Inspect")(guarded(list_modules))
app.command("inspect-adapter", rich_help_panel="Inspect")(guarded(inspect_adapter))
app.command("prepare", rich_help_panel="Data")(guarded(prepare))
app.command("train", rich_help_panel="Train", cls=TrainCommand)(guarded(train))
app.command("merge", rich_help_panel="Train")(guarded(merge))
app.command("infer", rich_help_panel="Run")(guarded(infer))
app.command("demo", rich_help_panel="Run")(guarded(demo))
app.command("serve", rich_help_panel="Run")(guarded(serve))


def main() -> None:
    import signal

    from kimi_lora_cli.cli._output import Terminated, on_sigterm

    # SIGTERM (kill, a scheduler's stop) unwinds like Ctrl-C: partial outputs are cleaned, exit 143.
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        app()
    except Terminated:  # outside a command body (while parsing, say)
        raise SystemExit(143) from None
