"""`kimi-lora train`: LoRA (or full) fine-tuning of Kimi-Audio from the official jsonl format.

Its options are not written here: each is a field of `TrainConfig` (training/config.py) with its help,
panel and spellings, and `train_options()` turns that list into the command's parameters, the boolean
switches and the list flags below. A new setting is one field there.
"""

from __future__ import annotations

import inspect
import os
import sys
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

from kimi_lora_cli.training.config import FALSE_WORDS, IGNORED, P_DATA, P_RUN, TRUE_WORDS, TrainConfig


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _shown_default(f: Any) -> str:
    meta = f.metadata
    if meta["shown"] is not None:
        return meta["shown"]
    if f.default in (None, False, ()) or meta["hidden"]:
        return ""
    return f"{f.default:g}" if isinstance(f.default, float) else str(f.default)


def _is_switch(f: Any) -> bool:
    return str(f.type).startswith("bool")


def train_options() -> list[inspect.Parameter]:
    """One keyword parameter per TrainConfig field (and per ignored guide setting), typed and annotated
    with its typer.Option: the flag from the field name, aliases, help + shown default, panel."""
    params = []
    for f in fields(TrainConfig):
        meta = f.metadata
        decls = [_flag(f.name), *(_flag(a) for a in meta["aliases"]), *([meta["short"]] if meta["short"] else [])]
        if _is_switch(f):
            decls = [f"{_flag(f.name)}/--no-{_flag(f.name)[2:]}"]
            kind: Any = bool
        else:
            kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
        shown = _shown_default(f)
        help_text = meta["help"] + (f" \\[default: {shown}]" if shown else "")
        option = typer.Option(*decls, help=help_text.strip(), rich_help_panel=meta["panel"], hidden=meta["hidden"],
                              show_default=False)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=Annotated[kind | None, option]))
    for name, switch in IGNORED.items():
        decl = f"{_flag(name)}/--no-{_flag(name)[2:]}" if switch else _flag(name)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=Annotated[(bool if switch else str) | None,
                                                             typer.Option(decl, hidden=True)]))
    return params


def switch_flags() -> tuple[str, ...]:
    """Boolean flags (without --) that the guide writes with a value (`--bf16 True`, `--use_lora false`)."""
    return (*(_flag(f.name)[2:] for f in fields(TrainConfig) if _is_switch(f)),
            *(_flag(n)[2:] for n, switch in IGNORED.items() if switch))


def list_flags() -> tuple[str, ...]:
    """Flags whose values the guide passes as separate words (`--lora_target_modules q_proj k_proj`)."""
    return tuple(_flag(n) for f in fields(TrainConfig) if f.metadata["many"] for n in (f.name, *f.metadata["aliases"]))


def normalise_args(args: list[str]) -> list[str]:
    """Accept the LoRA guide's spellings: `--data_path x`, `--bf16 True`, `--lora_target_modules a b c`."""
    switches, lists = switch_flags(), list_flags()
    out: list[str] = []
    i = 0
    while i < len(args):
        tok = args[i]
        i += 1
        if tok == "--":
            out += args[i - 1 :]
            break
        if not tok.startswith("--") or tok in ("--help",):
            out.append(tok)
            continue
        name, eq, value = tok.partition("=")
        name = name.replace("_", "-")
        bare = name[2:]
        if bare in switches or (bare.startswith("no-") and bare[3:] in switches):
            if eq:
                word = value
            elif i < len(args) and args[i].lower() in TRUE_WORDS | FALSE_WORDS:
                word = args[i]
                i += 1
            else:
                word = "true"
            on = word.lower() in TRUE_WORDS
            if word.lower() not in TRUE_WORDS | FALSE_WORDS:
                out.append(f"{name}={value}")  # let click report the bad value
                continue
            if bare.startswith("no-"):
                bare, on = bare[3:], not on
            out.append(f"--{bare}" if on else f"--no-{bare}")
            continue
        if name in lists and not eq:
            values = []
            while i < len(args) and not args[i].startswith("-"):
                values.append(args[i])
                i += 1
            out += [name, ",".join(values)] if values else [name]
            continue
        out.append(f"{name}{eq}{value}")
    return out


NARROW_HELP = 100  # below this many columns the options table leaves ~20 columns for descriptions


