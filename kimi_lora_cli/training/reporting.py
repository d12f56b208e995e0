"""What a run tells the user: parameter table, progress (rich bar on a terminal, plain lines
otherwise), logs/metrics.jsonl, optional TensorBoard / W&B, and the loss-curve PNG. Rank 0 only."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from kimi_lora_cli.errors import ConfigError
from kimi_lora_cli.fileops import naming_errors, write_atomic
from kimi_lora_cli.formatting import human_count

BAR_WIDTH = 20


class Reporter:
    """Console output of a training run. `enabled=False` (ranks > 0) makes every call a no-op."""

    def __init__(self, console: Any = None, rich_progress: bool | None = None, enabled: bool = True) -> None:
        from rich.console import Console

        self.console = console or Console(stderr=True, highlight=False)
        self.enabled = enabled
        self.rich = self.console.is_terminal if rich_progress is None else rich_progress
        self._progress = None
        self._task = None
        self._start = time.perf_counter()
        self._first_step = 0
        self._last: dict[str, Any] | None = None

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self.enabled:
            self.console.print(*args, **kwargs)

    def parameter_table(self, rows: list[Any], title: str) -> None:
        if not self.enabled:
            return
        from rich.table import Table

        table = Table(title=title, title_justify="left")
        table.add_column("Component")
        table.add_column("Trainable", justify="right")
        table.add_column("Total", justify="right")
        table.add_column("%", justify="right")
        trainable = total = 0
        for r in rows:
            table.add_row(r.component, human_count(r.trainable), human_count(r.total), f"{r.percent:.3f}")
            trainable += r.trainable
            total += r.total
        table.add_section()
        table.add_row("[bold]all[/]", f"[bold]{human_count(trainable)}[/]", f"[bold]{human_count(total)}[/]",
                      f"[bold]{100.0 * trainable / total if total else 0:.3f}[/]")
        self.console.print(table)

    def start(self, total_steps: int, first_step: int) -> None:
        self._start = time.perf_counter()
        self._first_step = first_step
        if not self.enabled or not self.rich:
            return
        from rich.progress import BarColumn, Progress, TextColumn
        from rich.table import Column

        # What matters first (step/total, loss, ETA) leads and is never cut; the rest of the line gives
        # way on a narrow (80-column) terminal.
        self._progress = Progress(
            TextColumn("{task.fields[head]}", table_column=Column(no_wrap=True)),
            BarColumn(bar_width=BAR_WIDTH),
            TextColumn("{task.fields[info]}", table_column=Column(no_wrap=True)),
            console=self.console, transient=False,
        )
        self._progress.start()
        self._task = self._progress.add_task("train", total=total_steps, completed=first_step,
                                             head=f"train {first_step}/{total_steps}", info="")

    def step(self, step: int, total_steps: int, record: dict[str, Any] | None) -> None:
        """After each optimizer step; `record` is the step's logged metrics (None between log steps).
        The bar shows the last logged values; plain lines (no terminal) carry elapsed time, percent and
        ETA so a nohup / Slurm log shows progress."""
        if not self.enabled:
            return
        if record is not None:
            self._last = record
        elapsed = time.perf_counter() - self._start
        done = step - self._first_step
        eta = _clock(elapsed / done * (total_steps - step)) if done > 0 else "-:--:--"
        if self._progress is not None:
            m = self._last
            head = f"train {step}/{total_steps}" + ("" if m is None else f" loss {m['loss']:.4f}") + f" eta {eta}"
            info = "" if m is None else (
                f"epoch {m['epoch']:.2f} (text {m['text_loss']:.4f} audio {m['audio_loss']:.4f}) "
                f"lr {m['learning_rate']:.2e} {m.get('tokens_per_second', 0):.0f} tok/s elapsed {_clock(elapsed)}")
            room = self.console.width - len(head) - BAR_WIDTH - 3  # the columns' separating spaces
            if len(info) > room:
                info = info[: max(room - 1, 0)] + "\u2026" if room > 1 else ""
            self._progress.update(self._task, completed=step, head=head, info=info)
        elif record is not None:
            self.console.print(
                f"step {step}/{total_steps} ({100.0 * step / max(total_steps, 1):.1f}%) loss {record['loss']:.4f} "
                f"eta {eta} epoch {record['epoch']:.2f} text_loss {record['text_loss']:.4f} "
                f"audio_loss {record['audio_loss']:.4f} lr {record['learning_rate']:.3e} "
                f"tokens/s {record.get('tokens_per_second', 0):.0f} elapsed {_clock(elapsed)}",
                soft_wrap=True,
            )

    def eval_pairs(self, pairs: list[tuple[str, str, str]]) -> None:
        """A few (reference, prediction) pairs of the last decoding evaluation."""
        if not self.enabled:
            return
        from rich.table import Table

        table = Table(title="eval samples", title_justify="left", show_lines=False)
        table.add_column("id", overflow="fold")
        table.add_column("reference", overflow="fold")
        table.add_column("prediction", overflow="fold")
        for sid, ref, pred in pairs:
            table.add_row(sid, ref, pred)
        self.console.print(table)

    def banner(self, rows: list[tuple[str, str]]) -> None:
        """The run's shape before the first step (world size, batches, steps, parameters, ...)."""
        if not self.enabled:
            return
        width = max(len(k) for k, _ in rows)
        for key, value in rows:
            self.console.print(f"[bold]{key:<{width}}[/]  {value}", soft_wrap=True)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def banner_rows(cfg: Any, *, world: int, engine: str, device: Any, steps_per_epoch: int, total_steps: int,
                trainable: int, total: int, lora_modules: int | None, packing: str | None, eval_samples: int,
                decoded: int) -> list[tuple[str, str]]:
    """The start banner: world size and engine, the global batch, steps, trainable parameters,
    precision, targets and the evaluation set."""
    from kimi_lora_cli.formatting import human_count

    per_step = world * cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    precision = "bf16" if cfg.bf16 else "fp16" if cfg.fp16 else "fp32"
    targets = f"LoRA r={cfg.lora_rank} on {lora_modules} modules ({cfg.lora_target})" \
        if lora_modules is not None else "full fine-tuning: every weight (--use-lora trains an adapter)"
    rows = [("World size", f"{world} ({engine}, {device})"),
            ("Batch", f"{cfg.per_device_train_batch_size} per device x {cfg.gradient_accumulation_steps} "
                      f"accumulation x {world} processes = {per_step} "
                      f"{'packed rows' if cfg.packing else 'samples'} per step"),
            *([("Packing", packing)] if packing else []),
            ("Steps", f"{steps_per_epoch} per epoch, {total_steps} in total"),
            ("Trainable", f"{human_count(trainable)} of {human_count(total)} parameters "
                          f"({100.0 * trainable / max(total, 1):.3f}%)"),
            ("Precision", precision + (", gradient checkpointing" if cfg.gradient_checkpointing else "")),
            ("Targets", targets)]
    if eval_samples:
        rows.append(("Evaluation", f"{eval_samples} samples" + (f", {decoded} decoded for WER/CER" if decoded else "")))
    return rows


