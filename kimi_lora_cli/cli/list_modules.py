"""`kimi-lora list-modules`: the linear layers LoRA can target, grouped, with what --target selects."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from kimi_lora_cli.cli._options import AllowPickleOpt, JsonOpt, ModelArg, TargetOpt

FULL_TABLE_EXTRA = 75  # columns the count, shape, params, component, targeted columns and borders need


def list_modules(
    model: ModelArg,
    target: TargetOpt = "all",
    rank: Annotated[int, typer.Option("--rank", "-r", help="LoRA rank used for the parameter totals.")] = 8,
    as_json: JsonOpt = False,
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Show the linear layers LoRA can target and which ones --target selects.

    Reads config.json only (the model is built on the meta device; no weight is read).

    Examples:

      $ kimi-lora list-modules ./Kimi-Audio-7B-Instruct

      $ kimi-lora list-modules ./Kimi-Audio-7B-Instruct --target q_proj,v_proj --rank 16

      $ kimi-lora list-modules ./Kimi-Audio-7B-Instruct --target 'mimo,model.layers.{0-13}.mlp.*' --json
    """
    from kimi_lora_cli.cli._output import human_count, out
    from kimi_lora_cli.targets import group_entries, module_report

    report = module_report(model, target=target, rank=rank, allow_pickle=allow_pickle)
    if as_json:
        payload = {
            "model": report.model_path,
            "kind": report.kind,
            "target": target,
            "rank": rank,
            "base_params": report.base_params,
            "whisper_params": report.whisper_params,
            "lora_params": report.lora_params,
            "trainable_percent": report.trainable_percent,
            "targeted_modules": len(report.selection.names),
            "modules": [e.to_json() for e in report.entries],
        }
        typer.echo(json.dumps(payload, indent=1))
        return

    from rich.table import Table

    groups = group_entries(report.entries)
    longest = max((len(g.pattern) for g in groups), default=7)
    # A module name is what a user copies into --target: it is never split. When the terminal cannot
    # hold every column beside the names (80 columns), the shape columns are left out rather than cut.
    full = out.width >= longest + FULL_TABLE_EXTRA
    table = Table(title=f"Linear layers of {report.model_path}", title_justify="left")
    table.add_column("Pattern", no_wrap=True, min_width=longest)
    table.add_column("Count", justify="right", no_wrap=True)
    if full:
        table.add_column("in -> out", justify="right", no_wrap=True)
        table.add_column("Params", justify="right", no_wrap=True)
        table.add_column("Component", no_wrap=True)
    table.add_column("Targeted")
    for g in groups:
        if g.targeted:
            mark = "[green]yes[/]" if g.targeted == g.count else f"[yellow]{g.targeted}/{g.count}[/]"
        else:
            mark = f"[dim]no - {g.excluded_reason}[/]" if g.excluded_reason else "[dim]no[/]"
        shape = [f"{g.in_features}->{g.out_features}", human_count(g.params), g.component] if full else []
        table.add_row(g.pattern, f"x{g.count}", *shape, mark)
    out.print(table)
    if not full:
        out.print("[dim](narrow terminal: shapes, parameter counts and components left out; --json has them)[/]")
    sel = report.selection
    out.print(
        f"--target {target!r}: [bold]{len(sel.names)}[/] modules. "
        f"Base parameters {human_count(report.base_params)}"
        + (f" (+ Whisper encoder {human_count(report.whisper_params)}, frozen)" if report.whisper_params else "")
        + f"; LoRA r={rank}: [bold]{human_count(report.lora_params)}[/] trainable "
        f"([bold]{report.trainable_percent:.3f}%[/])."
    )
    if report.kind == "kimi-audio":
        out.print("[dim]Embeddings are not wrapped (train them with --train-embeddings); "
                  "Whisper is always frozen.[/]")