class TrainCommand(TyperCommand):
    """Rewrites the guide's spellings before click parses, and keeps the raw arguments for relaunching.
    On a narrow terminal its help is a list (names, then the description below them) instead of the
    rich table, whose description column would be a few words wide."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        ctx.meta["kimi_lora_train_args"] = list(args)
        return super().parse_args(ctx, normalise_args(list(args)))

    def format_help(self, ctx: Any, formatter: Any) -> None:
        import shutil

        width = shutil.get_terminal_size((NARROW_HELP, 24)).columns
        if width >= NARROW_HELP:
            return super().format_help(ctx, formatter)
        formatter.write(narrow_help(self, ctx, max(width, 40)))


def _plain(text: str) -> str:
    from rich.text import Text

    return Text.from_markup(text).plain


def _type_name(param: Any) -> str:
    """INT, FLOAT, TEXT, PATH... (click's `type`; newer typer versions expose `bare_type()` instead)."""
    kind = getattr(param, "type", None)
    if kind is not None and getattr(kind, "name", None):
        return str(kind.name).upper()
    bare = getattr(param, "bare_type", None)
    if callable(bare):
        found = bare()
        return str(getattr(found, "__name__", found)).upper()
    return "VALUE"


def narrow_help(command: Any, ctx: Any, width: int) -> str:
    """The help as panels of `--name ALIAS / --no-name TYPE` lines, each followed by its description
    wrapped at spaces (an option name or a path is never split)."""
    import textwrap

    def wrap(text: str, indent: str, rest: str | None = None) -> list[str]:
        return textwrap.wrap(text, width - 1, initial_indent=indent, subsequent_indent=rest or indent,
                             break_long_words=False, break_on_hyphens=False) or [""]

    lines = [f"Usage: {ctx.command_path} [OPTIONS]", ""]
    for para in _plain(command.help or "").split("\n\n"):
        para = para.strip()
        if para.startswith("$"):
            lines += wrap(para, "  ", "      ")
        elif para:
            lines += wrap(" ".join(para.split()), "")
        lines.append("")
    panels: dict[str, list[Any]] = {}
    for param in command.get_params(ctx):
        if getattr(param, "hidden", False):
            continue
        panels.setdefault(getattr(param, "rich_help_panel", None) or "Options", []).append(param)
    for title, params in panels.items():
        lines.append(f"{title}:")
        for param in params:
            names = ", ".join(param.opts) + (" / " + ", ".join(param.secondary_opts) if param.secondary_opts else "")
            if not getattr(param, "is_flag", False):
                names += f" {_type_name(param)}"
            lines += wrap(names, "  ", "    ")
            if param.help:
                lines += wrap(_plain(param.help), "      ")
        lines.append("")
    return "\n".join(lines)


def _launch(ctx: typer.Context, n: int) -> None:
    """Re-run this command under torchrun with N processes on this machine."""
    import shutil
    import socket
    import subprocess

    raw = ctx.meta.get("kimi_lora_train_args", [])
    args, skip = [], False
    for tok in raw:
        if skip:
            skip = False
            continue
        if tok.replace("_", "-") in ("--num-processes", "--nproc-per-node"):
            skip = True
            continue
        if tok.replace("_", "-").startswith(("--num-processes=", "--nproc-per-node=")):
            continue
        args.append(tok)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = [sys.executable, "-m", "torch.distributed.run"] if not shutil.which("torchrun") else ["torchrun"]
    cmd = [*launcher, "--nnodes", "1", "--nproc_per_node", str(n), "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "kimi_lora_cli", "train", *args]
    from kimi_lora_cli.cli._output import err

    err.print(f"[dim]Launching {n} processes: {' '.join(cmd)}[/]", soft_wrap=True)
    raise typer.Exit(subprocess.call(cmd))


def train(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML file with the same keys as the flags "
                                                "(lora_rank: 8, data_path: ...); flags override it.",
                                                rich_help_panel=P_DATA)] = None,
    num_processes: Annotated[int | None, typer.Option("--num-processes", "--nproc-per-node", help="Launch N "
                                                      "processes on this machine (torchrun).",
                                                      rich_help_panel=P_RUN)] = None,
    **settings: Any,
) -> None:
    """Fine-tune Kimi-Audio on a jsonl of conversations; writes a PEFT adapter (or a full model).

    Every flag of the official LoRA guide works, in its underscore spelling too, so its command can be pasted after `kimi-lora train`. The data is checked in full before the first step; every problem is listed with its line number. Ctrl-C (or SIGTERM) stops at the next step, saves a checkpoint and exits 130 (143). An --output-dir that holds an earlier run is refused unless you resume it or pass --overwrite-output-dir.

    [bold]Examples[/]

      $ kimi-lora train --model-name-or-path ./Kimi-Audio-7B-Instruct --data-path data.jsonl --use-lora --lora-rank 8 --lora-target all --bf16 --output-dir out/asr-lora

      $ torchrun --nproc_per_node 8 -m kimi_lora_cli train --config train.yaml --deepspeed zero3

      $ kimi-lora train --config train.yaml --fsdp --bf16 --gradient-checkpointing --num-processes 8

      $ kimi-lora train --config out/asr-lora/train_config.yaml --resume-from-checkpoint latest
    """
    flags = {k: v for k, v in settings.items() if v is not None}
    from kimi_lora_cli.cli._output import err, out
    from kimi_lora_cli.errors import ConfigError, KimiLoraError
    from kimi_lora_cli.training.config import lora_keys

    rank = int(os.environ.get("RANK", "0"))
    try:
        file_values = TrainConfig.from_yaml(config) if config else {}
        cfg = TrainConfig.build(file_values, flags, source=str(config) if config else "flags")
        given = [k for k in lora_keys() if k in flags]
        if not cfg.lora_enabled and given:
            raise ConfigError(f"--{given[0].replace('_', '-')} is a LoRA option but --use-lora is not set; add "
                              "--use-lora (or drop the LoRA options for full fine-tuning)")
        if "packing_length" in flags and not cfg.packing:
            raise ConfigError("--packing-length sets the row length of --packing; add --packing (or drop "
                              "--packing-length)")
        if num_processes is not None and num_processes < 1:
            raise ConfigError(f"--num-processes must be at least 1, not {num_processes}")
        if num_processes and num_processes > 1 and "WORLD_SIZE" not in os.environ:
            from kimi_lora_cli.training.output_folder import OutputDir
            from kimi_lora_cli.training.preflight import preflight

            OutputDir(cfg).check(resuming=cfg.resume_from_checkpoint is not None)
            if cfg.deepspeed:  # a missing extra or a bad config: once, before N processes start
                from kimi_lora_cli.training.distributed import deepspeed_config
                from kimi_lora_cli.training.zero import require_deepspeed

                require_deepspeed(cfg.deepspeed)
                deepspeed_config(cfg, num_processes)
            preflight(cfg)  # bad data is reported here once, not by N processes
            _launch(ctx, num_processes)
        from kimi_lora_cli.training.reporting import Reporter
        from kimi_lora_cli.training.trainer import train as run_training

        command = ["kimi-lora", "train", *ctx.meta.get("kimi_lora_train_args", [])]
        result = run_training(cfg, Reporter(console=err, enabled=rank == 0), command=command)
    except KimiLoraError:
        if rank != 0:
            raise typer.Exit(1) from None  # rank 0 reports it
        raise
    stopped = 128 + (result.signal or 2)  # 130 for Ctrl-C, 143 for SIGTERM
    if not result.is_main:
        raise typer.Exit(stopped if result.interrupted else 0)
    if result.interrupted:
        err.print(f"Stopped at step {result.global_step}/{result.total_steps}; checkpoint saved to "
                  f"{result.checkpoint}. Resume with --resume-from-checkpoint latest.")
        raise typer.Exit(stopped)
    loss = ""
    if result.first_loss is not None and result.last_loss is not None:
        loss = f", loss {result.first_loss:.4f} -> {result.last_loss:.4f}"
    if result.last_eval_loss is not None:
        loss += f", eval loss {result.last_eval_loss:.4f}"
    if "eval_wer" in result.last_eval:
        loss += f", eval WER {result.last_eval['eval_wer']:.4f}"
    if result.best_checkpoint is not None:
        held = " (the saved adapter)" if cfg.load_best_model_at_end else ""
        loss += f"; best {cfg.best_metric_name} {result.best_metric:.4f} at {Path(result.best_checkpoint).name}{held}"
    if result.stopped_early:
        loss += "; stopped early"
    what = "adapter" if cfg.lora_enabled else "model"
    out.print(f"Trained {result.global_step} steps on {result.samples} samples{loss} in {result.seconds:.1f} s.")
    out.print(f"Saved the {what} to [bold]{result.output_dir}[/] ({', '.join(p.name for p in result.saved[:4])}"
              f"{', ...' if len(result.saved) > 4 else ''}); metrics in {result.output_dir / 'logs' / 'metrics.jsonl'}"
              + (f", loss curve {result.plot.name}" if result.plot else ""), soft_wrap=True)


def _with_settings(command: Any) -> Any:
    """Give `train` the derived parameters: typer reads a function's signature and type hints."""
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values()
           if p.kind is not inspect.Parameter.VAR_KEYWORD]
    command.__signature__ = inspect.Signature([*own, *train_options()])
    command.__annotations__ = {p.name: p.annotation for p in command.__signature__.parameters.values()}
    return command


train = _with_settings(train)