TRACKERS = ("tensorboard", "wandb")
TRACKER_INSTALL = {"tensorboard": "pip install tensorboard (or 'kimi-lora[tensorboard]')",
                   "wandb": "pip install wandb"}


def parse_report_to(value: str | None) -> list[str]:
    """--report-to as the HF Trainer reads it: a comma list of trackers, `all` (every installed one) or
    `none`. Unknown names are errors; a named tracker that is not installed is an error here, before
    any weight is read."""
    import importlib.util

    names = [v.strip().lower() for v in (value or "none").replace(" ", ",").split(",") if v.strip()]
    if not names or names == ["none"]:
        return []
    if "all" in names:
        return [t for t in TRACKERS if importlib.util.find_spec(t) is not None]
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"--report-to {value}: unknown tracker {name!r}; use tensorboard, wandb, all or none")
        if importlib.util.find_spec(name) is None:
            raise ConfigError(f"--report-to {name} needs the {name} package: {TRACKER_INSTALL[name]}")
    return list(dict.fromkeys(names))


class MetricsLog:
    """logs/metrics.jsonl (one object per logging step or evaluation) + the --report-to trackers."""

    def __init__(self, output_dir: Path, enabled: bool, report_to: str | None = "none", resume_step: int = 0,
                 config: dict[str, Any] | None = None, run_name: str | None = None) -> None:
        self.enabled = enabled
        self.path = output_dir / "logs" / "metrics.jsonl"
        self.records: list[dict[str, Any]] = []
        self._tb = self._wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step and self.path.is_file():
            # Keep what was logged up to the checkpoint; later lines belong to the interrupted tail.
            kept = []
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if rec.get("step", 0) <= resume_step:
                    kept.append(rec)
            self.records = kept
            write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        elif self.path.exists():
            self.path.unlink()
        trackers = parse_report_to(report_to)
        if "tensorboard" in trackers:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(output_dir / "logs" / "tensorboard" / (run_name or "")))
        if "wandb" in trackers:
            import wandb

            self._wandb = wandb.init(config=config or {}, dir=str(output_dir / "logs"), name=run_name)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.records.append(record)
        with naming_errors(self.path), open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        step = record.get("step", 0)
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None:
            for k, v in numbers.items():
                self._tb.add_scalar(_tracker_key(k), v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log({_tracker_key(k): v for k, v in numbers.items()}, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _tracker_key(key: str) -> str:
    """HF Trainer's grouping in trackers: eval metrics under eval/, the rest under train/."""
    return f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"


PLOT_SKIPPED = ("no {name}: the loss plot needs matplotlib, which is not installed (pip install "
                "'kimi-lora[plot]'); the losses are in logs/metrics.jsonl")


def plot_losses(records: list[dict[str, Any]], path: Path, tag: str | None = None, note: Any = None) -> Path | None:
    """loss / text_loss / audio_loss (and eval loss) against step; None when matplotlib is missing
    (then `note(message)` hears why, so a user does not look for a file that never came)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if note is not None and records:
            note(PLOT_SKIPPED.format(name=path.name))
        return None
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key, style in (("loss", "-"), ("text_loss", "--"), ("audio_loss", ":")):
        pts = [(r["step"], r[key]) for r in train if key in r]
        if pts and (key == "loss" or any(v for _, v in pts)):
            ax.plot(*zip(*pts), style, label=key)
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval_loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.{tag or os.getpid()}.tmp")  # a killed run's is removed by the next
    try:
        with naming_errors(path):
            fig.savefig(tmp, dpi=120, format="png")
            tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return path
