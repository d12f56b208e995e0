"""`kimi-lora train`: LoRA (or full) fine-tuning of Kimi-Audio from the official jsonl format."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

P_DATA = "Model and data"
P_LORA = "LoRA"
P_OPT = "Optimisation"
P_EVAL = "Evaluation and best model"
P_RUN = "Saving, logging, resuming, launching"

# Boolean flags that the guide writes with a value (`--bf16 True`, `--use_lora false`).
BOOL_FLAGS = ("use-lora", "use-dora", "use-rslora", "train-embeddings", "bf16", "fp16", "gradient-checkpointing",
              "group-by-length", "packing", "lazy-preprocess", "load-best-model-at-end", "greater-is-better",
              "overwrite-output-dir", "fsdp", "fsdp-cpu-offload")
LIST_FLAGS = ("--lora-target", "--lora-target-modules", "--target", "--modules-to-save")
TRUE_WORDS = {"true", "1", "yes", "y", "on"}
FALSE_WORDS = {"false", "0", "no", "n", "off"}


def normalise_args(args: list[str]) -> list[str]:
    """Accept the LoRA guide's spellings: `--data_path x`, `--bf16 True`, `--lora_target_modules a b c`."""
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
        if bare in BOOL_FLAGS or (bare.startswith("no-") and bare[3:] in BOOL_FLAGS):
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
        if name in LIST_FLAGS and not eq:
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
    model_name_or_path: Annotated[str | None, typer.Option(
        "--model-name-or-path", help="Kimi-Audio release folder (tokenizer, whisper-large-v3/, and the weights "
        "unless --model-path is given).", rich_help_panel=P_DATA)] = None,
    model_path: Annotated[str | None, typer.Option(
        "--model-path", help="Folder with the weights to train (e.g. a fine-tuned or exported model); tokenizer "
        "and Whisper come from --model-name-or-path when it lacks them.", rich_help_panel=P_DATA)] = None,
    data_path: Annotated[str | None, typer.Option(
        "--data-path", help="Training jsonl in the official format, audio messages with audio_tokens "
        "(see `kimi-lora prepare`) or, with --speech-tokenizer, without.", rich_help_panel=P_DATA)] = None,
    output_dir: Annotated[str | None, typer.Option("--output-dir", "-o", help="Where the adapter, checkpoints "
                                                   "and logs go. \\[default: output/kimi-lora]",
                                                   rich_help_panel=P_DATA)] = None,
    eval_data_path: Annotated[str | None, typer.Option(
        "--eval-data-path", help="Evaluation jsonl (same format and checks as --data-path).",
        rich_help_panel=P_EVAL)] = None,
    eval_ratio: Annotated[float | None, typer.Option("--eval-ratio", help="Or hold out this share of the training "
                                                     "samples for evaluation. \\[default: 0]",
                                                     rich_help_panel=P_EVAL)] = None,
    evaluation_strategy: Annotated[str | None, typer.Option("--evaluation-strategy", "--eval-strategy",
                                                            help="no, steps or epoch; also once at the end. "
                                                            "\\[default: steps]", rich_help_panel=P_EVAL)] = None,
    eval_steps: Annotated[int | None, typer.Option("--eval-steps", help="Evaluate every N steps. \\[default: "
                                                   "--save-steps]", rich_help_panel=P_EVAL)] = None,
    eval_generate: Annotated[str | None, typer.Option(
        "--eval-generate", help="Greedy-decode N eval conversations (or all) at each evaluation with the infer "
        "engine under the current adapter; logs eval_wer / eval_cer.", rich_help_panel=P_EVAL)] = None,
    eval_max_new_tokens: Annotated[int | None, typer.Option(
        "--eval-max-new-tokens", help="Decode budget per conversation. \\[default: 2 x longest reference + 16]",
        rich_help_panel=P_EVAL)] = None,
    metric_for_best_model: Annotated[str | None, typer.Option(
        "--metric-for-best-model", help="eval_wer, eval_cer or eval_loss (also eval_text_loss, eval_audio_loss): "
        "tracked in trainer_state.json; every evaluation then saves a checkpoint.", rich_help_panel=P_EVAL)] = None,
    greater_is_better: Annotated[bool | None, typer.Option(
        "--greater-is-better/--no-greater-is-better", help="\\[default: no for loss, wer and cer]",
        rich_help_panel=P_EVAL)] = None,
    load_best_model_at_end: Annotated[bool | None, typer.Option(
        "--load-best-model-at-end/--no-load-best-model-at-end", help="The final adapter is the best checkpoint's "
        "(by --metric-for-best-model, default eval_loss).", rich_help_panel=P_EVAL)] = None,
    early_stopping_patience: Annotated[int | None, typer.Option(
        "--early-stopping-patience", help="Stop after N evaluations without improvement of the metric.",
        rich_help_panel=P_EVAL)] = None,
    early_stopping_threshold: Annotated[float | None, typer.Option(
        "--early-stopping-threshold", help="Least change that counts as an improvement. \\[default: 0]",
        rich_help_panel=P_EVAL)] = None,
    per_device_eval_batch_size: Annotated[int | None, typer.Option(
        "--per-device-eval-batch-size", help="Eval micro-batch. \\[default: the training one for the loss, 16 for "
        "decoding]", rich_help_panel=P_EVAL)] = None,
    model_max_length: Annotated[int | None, typer.Option("--model-max-length", help="Longest sequence in tokens. "
                                                         "\\[default: max_position_embeddings]",
                                                         rich_help_panel=P_DATA)] = None,
    too_long: Annotated[str | None, typer.Option("--too-long", help="Samples over --model-max-length: error, "
                                                 "skip or truncate. \\[default: error]",
                                                 rich_help_panel=P_DATA)] = None,
    group_by_length: Annotated[bool | None, typer.Option("--group-by-length/--no-group-by-length",
                                                         help="Batch samples of similar length (less padding).",
                                                         rich_help_panel=P_DATA)] = None,
    packing: Annotated[bool | None, typer.Option(
        "--packing/--no-packing", help="Pack samples end to end into rows of --packing-length tokens (no compute "
        "on padding); each sample still attends only to itself and keeps its own loss. "
        "--per-device-train-batch-size then counts rows.", rich_help_panel=P_DATA)] = None,
    packing_length: Annotated[int | None, typer.Option(
        "--packing-length", help="Tokens per packed row; longer samples follow --too-long. \\[default: "
        "--model-max-length]", rich_help_panel=P_DATA)] = None,
    feature_cache_dir: Annotated[str | None, typer.Option(
        "--feature-cache-dir", "--cache-features", help="Also keep Whisper features on disk here, reused by later "
        "runs; the folder `kimi-lora prepare --cache-features` filled is reused as is.",
        rich_help_panel=P_DATA)] = None,
    speech_tokenizer: Annotated[str | None, typer.Option(
        "--speech-tokenizer", help="Local glm-4-voice-tokenizer folder: audio messages without audio_tokens are "
        "tokenized on the fly (each file once; kept in --feature-cache-dir too).", rich_help_panel=P_DATA)] = None,
    use_lora: Annotated[bool | None, typer.Option("--use-lora/--no-use-lora", help="Train a LoRA adapter "
                                                  "(without it: full fine-tuning).", rich_help_panel=P_LORA)] = None,
    lora_rank: Annotated[int | None, typer.Option("--lora-rank", "--lora-r", help="\\[default: 8]",
                                                  rich_help_panel=P_LORA)] = None,
    lora_alpha: Annotated[int | None, typer.Option("--lora-alpha", help="\\[default: 16]",
                                                   rich_help_panel=P_LORA)] = None,
    lora_dropout: Annotated[float | None, typer.Option("--lora-dropout", help="\\[default: 0.05]",
                                                       rich_help_panel=P_LORA)] = None,
    lora_target: Annotated[str | None, typer.Option(
        "--lora-target", "--lora-target-modules", "--target", help="all, components (backbone,text,mimo,adaptor,"
        "heads), module names, globs, re:REGEX, TERM:a-b layer ranges - as `kimi-lora list-modules`. "
        "\\[default: all]", rich_help_panel=P_LORA)] = None,
    lora_bias: Annotated[str | None, typer.Option("--lora-bias", help="none, all or lora_only. \\[default: none]",
                                                  rich_help_panel=P_LORA)] = None,
    use_dora: Annotated[bool | None, typer.Option("--use-dora/--no-use-dora", help="DoRA (weight-decomposed LoRA).",
                                                  rich_help_panel=P_LORA)] = None,
    use_rslora: Annotated[bool | None, typer.Option("--use-rslora/--no-use-rslora", help="rsLoRA scaling "
                                                    "alpha/sqrt(r).", rich_help_panel=P_LORA)] = None,
    modules_to_save: Annotated[str | None, typer.Option("--modules-to-save", help="Modules trained in full next "
                                                        "to the adapter (e.g. lm_head,mimo_output).",
                                                        rich_help_panel=P_LORA)] = None,
    train_embeddings: Annotated[bool | None, typer.Option("--train-embeddings/--no-train-embeddings",
                                                          help="Train the token embeddings in full (excluded by "
                                                          "default).", rich_help_panel=P_LORA)] = None,
    text_loss_weight: Annotated[float | None, typer.Option("--text-loss-weight", help="\\[default: 1]",
                                                           rich_help_panel=P_OPT)] = None,
    audio_loss_weight: Annotated[float | None, typer.Option("--audio-loss-weight", help="\\[default: 1]",
                                                            rich_help_panel=P_OPT)] = None,
    num_train_epochs: Annotated[float | None, typer.Option("--num-train-epochs", help="\\[default: 3]",
                                                           rich_help_panel=P_OPT)] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps", help="Stop after N optimizer steps (overrides "
                                                  "epochs).", rich_help_panel=P_OPT)] = None,
    per_device_train_batch_size: Annotated[int | None, typer.Option(
        "--per-device-train-batch-size", help="Micro-batch per process. \\[default: 1]", rich_help_panel=P_OPT)] = None,
    gradient_accumulation_steps: Annotated[int | None, typer.Option("--gradient-accumulation-steps",
                                                                    help="\\[default: 1]", rich_help_panel=P_OPT)] = None,
    learning_rate: Annotated[float | None, typer.Option("--learning-rate", "--lr", help="\\[default: 1e-4]",
                                                        rich_help_panel=P_OPT)] = None,
    weight_decay: Annotated[float | None, typer.Option("--weight-decay", help="\\[default: 0]",
                                                       rich_help_panel=P_OPT)] = None,
    adam_beta1: Annotated[float | None, typer.Option("--adam-beta1", rich_help_panel=P_OPT, hidden=True)] = None,
    adam_beta2: Annotated[float | None, typer.Option("--adam-beta2", help="\\[default: 0.999]",
                                                     rich_help_panel=P_OPT)] = None,
    adam_epsilon: Annotated[float | None, typer.Option("--adam-epsilon", rich_help_panel=P_OPT, hidden=True)] = None,
    max_grad_norm: Annotated[float | None, typer.Option("--max-grad-norm", help="Gradient clipping, 0 = off. "
                                                        "\\[default: 1]", rich_help_panel=P_OPT)] = None,
    lr_scheduler_type: Annotated[str | None, typer.Option("--lr-scheduler-type", help="cosine, linear, constant, "
                                                          "constant_with_warmup. \\[default: cosine]",
                                                          rich_help_panel=P_OPT)] = None,
    warmup_ratio: Annotated[float | None, typer.Option("--warmup-ratio", rich_help_panel=P_OPT)] = None,
    warmup_steps: Annotated[int | None, typer.Option("--warmup-steps", rich_help_panel=P_OPT)] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="\\[default: 42]", rich_help_panel=P_OPT)] = None,
    bf16: Annotated[bool | None, typer.Option("--bf16/--no-bf16", help="bfloat16 weights (LoRA) and autocast.",
                                              rich_help_panel=P_OPT)] = None,
    fp16: Annotated[bool | None, typer.Option("--fp16/--no-fp16", rich_help_panel=P_OPT, hidden=True)] = None,
    gradient_checkpointing: Annotated[bool | None, typer.Option(
        "--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute layers in the backward pass "
        "(less memory).", rich_help_panel=P_OPT)] = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu to force the CPU. \\[default: the "
                                               "accelerator's]", rich_help_panel=P_OPT)] = None,
    save_steps: Annotated[int | None, typer.Option("--save-steps", help="Checkpoint every N steps. "
                                                   "\\[default: 500]", rich_help_panel=P_RUN)] = None,
    save_total_limit: Annotated[int | None, typer.Option("--save-total-limit", help="Keep only the newest N "
                                                         "checkpoints.", rich_help_panel=P_RUN)] = None,
    logging_steps: Annotated[int | None, typer.Option("--logging-steps", help="\\[default: 10]",
                                                      rich_help_panel=P_RUN)] = None,
    resume_from_checkpoint: Annotated[str | None, typer.Option(
        "--resume-from-checkpoint", help="latest (newest checkpoint in --output-dir) or a checkpoint-N folder; "
        "the run's settings must match the checkpoint's, except max_steps, num_train_epochs, learning_rate, "
        "save/logging/eval steps, save_total_limit, report_to, device and gradient_checkpointing.",
        rich_help_panel=P_RUN)] = None,
    overwrite_output_dir: Annotated[bool | None, typer.Option(
        "--overwrite-output-dir/--no-overwrite-output-dir", help="Start over in an --output-dir an earlier "
        "`kimi-lora train` wrote (its adapter, checkpoints and logs are removed; other folders are never "
        "touched).", rich_help_panel=P_RUN)] = None,
    deepspeed: Annotated[str | None, typer.Option("--deepspeed", help="DeepSpeed config: zero2 or zero3 (shipped "
                                                  "with kimi-lora) or a JSON path; \"auto\" values are filled from the flags.", rich_help_panel=P_RUN)] = None,
    fsdp: Annotated[bool | None, typer.Option(
        "--fsdp/--no-fsdp", help="Shard weights, gradients and optimizer state over the processes (FSDP2): each "
        "holds 1/N of the model, for models past one GPU's memory. With --num-processes, torchrun or "
        "`accelerate launch --use_fsdp`.", rich_help_panel=P_RUN)] = None,
    fsdp_cpu_offload: Annotated[bool | None, typer.Option(
        "--fsdp-cpu-offload/--no-fsdp-cpu-offload", help="With --fsdp: keep the shards, gradients and optimizer "
        "state in CPU memory (slower; fits larger models).", rich_help_panel=P_RUN)] = None,
    report_to: Annotated[str | None, typer.Option("--report-to", help="Trackers: tensorboard, wandb (comma list), "
                                                  "all (every installed one) or none. \\[default: none]",
                                                  rich_help_panel=P_RUN)] = None,
    run_name: Annotated[str | None, typer.Option("--run-name", help="Name of the run in the trackers.",
                                                 rich_help_panel=P_RUN)] = None,
    num_processes: Annotated[int | None, typer.Option("--num-processes", "--nproc-per-node", help="Launch N "
                                                      "processes on this machine (torchrun).",
                                                      rich_help_panel=P_RUN)] = None,
    lazy_preprocess: Annotated[bool | None, typer.Option("--lazy-preprocess/--no-lazy-preprocess",
                                                         hidden=True)] = None,
    save_strategy: Annotated[str | None, typer.Option("--save-strategy", hidden=True)] = None,
) -> None:
    """Fine-tune Kimi-Audio on a jsonl of conversations; writes a PEFT adapter (or a full model).

    Every flag of the official LoRA guide works, in its underscore spelling too, so its command can be pasted after `kimi-lora train`. The data is checked in full before the first step; every problem is listed with its line number. Ctrl-C (or SIGTERM) stops at the next step, saves a checkpoint and exits 130 (143). An --output-dir that holds an earlier run is refused unless you resume it or pass --overwrite-output-dir.

    [bold]Examples[/]

      $ kimi-lora train --model-name-or-path ./Kimi-Audio-7B-Instruct --data-path data.jsonl --use-lora --lora-rank 8 --lora-target all --bf16 --output-dir out/asr-lora

      $ torchrun --nproc_per_node 8 -m kimi_lora_cli train --config train.yaml --deepspeed ds_zero3.json

      $ kimi-lora train --config train.yaml --fsdp --bf16 --gradient-checkpointing --num-processes 8

      $ kimi-lora train --config out/asr-lora/train_config.yaml --resume-from-checkpoint latest
    """
    flags = {k: v for k, v in locals().items() if k not in ("ctx", "config", "num_processes", "lazy_preprocess",
                                                              "save_strategy") and v is not None}
    from kimi_lora_cli.cli._output import err, out
    from kimi_lora_cli.errors import ConfigError, KimiLoraError
    from kimi_lora_cli.training.config import LORA_KEYS, TrainConfig

    rank = int(os.environ.get("RANK", "0"))
    try:
        file_values = TrainConfig.from_yaml(config) if config else {}
        cfg = TrainConfig.build(file_values, flags, source=str(config) if config else "flags")
        given = [k for k in LORA_KEYS if k in flags]
        if not cfg.lora_enabled and given:
            raise ConfigError(f"--{given[0].replace('_', '-')} is a LoRA option but --use-lora is not set; add "
                              "--use-lora (or drop the LoRA options for full fine-tuning)")
        if "packing_length" in flags and not cfg.packing:
            raise ConfigError("--packing-length sets the row length of --packing; add --packing (or drop "
                              "--packing-length)")
        if num_processes is not None and num_processes < 1:
            raise ConfigError(f"--num-processes must be at least 1, not {num_processes}")
        if num_processes and num_processes > 1 and "WORLD_SIZE" not in os.environ:
            from kimi_lora_cli.training.output import OutputDir
            from kimi_lora_cli.training.setup import preflight

            OutputDir(cfg).check(resuming=cfg.resume_from_checkpoint is not None)
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
