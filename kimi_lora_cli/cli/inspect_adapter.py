"""`kimi-lora inspect-adapter`: what a LoRA adapter holds, whether it fits a base, how big its updates are."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from kimi_lora_cli.cli._options import AllowPickleOpt, JsonOpt

BAR_WIDTH = 30


def inspect_adapter(
    adapter: Annotated[Path, typer.Argument(help="Adapter folder (adapter_config.json + "
                                            "adapter_model.safetensors), e.g. the output of `kimi-lora train`.",
                                            show_default=False)],
    base: Annotated[Path | None, typer.Option(
        "--base", "-b", help="Base model folder: check every adapted module exists there with matching "
        "shapes (reads config.json and safetensors headers only).", show_default=False)] = None,
    stats: Annotated[bool, typer.Option(
        "--stats", help="Load the adapter tensors: per-module norm of the update (scaling * B @ A), "
        "zero / empty / NaN detection.")] = False,
    top: Annotated[int, typer.Option("--top", min=0, help="Rows of the --stats table to print (0 = all).")] = 40,
    as_json: JsonOpt = False,
    allow_pickle: AllowPickleOpt = False,
) -> None:
    """Show what a LoRA adapter holds: rank, alpha, scaling, targets by component, size.

    Reads adapter_config.json and the safetensors header only (no tensor data unless --stats).
    Exits non-zero when the adapter is broken or does not fit --base.

    [bold]Examples[/]

      $ kimi-lora inspect-adapter ./runs/asr/adapter

      $ kimi-lora inspect-adapter ./runs/asr/adapter --base ./Kimi-Audio-7B-Instruct --stats

      $ kimi-lora inspect-adapter ./runs/asr/adapter --json | jq .scaling
    """
    from kimi_lora_cli.adapters.summary import summarize_adapter
    from kimi_lora_cli.cli._output import fail

    summary = summarize_adapter(adapter, base=base, stats=stats, allow_pickle=allow_pickle)
    if as_json:
        typer.echo(summary.dumps())
    else:
        _print(summary, top)
    if not summary.ok:
        errors = [i.message for i in summary.issues if i.level == "error"]
        raise fail(_one_line(summary, errors))


def _one_line(summary, errors: list[str]) -> str:
    from rich.markup import escape

    if summary.base_problems:
        first = summary.base_problems[0]
        more = f" (+{len(summary.base_problems) - 1} more)" if len(summary.base_problems) > 1 else ""
        return escape(f"{summary.adapter.path} does not fit {summary.base_path}: {first}{more}; "
                      "use the base model the adapter was trained on")
    extra = f" (+{len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return escape(f"{summary.adapter.path}: {errors[0]}{extra}")


def _print(summary, top: int) -> None:
    from rich.markup import escape
    from rich.table import Table

    from kimi_lora_cli.cli._output import human_bytes, human_count, out

    a = summary.adapter
    cfg = a.config
    kv = Table.grid(padding=(0, 2))
    kv.add_column(style="bold")
    kv.add_column()

    def row(key: str, value: str) -> None:
        kv.add_row(key, escape(value))

    row("Adapter", f"{a.path}  ({a.peft_type}, peft {a.peft_version or 'version not recorded'}, {a.format})")
    row("Model kind", summary.kind + ("" if summary.kind != "kimi-audio" or summary.mimo_from is not None
                                      else "  (pass --base to split backbone / text layers)"))
    row("Base recorded", str(a.base_model or "-"))
    row("Rank / alpha", f"r={a.r}, lora_alpha={a.alpha:g}, dropout {cfg.get('lora_dropout', 0)}")
    scalings = summary.scalings
    in_use = (f"{scalings[0]:g}" if len(scalings) == 1 else
              f"{scalings[0]:g} .. {scalings[-1]:g} across modules" if scalings else f"{summary.scaling:g}")
    row("Scaling", f"{in_use}  ({summary.scaling_rule})")
    if a.rank_pattern:
        row("rank_pattern", str(a.rank_pattern))
    if a.alpha_pattern:
        row("alpha_pattern", str(a.alpha_pattern))
    row("DoRA", "yes" if a.use_dora else "no")
    row("Bias", f"lora_bias={'yes' if cfg.get('lora_bias') else 'no'}, bias={cfg.get('bias', 'none')}"
        + (", fan_in_fan_out" if a.fan_in_fan_out else ""))
    row("modules_to_save", ", ".join(a.modules_to_save) or "-")
    if a.token_adapters:
        row("Trainable tokens", ", ".join(f"{t.name} ({len(t.indices)} rows)" for t in a.token_adapters.values()))
    row("Tensors", f"{len(a.tensors)} ({', '.join(a.dtypes) or '-'}), {human_count(a.num_parameters)} parameters, "
        f"{human_bytes(a.size_on_disk())} on disk")
    out.print(kv)

    if summary.groups:
        table = Table(title=f"{len(a.modules)} adapted modules", title_justify="left")
        table.add_column("Pattern", overflow="fold")
        table.add_column("Count", justify="right")
        table.add_column("in -> out", justify="right")
        table.add_column("r", justify="right")
        table.add_column("Params", justify="right")
        table.add_column("Component")
        for g in summary.groups:
            ranks = ",".join(str(r) for r in g.ranks)
            table.add_row(escape(g.pattern), f"x{g.count}", f"{g.in_features}->{g.out_features}", ranks,
                          human_count(g.params), g.component)
        out.print(table)
    if a.replacements:
        out.print(f"Whole tensors saved (replace the base's): {escape(', '.join(sorted(a.replacements)))}")

    if summary.base_path is not None:
        if summary.base_problems:
            out.print(f"[red]Base check:[/] does not fit {escape(summary.base_path)} - "
                      f"{len(summary.base_problems)} mismatches:")
            for p in summary.base_problems[:5]:
                out.print(f"  - {escape(p)}")
            if len(summary.base_problems) > 5:
                out.print(f"  ... and {len(summary.base_problems) - 5} more (--json lists all)")
        else:
            out.print(f"[green]Base check:[/] fits {escape(summary.base_path)} "
                      f"({len(a.modules)} modules, all shapes match)")

    if summary.stats is not None:
        _print_stats(summary, top)
    for issue in summary.issues:
        color = "red" if issue.level == "error" else "yellow"
        out.print(f"[{color}]{issue.level}:[/] {escape(issue.message)}")


def _print_stats(summary, top: int) -> None:
    from rich.markup import escape
    from rich.table import Table

    from kimi_lora_cli.cli._output import out

    stats = summary.stats
    finite = [s.norm for s in stats if not math.isnan(s.norm)]
    peak = max(finite, default=0.0)
    table = Table(title="Update norm ||scaling * B @ A||_F per module (largest first)", title_justify="left")
    table.add_column("Module", overflow="fold")
    table.add_column("Norm", justify="right")
    table.add_column("")
    table.add_column("Flags")
    shown = stats if top <= 0 else stats[:top]
    for s in shown:
        if math.isnan(s.norm):
            norm, bar = "nan", ""
        else:
            norm = f"{s.norm:.4g}"
            bar = "█" * max(1 if s.norm > 0 else 0, round(BAR_WIDTH * s.norm / peak)) if peak else ""
        flags = ", ".join(s.flags)
        table.add_row(escape(s.name), norm, bar, f"[red]{flags}[/]" if flags else "")
    out.print(table)
    if len(shown) < len(stats):
        out.print(f"... {len(stats) - len(shown)} more rows (--top 0 shows all)")
